"""Training: the compiled train step, the epoch order and the epoch loop, with resume and interruption.

    from jaxnorm.config import Config
    from jaxnorm.train import train_and_evaluate
    train_and_evaluate(Config(norm="gn"), "checkpoints/gn")

The dataset lives on the devices for the whole run. Each epoch draws a permutation on the device;
each step gathers its batch from it, augments it and updates the state inside a compiled call of
`--steps-per-call` steps (one on CPU, the whole epoch on GPUs and TPUs: `compiled_train_calls`).

`train_and_evaluate` starts or resumes the run (`_start_or_resume`), then trains epoch after epoch
(`_train_epoch`); the interruption path and the partial epoch it leaves have a section of their own.

Interruptions: SIGINT/SIGTERM finish the current call, save a (mid-epoch) checkpoint and raise
`TrainingInterrupted`; the checkpoint's meta carries the partial epoch's per-step losses and correct
count, so a resumed run ends with exactly the metrics of an uninterrupted one. A non-finite loss
raises `TrainingError` without saving the bad state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxnorm import parallel
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, abstract_like, check_writable_workdir
from jaxnorm.config import IDENTITY, Config, ConfigError
from jaxnorm.data import Dataset, alternating_flips, augment, first_train_images, load_dataset
from jaxnorm.evaluate import format_summary, logit_metrics, make_predict, network_name, summarize
from jaxnorm.models import build_model, count_params, l1_penalty, model_summary
from jaxnorm.runlock import holding_run_lock
from jaxnorm.state import TrainState, create_train_state, learning_rate_schedule
from jaxnorm.utils import write_json


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, a run folder in the way, ...)."""


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`, and `--resume` continues from it."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


# ----------------------------------------------------------------------------------------------
# Compiled steps.


def _step_key(config: Config, purpose: int, index) -> jax.Array:
    """A key that depends only on the seed, a purpose tag and an index: resuming replays it exactly."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), purpose), index)


def train_step_fn(config: Config, mesh) -> Callable:
    """The pure training step, to jit or to scan: train_step(state, images, labels, order, i) ->
    (state, metrics), one update on batch `order[i]` of the device-resident `images`, augmented."""
    batch_sharding = parallel.data_sharded(mesh)

    def train_step(state: TrainState, images, labels, order, i):
        idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
        x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
        y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)
        aug_key, dropout_key = jax.random.split(_step_key(config, 1, state.step))
        flip_mask = None
        if config.alternate_flips:  # Config.validate refuses it without --flip
            epoch = state.step // order.shape[0]  # order: (steps per epoch, batch)
            flip_mask = alternating_flips(_step_key(config, 2, 0), images.shape[0], idx, epoch)
        x = augment(x, aug_key, flip=config.flip, flip_mask=flip_mask, rotate_degrees=config.rotate,
                    crop_padding=config.crop_padding if config.crop else 0, cutout=config.cutout)

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                             train=True, rngs={"dropout": dropout_key},
                                             mutable=["batch_stats"])
            loss = cross_entropy(logits, y, config.label_smoothing).mean()
            l1 = config.l1 * l1_penalty(params) if config.l1 else jnp.zeros(())  # --l1: on conv kernels
            return loss + l1, (loss, l1, logits, updates.get("batch_stats", {}))

        (_, (loss, l1, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        # "loss" is the cross-entropy alone (comparable with the test loss); "l1" the penalty added to it.
        metrics = {"loss": loss, "l1": l1, "correct": jnp.sum(jnp.argmax(logits, -1) == y)}
        return state, metrics

    return train_step


def compiled_train_step(config: Config, mesh) -> Callable:
    """`train_step_fn` compiled for the mesh (the state donated): one step per call."""
    rep = parallel.replicated(mesh)
    return jax.jit(train_step_fn(config, mesh), in_shardings=(rep, rep, rep, rep, None),
                   out_shardings=(rep, rep), donate_argnums=(0,))


def compiled_train_calls(config: Config, mesh, steps_per_call: int,
                         train_step: Callable | None = None) -> Callable:
    """train_calls(state, images, labels, order, start) -> (state, losses, correct, n): the next
    n = min(steps_per_call, steps left) steps of the epoch `order` from step `start`, as ONE compiled
    call (`lax.scan`); a shorter tail of the epoch runs step by step. `losses` holds each step's loss,
    `correct` the summed count: the same updates as `train_step` step by step. `train_step` is the
    single step (default `compiled_train_step`; e.g. one compiled ahead of time to time compilation).
    On a GPU or TPU one call per epoch keeps the device busy without Python dispatching 390 steps."""
    train_step = train_step or compiled_train_step(config, mesh)

    def one_step(state, images, labels, order, start):
        state, metrics = train_step(state, images, labels, order, start)
        return state, metrics["loss"][None], metrics["correct"], 1

    if steps_per_call == 1:
        return one_step
    step_fn = train_step_fn(config, mesh)
    # XLA:CPU runs convolutions inside a loop (or cond) body 15-30x slower than at the top level
    # (benchmarks/NOTES.md): there the loop is unrolled into straight-line code.
    unroll = jax.devices()[0].platform == "cpu"

    def steps_fn(state, images, labels, order, start):
        def body(state, i):
            state, metrics = step_fn(state, images, labels, order, i)
            return state, (metrics["loss"], metrics["correct"])
        state, (losses, correct) = jax.lax.scan(body, state, start + jnp.arange(steps_per_call),
                                                unroll=unroll)
        return state, losses, jnp.sum(correct)

    rep = parallel.replicated(mesh)
    compiled = jax.jit(steps_fn, in_shardings=(rep, rep, rep, rep, None), out_shardings=(rep, rep, rep),
                       donate_argnums=(0,))

    def train_calls(state, images, labels, order, start):
        if len(order) - start < steps_per_call:
            return one_step(state, images, labels, order, start)
        return (*compiled(state, images, labels, order, start), steps_per_call)
    return train_calls


def epoch_call_results(train_calls, state, images, labels, order, start: int = 0,
                       end: int | None = None):
    """Run steps `start`..`end` (default: the epoch's last) of the epoch `order` in calls of
    `train_calls` (see compiled_train_calls), at most `parallel.MAX_CALLS_IN_FLIGHT` calls queued;
    yields each call's (state, losses, correct, done), `done` the steps of the epoch taken so far."""
    end = len(order) if end is None else end

    def calls(state, done):
        while done < end:
            state, losses, correct, n = train_calls(state, images, labels, order, done)
            done += n
            yield state, losses, correct, done

    return parallel.limit_in_flight(calls(state, start), output=lambda call: call[1])


def seconds_per_step(train_calls, state, images, labels, order, steps: int, repeats: int,
                     warmup: int = 1):
    """Median seconds per step over `repeats` runs of the epoch's first `steps` steps, in calls of
    `train_calls` as training makes them; `warmup` steps first (they absorb compilation). Returns
    (seconds, state)."""
    def run(state, n):
        for call in epoch_call_results(train_calls, state, images, labels, order, 0, n):
            state, losses = call[0], call[1]
        jax.block_until_ready((state, losses))
        return state

    state = run(state, warmup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = run(state, steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps, state


def steps_per_call(config: Config, steps_per_epoch: int) -> int:
    """config.steps_per_call, or by default 1 on CPU (a signal stops within a step) and the whole epoch
    on GPUs and TPUs."""
    if config.steps_per_call is not None:
        return min(config.steps_per_call, steps_per_epoch)
    return 1 if jax.devices()[0].platform == "cpu" else steps_per_epoch


def make_epoch_order(config: Config, mesh, num_examples: int):
    """epoch_order(epoch) -> (steps, batch) indices: a fresh permutation, the remainder dropped."""
    steps = num_examples // config.batch_size

    @jax.jit
    def order(epoch):
        perm = jax.random.permutation(_step_key(config, 0, epoch), num_examples)
        return perm[: steps * config.batch_size].reshape(steps, config.batch_size)

    return lambda epoch: jax.device_put(order(epoch), parallel.replicated(mesh))


# ----------------------------------------------------------------------------------------------
# Run setup: what training, the batch-size sweep's step timing and the benchmark put on the devices.


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """A fresh run on the devices, as `setup_run` makes it."""

    mesh: jax.sharding.Mesh
    model: nn.Module
    state: TrainState  # freshly initialised (seed `config.seed`), replicated
    images: jax.Array  # the training set, replicated: each step gathers its batch on the devices
    labels: jax.Array
    steps_per_epoch: int
    input_mean: tuple  # the training images' per-channel statistics, in [0, 1] units, that the model
    input_std: tuple   # normalises its input with


def setup_run(config: Config, dataset: Dataset) -> RunSetup:
    """The mesh for `config.batch_size`, the model (with the training images' channel statistics and the
    dataset's class count), its initial train state and the training set, put on the devices."""
    mesh = parallel.make_mesh(config.batch_size)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    input_mean, input_std = dataset.channel_stats()
    model = build_model(config, input_mean, input_std, num_classes=len(dataset.class_names))
    state = create_train_state(model, config, dataset.image_shape, steps_per_epoch, dataset.train_images)
    return RunSetup(mesh, model, jax.device_put(state, parallel.replicated(mesh)),
                    images=parallel.put_replicated(dataset.train_images, mesh),
                    labels=parallel.put_replicated(dataset.train_labels, mesh),
                    steps_per_epoch=steps_per_epoch, input_mean=input_mean, input_std=input_std)


# ----------------------------------------------------------------------------------------------
# The run.


@holding_run_lock  # one process per run folder, taken before anything is written
def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False,
                       dataset: Dataset | None = None, progress: bool = True) -> dict:
    """Train `config` in `workdir` (checkpoints, metrics.json), evaluating on the test set every epoch.

    Returns {'state', 'history', 'num_params', 'summary'}.
    """
    config.validate()
    if config.data_dir:  # recorded in the run folder: readers may start from another directory
        config = config.replace(data_dir=os.path.abspath(os.path.expanduser(config.data_dir)))
    workdir = Path(workdir)
    check_writable_workdir(workdir)
    dataset = dataset or load_dataset(config.dataset, config.data_dir, train_split=config.train_split)
    dataset = first_train_images(dataset, config.train_images)
    if config.batch_size > len(dataset.train_images):  # before the run folder is created
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(dataset.train_images)} "
                          "training images")
    with contextlib.closing(RunCheckpoints(workdir)) as checkpoints:  # close: finish a save in flight
        latest = _existing_run(checkpoints, config, resume)  # refused before anything is built
        run = _start_or_resume(config, workdir, dataset, checkpoints, latest)
        with stop_requests() as stop:
            for epoch in range(int(run.state.step) // run.steps_per_epoch, config.epochs):
                # A signal that arrived after an epoch's last step: that epoch is saved.
                if stop.agreed(sync_point=True) is not None:
                    raise _interrupted(run, stop.decided)
                _train_epoch(run, epoch, stop, progress)
    summary = summarize(run.history, run.num_params, config.evaluation_set)
    print(format_summary(config.norm, summary))
    return {"state": run.state, "history": run.history, "num_params": run.num_params, "summary": summary}


@dataclasses.dataclass
class _Run:
    """What the epochs share: the run's settings and progress, its data on the devices, compiled steps."""

    config: Config
    workdir: Path
    checkpoints: RunCheckpoints
    dataset: Dataset
    steps_per_epoch: int
    state: TrainState
    history: list[dict]
    partial: dict | None  # the interrupted epoch's {'epoch', 'losses', 'correct'} when resuming mid-epoch
    meta: dict  # saved with every checkpoint (with the history)
    num_params: int
    images: jax.Array
    labels: jax.Array
    train_calls: Callable  # compiled_train_calls(config, mesh, steps_per_call)
    steps_per_call: int
    epoch_order: Callable
    predict: Callable
    schedule: optax.Schedule
    devices: str  # parallel.describe_devices: recorded with each epoch


def _existing_run(checkpoints: RunCheckpoints, config: Config, resume: bool) -> int | None:
    """The latest step of the run in the folder (None if none), checked to be resumable as `config`."""
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise TrainingError(f"{checkpoints.workdir} already holds a run (step {latest}): pass --resume to "
                            "continue it or choose another --workdir")
    if latest is None and resume:
        print(f"note: {checkpoints.workdir} holds no checkpoint yet: starting a new run")
    if latest is not None:
        latest, saved = checkpoints.readable_meta()  # skips (with a warning) checkpoints that cannot be read
        check_same_run(config, Config.from_dict(saved["config"]))
    return latest


def _start_or_resume(config: Config, workdir: Path, dataset: Dataset, checkpoints: RunCheckpoints,
                     latest: int | None) -> _Run:
    """A fresh state, or the one at step `latest`; the data put on the devices and the steps compiled."""
    num_train = len(dataset.train_images)
    steps_per_epoch = num_train // config.batch_size
    saved = checkpoints.restore_meta(latest) if latest is not None else {}
    if saved.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise ConfigError(f"cannot resume: {saved['steps_per_epoch']} steps per epoch were saved, this "
                          f"config gives {steps_per_epoch} (another --batch-size or training set?)")

    setup = setup_run(config, dataset)
    mesh, model, state = setup.mesh, setup.model, setup.state
    num_params = count_params(state.params)
    history, partial = [], None
    if latest is None:
        print(model_summary(model, dataset.image_shape))  # once per run folder, not on every resume
    else:
        latest, state, saved = checkpoints.restore_readable(abstract_like(state, parallel.replicated(mesh)))
        history, partial = saved["history"], saved.get("partial")
        # The checkpoint is the truth: drop epochs a kill left in metrics.json but not in a checkpoint.
        if jax.process_index() == 0:
            write_json(workdir / "metrics.json", history)
        where = f" + {len(partial['losses'])}/{steps_per_epoch} steps" if partial else ""
        print(f"resumed {workdir} at step {int(state.step)} (epoch {len(history)}{where})")
    print(f"{network_name(config)} | {num_params:,} parameters | {num_train} train / "
          f"{len(dataset.test_images)} test images from {dataset.source} | "
          f"{parallel.describe_devices(mesh)} | layers: {model.layer_description}")
    print(f"recipe: {config.recipe()}")  # a norm may have its own (config.NORM_DEFAULTS)
    meta = {"config": config.to_dict(), "input_mean": setup.input_mean, "input_std": setup.input_std,
            "num_params": num_params, "class_names": list(dataset.class_names),
            "image_shape": list(dataset.image_shape), "data_source": dataset.source,
            "steps_per_epoch": steps_per_epoch}
    per_call = steps_per_call(config, steps_per_epoch)
    return _Run(config, workdir, checkpoints, dataset, steps_per_epoch, state, history, partial, meta,
                num_params, images=setup.images, labels=setup.labels,
                train_calls=compiled_train_calls(config, mesh, per_call), steps_per_call=per_call,
                epoch_order=make_epoch_order(config, mesh, num_train),
                predict=make_predict(mesh, config.eval_batch_size),
                schedule=learning_rate_schedule(config, steps_per_epoch),
                devices=parallel.describe_devices(mesh))


def _train_epoch(run: _Run, epoch: int, stop: stop_requests, progress: bool) -> None:
    """Train `epoch` (from where a resumed run stopped in it), evaluate, save, append to the history."""
    config, steps = run.config, run.steps_per_epoch
    first = int(run.state.step) - epoch * steps  # steps of this epoch already taken (resuming mid-epoch)
    losses, corrects = _partial_epoch_metrics(run, epoch, first)
    order = run.epoch_order(epoch)
    start = time.perf_counter()
    bar = tqdm(desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, initial=first, total=steps,
               unit="step", disable=not progress or jax.process_index() != 0)
    bar_sums, fetched = [0.0, 0], [len(losses), len(corrects)]  # the bar's loss and correct sums; read so far
    previous = first
    calls = epoch_call_results(run.train_calls, run.state, run.images, run.labels, order, first)
    for run.state, call_losses, call_correct, done in calls:
        losses.append(call_losses)
        corrects.append(call_correct)
        bar.update(done - previous)
        previous = done
        # Sync points, the same on every host: each call's end, or every 10th step of one-step calls.
        sync = run.steps_per_call > 1 or done % 10 == 0 or done == steps
        stop_now = stop.agreed(sync_point=sync)
        if stop_now is not None and done < steps:
            _save_partial_epoch_and_stop(run, epoch, losses, corrects, stop_now)
        if sync and not bar.disable:  # fetch only what the bar has not seen: the queue stays full
            bar_sums[0] += float(_concatenate(losses[fetched[0]:]).sum())
            bar_sums[1] += int(np.sum(jax.device_get(corrects[fetched[1]:])))
            fetched = [len(losses), len(corrects)]
            bar.set_postfix(loss=f"{bar_sums[0] / (done - first):.3f}",
                            acc=f"{bar_sums[1] / ((done - first) * config.batch_size):.2%}",
                            img_s=f"{(done - first) * config.batch_size / (time.perf_counter() - start):.0f}")
    step_losses = _concatenate(losses)
    seconds = time.perf_counter() - start
    check_finite(step_losses, epoch, steps, run.checkpoints, run.workdir)
    test = logit_metrics(run.predict(run.state, run.dataset.test_images), run.dataset.test_labels)
    record = {"epoch": epoch + 1, "step": int(run.state.step),
              "lr": float(run.schedule(epoch * steps)),
              "train_loss": float(step_losses.mean()),
              # The --l1 penalty at the epoch's end (0 without --l1), kept apart from train_loss.
              "train_l1": config.l1 * float(l1_penalty(run.state.params)),
              "train_accuracy": int(np.sum(jax.device_get(corrects))) / (steps * config.batch_size),
              "test_loss": test["loss"], "test_accuracy": test["accuracy"],
              "seconds": seconds,
              "images_per_second": (steps - first) * config.batch_size / seconds,
              "devices": run.devices}
    run.history.append(record)
    run.checkpoints.save(int(run.state.step), run.state, {**run.meta, "history": run.history},
                         metrics={"test_accuracy": record["test_accuracy"]})
    if jax.process_index() == 0:  # one writer in a multi-host job; Orbax coordinates checkpoints
        with run.checkpoints.saving(int(run.state.step)):  # a full disk: one line, as for the checkpoint
            write_json(run.workdir / "metrics.json", run.history)
    # The lr from the epoch's first step to its last (epoch 1 of a warm-up starts at 0).
    lr_range = f"{record['lr']:.4g} -> {float(run.schedule(epoch * steps + steps - 1)):.4g}"
    tqdm.write(f"epoch {epoch + 1:3d} | lr {lr_range} | train loss {record['train_loss']:.4f} "
               f"acc {record['train_accuracy']:.2%} | {config.evaluation_set} loss {record['test_loss']:.4f} "
               f"acc {record['test_accuracy']:.2%} | {record['images_per_second']:.0f} img/s "
               f"| {seconds:.1f}s")


# ----------------------------------------------------------------------------------------------
# Interruption: a mid-epoch checkpoint carries the partial epoch's metrics, and a resume picks them up.


def _concatenate(losses: list) -> np.ndarray:
    """The per-step losses of an epoch, from the calls' arrays (and a resumed epoch's host floats)."""
    return np.concatenate([np.atleast_1d(x) for x in jax.device_get(losses)]).astype(np.float32)


def _save_partial_epoch_and_stop(run: _Run, epoch: int, losses: list, corrects: list, signum: int) -> None:
    step_losses = _concatenate(losses)
    check_finite(step_losses, epoch, run.steps_per_epoch, run.checkpoints, run.workdir)
    partial = {"epoch": epoch, "losses": [float(x) for x in step_losses],
               "correct": int(np.sum(jax.device_get(corrects)))}
    run.checkpoints.save(int(run.state.step), run.state,
                         {**run.meta, "history": run.history, "partial": partial})
    run.checkpoints.wait()
    raise _interrupted(run, signum)


def _partial_epoch_metrics(run: _Run, epoch: int, first: int) -> tuple[list, list]:
    """The per-step losses and correct count of the `first` steps already taken in `epoch`."""
    if not first:
        return [], []
    partial = run.partial
    if not partial or partial["epoch"] != epoch or len(partial["losses"]) != first:
        raise CheckpointError(f"the checkpoint at step {int(run.state.step)} in {run.workdir} lacks the "
                              "metrics of its partial epoch")
    return [np.float32(x) for x in partial["losses"]], [partial["correct"]]


def _interrupted(run: _Run, signum: int) -> TrainingInterrupted:
    step = int(run.state.step)
    epoch, index = divmod(step, run.steps_per_epoch)
    when = f"after epoch {epoch}" if index == 0 else f"at epoch {epoch + 1}"
    return TrainingInterrupted(f"{signal.Signals(signum).name} {when}, step {step}: saved a checkpoint at "
                               f"step {step} in {run.workdir}", signum, step)


def check_finite(step_losses: np.ndarray, epoch: int, steps_per_epoch: int, checkpoints: RunCheckpoints,
                 workdir: Path) -> None:
    """TrainingError naming the first non-finite step; called before any save, so none is bad."""
    if np.all(np.isfinite(step_losses)):
        return
    bad = int(np.argmax(~np.isfinite(step_losses)))
    checkpoints.wait()
    last = checkpoints.latest_step()
    kept = (f"the last good checkpoint is step {last} in {workdir}" if last is not None
            else "no checkpoint was saved")
    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {epoch * steps_per_epoch + bad + 1}; "
                        f"{kept} (try a lower --lr)")


class stop_requests:
    """Within `with stop_requests() as stop:`, SIGINT/SIGTERM set `stop.signum` instead of killing the
    process (a second one raises KeyboardInterrupt at once); the previous handlers come back on exit.
    Only the main thread can own signal handlers: elsewhere this does nothing.

    Several processes (multi-host): a signal may reach one host only, and a save every host does not
    join hangs. So the stop is agreed: `agreed(sync_point)` takes the max of every process's signal at
    the sync points (every 10th step and each epoch's last, the same on all hosts), and all stop and
    save at the same step. On one process it answers at once, every step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.decided, self._previous = None, None, {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def agreed(self, sync_point: bool) -> int | None:
        """The signal every process stops on (None: go on); see the class docstring."""
        if jax.process_count() == 1:
            self.decided = self.signum
        elif sync_point:
            self.decided = parallel.max_over_processes(self.signum or 0) or None
        return self.decided

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def check_same_run(config: Config, saved: Config) -> None:
    """ConfigError naming every identity field (see `Config`) that differs from the saved run."""
    diffs = [f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in Config.fields_with_role(IDENTITY)
             if getattr(config, k) != getattr(saved, k)]
    if diffs:
        raise ConfigError("cannot resume: the config contradicts the saved run (" + ", ".join(diffs) + ")")
