"""Orbax checkpoints of a run: the train state plus a JSON record (config, input statistics, history).

Layout: `<workdir>/ckpt/<step>/{state,meta}`. Each save is atomic (Orbax writes to a temporary
`<step>.orbax-checkpoint-tmp-*` folder and renames it), so a run killed mid-save leaves the previous
checkpoint as the latest one; temporary folders are never listed as steps.
The last `keep` checkpoints and the best one by test accuracy are kept. A checkpoint saved mid-epoch
(on Ctrl-C / SIGTERM) has no test accuracy: it counts for "latest", never for "best".

Readers (evaluation, reports) open a run with `RunCheckpoints(path, read_only=True)` and call
`require_latest_step()` / `require_best_step()`: a missing, empty, half-written or foreign folder
raises `CheckpointError` with one line saying which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_accuracy"
META_KEYS = ("config", "history")  # what every jaxnorm checkpoint's meta holds


class CheckpointError(RuntimeError):
    """A run folder with no usable checkpoint; the command line prints its message as one line."""


class RunCheckpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
        self.workdir = Path(workdir)
        self.directory = self.workdir.expanduser().absolute() / "ckpt"
        if read_only:
            if not self.workdir.expanduser().exists():
                raise CheckpointError(f"{workdir} does not exist")
            if not self.directory.is_dir():
                raise CheckpointError(f"{workdir} holds no checkpoints (no {self.directory.name}/ folder): "
                                      "is it a training run folder?")
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn as well: without it Orbax's best_step() silently answers the latest step.
        options = ocp.CheckpointManagerOptions(preservation_policy=preserve, best_fn=_best_metric,
                                               best_mode="max", read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def require_latest_step(self) -> int:
        """The latest complete checkpoint's step, checked to be a jaxnorm run; else CheckpointError."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(self._why_no_steps())
        self.restore_meta(step)  # raises for a foreign or unreadable checkpoint
        return step

    def require_best_step(self) -> int:
        """The end-of-epoch checkpoint with the best test accuracy (the latest if none has one)."""
        latest = self.require_latest_step()
        best = self.best_step()
        return latest if best is None else best

    def _why_no_steps(self) -> str:
        entries = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
        if not entries:
            return f"{self.workdir} holds no checkpoints ({self.directory.name}/ is empty)"
        if any(TMP_MARKER in name for name in entries):
            return (f"{self.workdir} holds only a half-written checkpoint ({entries[0]}): the run was "
                    "stopped during its first save")
        return f"{self.workdir} holds no jaxnorm checkpoints ({self.directory.name}/ has {', '.join(entries[:3])})"

    # -- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start an asynchronous save; `wait()` before relying on it."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is not a jaxnorm training "
                                  "checkpoint (its meta lacks the config and history)")
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at `step`, placed as `abstract_state`'s shardings say (so it loads on any hardware)."""
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                                 meta=ocp.args.JsonRestore())
        return restored["state"], restored["meta"]

    def _restore(self, step: int, **items):
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(have: {self.all_steps() or 'none'})")
        if any(not (self.directory / str(step) / name).is_dir() for name in items):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is not a jaxnorm training "
                                  f"checkpoint (it lacks {' or '.join(items)}/)")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for unreadable data
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is unreadable: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's name for a save in progress


def _best_metric(metrics: dict) -> float:
    return metrics[BEST_METRIC]


def check_writable_workdir(workdir: str | Path) -> None:
    """CheckpointError unless `workdir` exists as a writable folder or can be created as one.

    Checked before any data is loaded, so a typo costs nothing. Nothing is created here.
    """
    path = Path(workdir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"--workdir {workdir} cannot be used: {existing} is a file, not a folder")
    if (path / "ckpt").exists() and not (path / "ckpt").is_dir():
        raise CheckpointError(f"--workdir {workdir} cannot be used: the file {path / 'ckpt'} is in the way")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CheckpointError(f"--workdir {workdir} is not writable ({e.strerror or e} in {existing})") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--workdir {workdir} is not writable (no write permission on {existing})")


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` with every leaf placed by `sharding`: the target of a restore."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), tree)
