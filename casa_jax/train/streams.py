"""A deterministic, checkpointable stream of training batches over an in-memory example list.

Epoch ``e`` visits the examples in a permutation drawn from ``(seed, e)``; the stream's whole state is
``{"epoch", "position"}``, so restoring it replays exactly the batches an uninterrupted run would see.
On a pod, every process draws the same global batch order and keeps its own slice of rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class ExampleStream:
    def __init__(self, examples: Sequence, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def next(self) -> list:
        """This process's rows of the next global batch (incomplete tails of an epoch are skipped)."""
        if self.position + self.batch_size > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        rows = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        per_process = self.batch_size // self.process_count
        mine = rows[self.process_index * per_process:(self.process_index + 1) * per_process]
        return [self.examples[i] for i in mine]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data iterator state has seed {state.get('seed')}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class GrainStream:
    """The same interface over a grain iterator of the TFDS ``casa_prompts`` records (``data.source=tfds``)."""

    def __init__(self, examples: Sequence, batch_size: int, seed: int, data_dir: str | None = None,
                 process_index: int = 0, process_count: int = 1):
        from casa_jax.data.tfds_prompts import IndexedExamples, decode, example_iterator, prepare
        if batch_size % process_count:
            raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
        source = prepare(data_dir)
        index = {decode(source[i])["prompt"]: i for i in range(len(source))}
        missing = [e.prompt[:40] for e in examples if e.prompt not in index]
        if missing:
            raise ValueError(f"{len(missing)} training prompts are not in the TFDS casa_prompts dataset "
                             f"(e.g. {missing[0]!r}); rebuild it from this version of the package")
        indexed = IndexedExamples(source, [index[e.prompt] for e in examples], examples)
        self.seed = seed
        self._make = lambda: example_iterator(indexed, batch_size // process_count, seed, process_index, process_count)
        self._iterator = self._make()

    def next(self) -> list:
        return next(self._iterator)

    def state(self) -> dict:
        return {"grain": self._iterator.get_state(), "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("seed") != self.seed or "grain" not in state:
            raise ValueError(f"data iterator state {state!r} does not belong to this grain stream (seed {self.seed})")
        self._iterator = self._make()
        self._iterator.set_state(state["grain"])
