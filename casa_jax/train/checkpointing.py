"""Resumable training checkpoints: an orbax ``CheckpointManager`` over the train state (step, trainable
params, optimizer state), the RNG key and the data iterator's position.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it), so a run killed
mid-save restarts from the previous complete step. Which steps are saved and kept follows orbax's
save-decision and preservation policies.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision

from casa_jax import storage


class TrainCheckpoints:
    def __init__(self, directory: str, every_steps: int, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision.FixedIntervalPolicy(max(1, every_steps)),
            preservation_policy=preservation.LatestN(max(1, keep)),
            enable_async_checkpointing=async_save)
        self.directory = storage.resolve(directory)  # local or gs:// (orbax writes buckets itself)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Save if the policy says so (or ``force``); returns whether a save started."""
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed like ``abstract_state``'s shardings, data-iterator state) of ``step``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the arrays' shardings: the restore target that places shards directly."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
