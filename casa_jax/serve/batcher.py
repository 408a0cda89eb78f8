"""Dynamic batching: concurrent requests gathered into the jitted decode.

One worker thread owns the Engine. It takes the oldest waiting request, waits up to ``max_wait_s`` for
more with the same key (sampling settings and refusal mode, which fix the compiled decoder, and the
decode-length bucket), and runs up to ``max_batch`` of them as one batch. The batch is padded to a size
in ``batch_buckets`` (copies of its first prompt) and compiled for its bucket in ``token_buckets``, each
row stopping on the device at its own ``max_tokens``; with the Decoder's
prompt-length buckets this bounds the compiled shapes, so a new mix of requests never means a new
compile once each bucket has been seen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time

from casa_jax.serve.protocol import Generation

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def round_up(n: int, buckets) -> int:
    return next((b for b in buckets if b >= n), n)


def refusal_mode(generation: Generation) -> str:
    """Whether an ``unsafe`` row stops at once (template and error policies) or writes its own refusal."""
    return "model" if generation.policy == "model" else "template"


@dataclasses.dataclass
class _Job:
    generation: Generation
    future: concurrent.futures.Future
    key: tuple  # what one batch shares (``Batcher.key``)


@dataclasses.dataclass
class BatchStats:
    batches: int = 0  # decodes run
    requests: int = 0  # requests answered
    largest: int = 0  # the most requests one decode served
    in_flight: int = 0  # submitted, not yet answered


class Batcher:
    """``submit(generation)`` -> a Future of its ``infer.chat.Reply`` (see the module docstring).
    ``close()`` stops taking requests and finishes the ones already taken."""

    def __init__(self, engine, max_batch: int = 8, max_wait_s: float = 0.01, batch_buckets=(1, 2, 4, 8),
                 token_buckets=TOKEN_BUCKETS, recheck_every: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected at least 1")
        self.engine, self.max_batch, self.max_wait_s = engine, max_batch, max_wait_s
        self.batch_buckets = tuple(b for b in batch_buckets if b < max_batch) + (max_batch,)
        self.token_buckets = tuple(token_buckets)
        self.recheck_every = recheck_every
        self.stats = BatchStats()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="casa-jax-batcher", daemon=True)
        self._worker.start()

    def submit(self, generation: Generation) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(_Job(generation, future, self.key(generation)))
            self.stats.in_flight += 1
            self._cond.notify()
        return future

    def decode_tokens(self, generation: Generation) -> int:
        """The decode length ``generation`` runs at: its ``max_tokens`` rounded up to a token bucket."""
        return round_up(generation.max_tokens, self.token_buckets)

    def key(self, generation: Generation) -> tuple:
        """What requests must share to be batched: one compiled decoder (sampling settings, the seed for
        sampled requests, the refusal mode) and one decode length (the one their context was checked at)."""
        g = generation
        return (g.temperature, g.top_p, g.seed if g.temperature > 0 else None, refusal_mode(g),
                self.decode_tokens(g))

    def close(self, timeout: float | None = None) -> None:
        """Finish every request already submitted, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._waiting.popleft()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                same = next((j for j in self._waiting if j.key == first.key), None)
                if same is not None:
                    self._waiting.remove(same)
                    batch.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            try:
                replies = self._run([j.generation for j in live]) if live else []
            except Exception as e:  # noqa: BLE001 - the callers get the error; the worker keeps serving
                for j in live:
                    j.future.set_exception(e)
            else:
                for j, reply in zip(live, replies):
                    j.future.set_result(reply)
            with self._cond:
                self.stats.in_flight -= len(batch)

    def _run(self, generations: list[Generation]) -> list:
        from casa_jax.infer.chat import chat_replies
        g = generations[0]
        size = round_up(len(generations), self.batch_buckets)
        rows = generations + [g] * (size - len(generations))
        tokens = self.decode_tokens(g)  # the same for the whole batch (part of its key)
        replies = chat_replies(
            self.engine, [list(r.conversation) for r in rows], [r.max_tokens for r in rows],
            temperature=g.temperature, top_p=g.top_p, seed=g.seed,
            refusal_mode=refusal_mode(g) if self.engine.is_casa else None, prefills=[r.prefill for r in rows],
            decode_length=tokens, recheck_every=self.recheck_every)
        self.stats.batches += 1
        self.stats.requests += len(generations)
        self.stats.largest = max(self.stats.largest, len(generations))
        return replies[:len(generations)]
