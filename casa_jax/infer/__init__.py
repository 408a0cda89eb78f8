"""Inference: the Engine (a loaded model, its compiled functions), one decode loop with gates, chat replies."""
