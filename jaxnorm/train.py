"""Training: TrainState with batch_stats, the compiled train/predict steps and the epoch loop.

    from jaxnorm.config import Config
    from jaxnorm.train import train_and_evaluate
    train_and_evaluate(Config(norm="gn"), "checkpoints/gn")

The dataset lives on the devices for the whole run. Each epoch draws a permutation on the device;
each step gathers its batch from it, augments it and updates the state inside one compiled call.

Interruptions: SIGINT/SIGTERM finish the current step, save a (mid-epoch) checkpoint and raise
`TrainingInterrupted`; the checkpoint's meta carries the partial epoch's per-step losses and correct
count, so a resumed run ends with exactly the metrics of an uninterrupted one. A non-finite loss
raises `TrainingError` without saving the bad state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from jaxnorm import parallel
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, abstract_like, check_writable_workdir
from jaxnorm.config import Config, ConfigError
from jaxnorm.data import Dataset, augment, first_train_images, load_dataset
from jaxnorm.models import build_model, count_params, init_variables, l1_penalty
from jaxnorm.runlock import holding_run_lock

# Fields that define the model and data of a run: resuming with another value is refused.
RUN_IDENTITY = ("norm", "groups", "width", "transition_width", "skip", "dataset", "train_split", "train_images")


class TrainState(train_state.TrainState):
    batch_stats: Any = None  # BatchNorm running statistics; an empty dict for GN and LN


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, a run folder in the way, ...)."""


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`, and `--resume` continues from it."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


# ----------------------------------------------------------------------------------------------
# State and optimizer.


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """step: lr * gamma ** (epoch // lr_step_epochs), as torch's StepLR. linear / cosine: a linear
    warm-up over warmup_epochs, then a linear or cosine decay that reaches 0 at the last step."""
    if config.schedule == "step":
        return optax.exponential_decay(config.lr, transition_steps=config.lr_step_epochs * steps_per_epoch,
                                       decay_rate=config.lr_gamma, staircase=True)
    total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    decay = (optax.cosine_decay_schedule(config.lr, total - warmup) if config.schedule == "cosine" else
             optax.linear_schedule(config.lr, 0.0, total - warmup))
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    # Weight decay added to the gradient before momentum, as torch.optim.SGD(weight_decay=...).
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                                 nesterov=config.nesterov))


def create_train_state(model: nn.Module, config: Config, image_shape, steps_per_epoch: int) -> TrainState:
    variables = init_variables(model, image_shape, seed=config.seed)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}),
                             tx=make_optimizer(config, steps_per_epoch))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


# ----------------------------------------------------------------------------------------------
# Compiled steps.


def _step_key(config: Config, purpose: int, index) -> jax.Array:
    """A key that depends only on the seed, a purpose tag and an index: resuming replays it exactly."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), purpose), index)


def make_train_step(config: Config, mesh):
    """train_step(state, images, labels, order, i) -> (state, metrics) for batch `order[i]`."""
    batch_sharding = parallel.data_sharded(mesh)

    def train_step(state: TrainState, images, labels, order, i):
        idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
        x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
        y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)
        aug_key, dropout_key = jax.random.split(_step_key(config, 1, state.step))
        x = augment(x, aug_key, flip=config.flip, crop_padding=4 if config.crop else 0)

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

    rep = parallel.replicated(mesh)
    return jax.jit(train_step, in_shardings=(rep, rep, rep, rep, None), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def make_epoch_order(config: Config, mesh, num_examples: int):
    """epoch_order(epoch) -> (steps, batch) indices: a fresh permutation, the remainder dropped."""
    steps = num_examples // config.batch_size

    @jax.jit
    def order(epoch):
        perm = jax.random.permutation(_step_key(config, 0, epoch), num_examples)
        return perm[: steps * config.batch_size].reshape(steps, config.batch_size)

    return lambda epoch: jax.device_put(order(epoch), parallel.replicated(mesh))


def make_predict(mesh, batch_size: int):
    """predict(state, images) -> float32 logits for every image (uint8 host or device array)."""
    batch_size = math.ceil(batch_size / mesh.devices.size) * mesh.devices.size
    rep, shard = parallel.replicated(mesh), parallel.data_sharded(mesh)

    @functools.partial(jax.jit, out_shardings=rep)  # replicated: every host can read all logits
    def logits_of(state, x):
        x = jax.lax.with_sharding_constraint(x, shard)
        return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)

    def predict(state: TrainState, images) -> np.ndarray:
        n = len(images)
        padded = np.zeros((math.ceil(n / batch_size) * batch_size, *images.shape[1:]), images.dtype)
        padded[:n] = np.asarray(images)
        chunks = [logits_of(state, jax.device_put(padded[i:i + batch_size], shard))
                  for i in range(0, len(padded), batch_size)]
        return np.concatenate(jax.device_get(chunks))[:n]

    return predict


def logit_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Mean cross-entropy and accuracy of `logits` against `labels`."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return {"loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "accuracy": float((logits.argmax(-1) == labels).mean())}


# ----------------------------------------------------------------------------------------------
# The run.


@holding_run_lock  # one process per run folder, taken before anything is written
def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False,
                       dataset: Optional[Dataset] = None, progress: bool = True) -> dict:
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
    num_train = len(dataset.train_images)
    if config.batch_size > num_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {num_train} training images")
    mesh = parallel.make_mesh(config.batch_size)

    steps_per_epoch = num_train // config.batch_size

    # Refuse a run folder in the way or a contradicting resume before building anything.
    checkpoints = RunCheckpoints(workdir)
    history: list[dict] = []
    partial = None  # the interrupted epoch's {'epoch', 'losses', 'correct'} when resuming mid-epoch
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise TrainingError(f"{workdir} already holds a run (step {latest}): pass --resume to continue it "
                            "or choose another --workdir")
    if latest is None and resume:
        print(f"note: {workdir} holds no checkpoint yet: starting a new run")
    if latest is not None:
        latest, saved = checkpoints.readable_meta()  # skips (with a warning) checkpoints that cannot be read
        check_same_run(config, Config.from_dict(saved["config"]))
        if saved.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise ConfigError(f"cannot resume: {saved['steps_per_epoch']} steps per epoch were saved, this "
                              f"config gives {steps_per_epoch} (another --batch-size or training set?)")

    input_mean, input_std = dataset.channel_stats()
    model = build_model(config, input_mean, input_std, num_classes=len(dataset.class_names))
    state = create_train_state(model, config, dataset.image_shape, steps_per_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    num_params = count_params(state.params)
    if latest is not None:
        latest, state, saved = checkpoints.restore_readable(abstract_like(state, parallel.replicated(mesh)))
        history, partial = saved["history"], saved.get("partial")
        # The checkpoint is the truth: drop epochs a kill left in metrics.json but not in a checkpoint.
        if jax.process_index() == 0:
            write_json(workdir / "metrics.json", history)
        where = f" + {len(partial['losses'])}/{steps_per_epoch} steps" if partial else ""
        print(f"resumed {workdir} at step {int(state.step)} (epoch {len(history)}{where})")
    meta = {"config": config.to_dict(), "input_mean": input_mean, "input_std": input_std,
            "num_params": num_params, "class_names": list(dataset.class_names),
            "image_shape": list(dataset.image_shape), "data_source": dataset.source,
            "steps_per_epoch": steps_per_epoch}

    from jaxnorm.report import model_summary  # lazy: report imports this module
    print(model_summary(model, dataset.image_shape))
    print(f"{config.norm} | {num_params:,} parameters | {num_train} train / {len(dataset.test_images)} test "
          f"images from {dataset.source} | {mesh.devices.size} x {jax.devices()[0].platform} device(s)")

    images = parallel.put_replicated(dataset.train_images, mesh)
    labels = parallel.put_replicated(dataset.train_labels, mesh)
    train_step = make_train_step(config, mesh)
    epoch_order = make_epoch_order(config, mesh, num_train)
    predict = make_predict(mesh, config.eval_batch_size)
    schedule = learning_rate_schedule(config, steps_per_epoch)

    def interrupted(signum: int) -> TrainingInterrupted:
        step = int(state.step)
        epoch, index = divmod(step, steps_per_epoch)
        when = f"after epoch {epoch}" if index == 0 else f"at epoch {epoch + 1}"
        return TrainingInterrupted(f"{signal.Signals(signum).name} {when}, step {step}: saved a checkpoint at "
                                   f"step {step} in {workdir}", signum, step)

    start_epoch, start_index = divmod(int(state.step), steps_per_epoch)
    with contextlib.closing(checkpoints), stop_requests() as stop:  # close: finish a save in flight
        for epoch in range(start_epoch, config.epochs):
            if stop.agreed(sync_point=True) is not None:  # arrived after an epoch's last step: it is saved
                raise interrupted(stop.decided)
            first = start_index if epoch == start_epoch else 0
            losses, corrects = [], []
            if first:  # resuming mid-epoch: the steps already taken count towards this epoch's metrics
                if not partial or partial["epoch"] != epoch or len(partial["losses"]) != first:
                    raise CheckpointError(f"the checkpoint at step {int(state.step)} in {workdir} lacks the "
                                          "metrics of its partial epoch")
                losses, corrects = [np.float32(x) for x in partial["losses"]], [partial["correct"]]
            order = epoch_order(epoch)
            start = time.perf_counter()
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       initial=first, total=steps_per_epoch, unit="step",
                       disable=not progress or jax.process_index() != 0)
            for i in bar:
                state, metrics = train_step(state, images, labels, order, i)
                losses.append(metrics["loss"])
                corrects.append(metrics["correct"])
                stop_now = stop.agreed(sync_point=(i + 1) % 10 == 0 or i + 1 == steps_per_epoch)
                if stop_now is not None and i + 1 < steps_per_epoch:  # save mid-epoch and stop
                    step_losses = np.asarray(jax.device_get(losses))
                    check_finite(step_losses, epoch, steps_per_epoch, checkpoints, workdir)
                    partial = {"epoch": epoch, "losses": [float(x) for x in step_losses],
                               "correct": int(np.sum(jax.device_get(corrects)))}
                    checkpoints.save(int(state.step), state, {**meta, "history": history, "partial": partial})
                    checkpoints.wait()
                    raise interrupted(stop_now)
                if (i + 1) % 10 == 0 or i + 1 == steps_per_epoch:  # sync rarely: keeps the device queue full
                    seen = (i + 1) * config.batch_size
                    bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.3f}",
                                    acc=f"{int(np.sum(jax.device_get(corrects))) / seen:.2%}",
                                    img_s=f"{(seen - first * config.batch_size) / (time.perf_counter() - start):.0f}")
            step_losses = np.asarray(jax.device_get(losses))
            seconds = time.perf_counter() - start
            check_finite(step_losses, epoch, steps_per_epoch, checkpoints, workdir)
            test = logit_metrics(predict(state, dataset.test_images), dataset.test_labels)
            record = {"epoch": epoch + 1, "step": int(state.step),
                      "lr": float(schedule(epoch * steps_per_epoch)),
                      "train_loss": float(step_losses.mean()),
                      # The --l1 penalty at the epoch's end (0 without --l1), kept apart from train_loss.
                      "train_l1": config.l1 * float(l1_penalty(state.params)),
                      "train_accuracy": int(np.sum(jax.device_get(corrects))) / (steps_per_epoch * config.batch_size),
                      "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                      "seconds": seconds,
                      "images_per_second": (steps_per_epoch - first) * config.batch_size / seconds}
            history.append(record)
            checkpoints.save(int(state.step), state, {**meta, "history": history},
                             metrics={"test_accuracy": record["test_accuracy"]})
            if jax.process_index() == 0:  # one writer in a multi-host job; Orbax coordinates checkpoints
                with checkpoints.saving(int(state.step)):  # a full disk: one line, as for the checkpoint
                    write_json(workdir / "metrics.json", history)
            tqdm.write(f"epoch {epoch + 1:3d} | lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                       f"acc {record['train_accuracy']:.2%} | test loss {record['test_loss']:.4f} "
                       f"acc {record['test_accuracy']:.2%} | {record['images_per_second']:.0f} img/s "
                       f"| {seconds:.1f}s")

    summary = summarize(history, num_params)
    print(format_summary(config.norm, summary))
    return {"state": state, "history": history, "num_params": num_params, "summary": summary}


def check_finite(step_losses: np.ndarray, epoch: int, steps_per_epoch: int, checkpoints: RunCheckpoints,
                 workdir: Path) -> None:
    """TrainingError naming the first non-finite step; called before any save, so none is bad."""
    if np.all(np.isfinite(step_losses)):
        return
    bad = int(np.argmax(~np.isfinite(step_losses)))
    checkpoints.wait()
    last = checkpoints.latest_step()
    kept = f"the last good checkpoint is step {last} in {workdir}" if last is not None else "no checkpoint was saved"
    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {epoch * steps_per_epoch + bad + 1}; {kept} "
                        "(try a lower --lr)")


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

    def agreed(self, sync_point: bool) -> Optional[int]:
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
    diffs = [f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in RUN_IDENTITY
             if getattr(config, k) != getattr(saved, k)]
    if diffs:
        raise ConfigError("cannot resume: the config contradicts the saved run (" + ", ".join(diffs) + ")")


def summarize(history: list[dict], num_params: int) -> dict:
    if not history:
        return {"num_params": num_params, "epochs": 0}
    last = history[-1]
    return {"num_params": num_params, "epochs": len(history),
            "final_train_accuracy": last["train_accuracy"], "final_test_accuracy": last["test_accuracy"],
            "best_train_accuracy": max(h["train_accuracy"] for h in history),
            "best_test_accuracy": max(h["test_accuracy"] for h in history),
            "best_test_epoch": max(history, key=lambda h: h["test_accuracy"])["epoch"],
            "seconds": sum(h["seconds"] for h in history)}


def format_summary(norm: str, s: dict) -> str:
    if not s.get("epochs"):
        return f"{norm}: {s['num_params']:,} parameters, no epochs trained"
    return (f"{norm}: {s['num_params']:,} parameters | final train {s['final_train_accuracy']:.2%} "
            f"test {s['final_test_accuracy']:.2%} | best train {s['best_train_accuracy']:.2%} "
            f"test {s['best_test_accuracy']:.2%} (epoch {s['best_test_epoch']})")


def write_json(path: Path, value) -> None:
    """Write atomically, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
