"""An OpenAI-compatible HTTP endpoint over the inference ``Engine``, with CASA's safety verdict beside every
answer: ``python -m casa_jax.serve --ckpt_dir=...``.

``protocol`` validates requests and shapes responses, ``batcher`` gathers concurrent requests into the
jitted decode, ``app`` is the FastAPI application, ``__main__`` the command line (uvicorn).
"""
