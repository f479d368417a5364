"""Orbax checkpoints of a run: the train state plus a JSON record (config, input statistics, history).

Layout: `<workdir>/ckpt/<step>/{state,meta}`. Each save is atomic (Orbax writes to a temporary
`<step>.orbax-checkpoint-tmp-*` folder and renames it), so a run killed mid-save leaves the previous
checkpoint as the latest one; temporary folders are never listed as steps.
The last `keep` checkpoints and the best one by the per-epoch evaluation accuracy are kept. A
checkpoint saved mid-epoch (on Ctrl-C / SIGTERM) has no accuracy: it counts for "latest", never for
"best". Readers use the final checkpoint; "best" is offered only for a run with a validation split
(`--train-split`), where the per-epoch evaluation is on validation images: choosing a checkpoint by
test accuracy would report a figure selected on the test set.

Readers (evaluation, reports) open a run with `RunCheckpoints(path, read_only=True)` and call
`require_latest_step()` / `require_best_validation_step()`: a missing, empty, half-written or foreign
folder raises `CheckpointError` with one line saying which.

Integrity: every save records a CRC32 of each state array's bytes (the host copy, taken when the save
starts) in the checkpoint's meta; `restore` recomputes them from the restored arrays, so a changed
byte makes the checkpoint unreadable instead of silently different. (CRC32: the aim is to catch
damage, not tampering, and it is cheap.) In a multi-host job the state is replicated: each process
checks its own copy of every array. A checkpoint that cannot be read or fails the check is skipped
by `restore_readable` / `readable_meta` with a one-line warning naming it, in favour of the newest
good one; it is never deleted (a resumed run moves it to `<workdir>/unreadable/<step>` so the step can
be saved again). A failed save (no space, no permission, I/O error) raises `CheckpointSaveError`
naming the step, the cause and the last good checkpoint; Orbax's atomic rename means the failed one
is never listed as a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src import asyncio_utils

from jaxnorm.config import Config

BEST_METRIC = "test_accuracy"
META_KEYS = ("config", "history")  # what every jaxnorm checkpoint's meta holds


class CheckpointError(RuntimeError):
    """A run folder with no usable checkpoint; the command line prints its message as one line."""


class UnreadableCheckpoint(CheckpointError):
    """One checkpoint cannot be read or fails its checksums; readers fall back to an older one."""


class CheckpointSaveError(CheckpointError):
    """A save failed (no space, permission, I/O); the checkpoints saved before it are intact."""


# Causes of OS-level failures in the user's terms, by errno and by the text Orbax/TensorStore use.
_CAUSES = [(errno.ENOSPC, "No space left on device", "no space left on the device"),
           (errno.EDQUOT, "Disk quota exceeded", "disk quota exceeded"),
           (errno.EACCES, "Permission denied", "permission denied"),
           (errno.EPERM, "Operation not permitted", "permission denied"),
           (errno.EROFS, "Read-only file system", "the file system is read-only"),
           (errno.EIO, "Input/output error", "input/output error")]


def failure_cause(error: BaseException, default: str) -> str:
    """What went wrong, in a few words: an OS cause found anywhere in the exception chain, else `default`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for code, text, words in _CAUSES:
            if (isinstance(error, OSError) and error.errno == code) or text in str(error):
                return words
        error = error.__cause__ or error.__context__
    return default


class _DropOrbaxLogs(logging.Filter):
    """Orbax logs each failed background write with a traceback; we report failures as one line."""

    def filter(self, record):
        return "orbax" not in record.pathname or record.levelno < logging.ERROR


def _quiet_orbax_errors() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxLogs) for f in logger.filters):
        logger.addFilter(_DropOrbaxLogs())


async def _finishing_leftover_tasks(coro, timeout: float = 60.0):
    """`coro`, but when it fails, the other tasks on its loop get up to `timeout` seconds to finish
    before the failure goes on (bounded: an error path must never hang)."""
    try:
        return await coro
    except Exception:
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        if leftovers:
            await asyncio.wait(leftovers, timeout=timeout)
        raise


