"""Training at scale: mesh placement, sharded jitted steps, checkpointed iterators and loops."""
