"""Orbax checkpoints of a run: the train state plus a JSON record (config, input statistics, history).

Layout: `<workdir>/ckpt/<step>/{state,meta}`. Each save is atomic (Orbax writes to a temporary
folder and renames it), so a run killed mid-save leaves the previous checkpoint as the latest one.
The last `keep` checkpoints and the best one by test accuracy are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_accuracy"


class CheckpointError(RuntimeError):
    """A run folder with no usable checkpoint; the command line prints its message as one line."""


class RunCheckpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(workdir).expanduser().absolute() / "ckpt"
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{workdir} holds no checkpoints (no {self.directory.name}/ folder): "
                                  "is it a training run folder?")
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=preserve, read_only=read_only,
                                               create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # -- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start an asynchronous save; `wait()` before relying on it."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at `step`, placed as `abstract_state`'s shardings say (so it loads on any hardware)."""
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                                 meta=ocp.args.JsonRestore())
        return restored["state"], restored["meta"]

    def _restore(self, step: int, **items):
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(have: {self.all_steps() or 'none'})")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for unreadable data
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is unreadable: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` with every leaf placed by `sharding`: the target of a restore."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), tree)