def _let_failed_writes_finish() -> None:
    """Orbax runs each background write in a fresh event loop (`asyncio_utils._run_sync_via_new_loop`)
    and closes that loop as soon as the write fails. The array writes gathered with the failed one are
    still in flight in TensorStore's threads; each calls back into the closed loop when it ends, and
    TensorStore prints that "RuntimeError: Event loop is closed" as a traceback after our one-line
    error (two of them on a full disk). Letting the loop's leftover tasks finish before it closes
    removes the cause. Orbax 0.12.8; a version without that function is left alone."""
    run_in_new_loop = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if run_in_new_loop is None or getattr(run_in_new_loop, "finishes_leftovers", False):
        return

    def run_finishing_leftovers(coro):
        return run_in_new_loop(_finishing_leftover_tasks(coro))
    run_finishing_leftovers.finishes_leftovers = True
    asyncio_utils._run_sync_via_new_loop = run_finishing_leftovers


class RunCheckpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
        _quiet_orbax_errors()
        _let_failed_writes_finish()
        self.workdir = Path(workdir)
        self.read_only = read_only
        self._pending: int | None = None  # the step of the save in flight
        self._failed = False
        self._warned: set = set()
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
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def require_latest_step(self) -> int:
        """The latest complete checkpoint's step, checked to be a jaxnorm run; else CheckpointError."""
        if self.latest_step() is None:
            raise CheckpointError(self._why_no_steps())
        return self.readable_meta()[0]  # raises for a foreign run, falls back past unreadable ones

    def require_best_validation_step(self) -> int:
        """The end-of-epoch checkpoint with the best validation accuracy (the latest if none has one);
        CheckpointError for a run without a validation split, whose per-epoch figures are test figures."""
        latest, meta = self.readable_meta(prefer=self.require_latest_step())
        if Config.from_dict(meta["config"]).evaluation_set != "validation":
            raise CheckpointError(f"{self.workdir} has no validation split (--train-split): its per-epoch "
                                  "accuracy is on the test set, so no best checkpoint is chosen; use the "
                                  "final one")
        best = self.best_step()
        return latest if best is None else self.readable_meta(prefer=best)[0]

    def _why_no_steps(self) -> str:
        entries = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
        if not entries:
            return f"{self.workdir} holds no checkpoints ({self.directory.name}/ is empty)"
        if any(TMP_MARKER in name for name in entries):
            return (f"{self.workdir} holds only a half-written checkpoint ({entries[0]}): the run was "
                    "stopped during its first save")
        listed = ", ".join(entries[:3])
        return f"{self.workdir} holds no jaxnorm checkpoints ({self.directory.name}/ has {listed})"

    # -- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save; `wait()` before relying on it. The meta gets the state's checksums."""
        self.wait()  # a failure of the previous save is reported as that step's
        meta = {**meta, "checksums": tree_checksums(state)}
        with self.saving(step):
            self._pending = step
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=metrics, force=True)

    def wait(self) -> None:
        if self._pending is None:
            return
        with self.saving(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    @contextlib.contextmanager
    def saving(self, step: int):
        """Turn any failure inside into a one-line CheckpointSaveError naming `step` and the last good
        checkpoint (also for files written beside the checkpoints, such as metrics.json)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # Orbax and TensorStore raise many types for a failed write
            self._failed, self._pending = True, None
            good = self.complete_steps_on_disk()
            last = (f"the last good checkpoint is step {good[-1]}" if good
                    else "no checkpoint was saved before it")
            raise CheckpointSaveError(
                f"could not save step {step} in {self.directory}: {failure_cause(e, _short(e))}; {last} "
                "(fix the cause, then continue with --resume)") from None

    def complete_steps_on_disk(self) -> list[int]:
        """Steps whose save finished (Orbax renames a finished save to its step number)."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        except OSError:
            return []

    def restore_meta(self, step: int) -> dict:
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is not a jaxnorm training "
                                  "checkpoint (its meta lacks the config and history)")
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at `step`, placed as `abstract_state`'s shardings say (so it loads on any hardware),
        checked against the checksums saved with it."""
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                                 meta=ocp.args.JsonRestore())
        state, meta = restored["state"], restored["meta"]
        saved = meta.get("checksums") if isinstance(meta, dict) else None
        if saved is not None:  # checkpoints written before checksums existed are taken as they are
            now = tree_checksums(state)
            bad = [k for k in saved if now.get(k) != saved[k]] + [k for k in now if k not in saved]
            if bad:
                raise UnreadableCheckpoint(
                    f"checkpoint step {step} in {self.directory} is damaged: {len(bad)} "
                    f"of {len(saved)} arrays differ from what was saved ({bad[0]})")
        return state, meta

    # -- falling back past unreadable checkpoints ----------------------------------------------
    def _candidates(self, prefer: int | None) -> list[int]:
        newest_first = sorted(self.all_steps(), reverse=True)
        return ([prefer] if prefer is not None else []) + [s for s in newest_first if s != prefer]

    def _fallback(self, load: Callable[[int], Any], prefer: int | None):
        """(step, load(step)) for the first candidate that loads; one warning line per skipped step."""
        skipped = []
        for step in self._candidates(prefer):
            try:
                value = load(step)
            except UnreadableCheckpoint as e:
                skipped.append((step, str(e)))
                continue
            for bad, why in skipped:
                if bad not in self._warned:
                    self._warned.add(bad)
                    print(f"warning: {why}; skipped it (left in place), using step {step}", file=sys.stderr)
            if not self.read_only:
                self._move_aside([bad for bad, _ in skipped if bad > step])
            return step, value
        if not skipped:
            raise CheckpointError(self._why_no_steps())
        raise CheckpointError(f"no readable checkpoint in {self.directory}: steps "
                              f"{', '.join(str(s) for s, _ in skipped)} are unreadable ({skipped[0][1]}); "
                              f"move {self.directory} aside to start the run again")

    def readable_meta(self, prefer: int | None = None) -> tuple[int, dict]:
        """(step, meta) of `prefer` or else the newest checkpoint whose record reads."""
        return self._fallback(self.restore_meta, prefer)

    def restore_readable(self, abstract_state: Any, prefer: int | None = None) -> tuple[int, Any, dict]:
        """(step, state, meta) of `prefer` or else the newest checkpoint that reads and verifies.
        `abstract_state` is the restore target, or a function of the checkpoint's meta giving it."""
        def load(step):
            target = abstract_state(self.restore_meta(step)) if callable(abstract_state) else abstract_state
            return self.restore(step, target)
        step, (state, meta) = self._fallback(load, prefer)
        return step, state, meta

    def _move_aside(self, steps: list[int]) -> None:
        """Move unreadable checkpoints out of Orbax's sight (to <workdir>/unreadable/), so training can
        save those steps again; they are kept for inspection."""
        if not steps:
            return
        aside = self.directory.parent / "unreadable"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            if target.exists():
                target = aside / f"{step}-{os.getpid()}"
            shutil.move(str(self.directory / str(step)), str(target))
            print(f"note: moved the unreadable checkpoint step {step} to {target}", file=sys.stderr)
        self.manager.reload()

    def _restore(self, step: int, **items):
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(have: {self.all_steps() or 'none'})")
        if any(not (self.directory / str(step) / name).is_dir() for name in items):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is not a jaxnorm training "
                                  f"checkpoint (it lacks {' or '.join(items)}/)")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for unreadable data; say it in the user's terms
            cause = failure_cause(e, "its files are damaged or incomplete")
            raise UnreadableCheckpoint(
                f"checkpoint step {step} in {self.directory} is unreadable ({cause})") from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:  # after a reported failure, closing may fail the same way: said already
                    raise


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _host_copy(leaf) -> np.ndarray:
    """The bytes this process holds of `leaf` (every array of the state is replicated)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(jax.device_get(leaf))


def tree_checksums(tree: Any) -> dict[str, str]:
    """{path: 'dtype shape crc32'} for every array leaf of `tree`, from this process's host copy."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        a = _host_copy(leaf)
        out[jax.tree_util.keystr(path)] = f"{a.dtype} {list(a.shape)} {zlib.crc32(a.tobytes()):08x}"
    return out


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
        why = e.strerror or e
        raise CheckpointError(f"--workdir {workdir} is not writable ({why} in {existing})") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--workdir {workdir} is not writable (no write permission on {existing})")


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` with every leaf placed by `sharding`: the target of a restore."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), tree)
