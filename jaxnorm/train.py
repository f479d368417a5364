"""Training: TrainState with batch_stats, the compiled train/predict steps and the epoch loop.

    from jaxnorm.config import Config
    from jaxnorm.train import train_and_evaluate
    train_and_evaluate(Config(norm="gn"), "checkpoints/gn")

The dataset lives on the devices for the whole run. Each epoch draws a permutation on the device;
each step gathers its batch from it, augments it and updates the state inside one compiled call.
"""

from __future__ import annotations

import json
import math
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
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxnorm.config import Config, ConfigError
from jaxnorm.data import Dataset, augment, load_dataset
from jaxnorm.models import build_model, count_params, init_variables, l1_penalty

# Fields that define the model and data of a run: resuming with another value is refused.
RUN_IDENTITY = ("norm", "groups", "width", "transition_width", "skip", "dataset", "train_split")


class TrainState(train_state.TrainState):
    batch_stats: Any = None  # BatchNorm running statistics; an empty dict for GN and LN


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, a run folder in the way, ...)."""


# ----------------------------------------------------------------------------------------------
# State and optimizer.


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Step decay: lr * gamma ** (epoch // lr_step_epochs), as torch's StepLR."""
    return optax.exponential_decay(config.lr, transition_steps=config.lr_step_epochs * steps_per_epoch,
                                   decay_rate=config.lr_gamma, staircase=True)


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    # Weight decay added to the gradient before momentum, as torch.optim.SGD(weight_decay=...).
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum))


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

    @jax.jit
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

    del rep
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


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False,
                       dataset: Optional[Dataset] = None, progress: bool = True) -> dict:
    """Train `config` in `workdir` (checkpoints, metrics.json), evaluating on the test set every epoch.

    Returns {'state', 'history', 'num_params', 'summary'}.
    """
    config.validate()
    workdir = Path(workdir)
    dataset = dataset or load_dataset(config.dataset, config.data_dir, train_split=config.train_split)
    num_train = len(dataset.train_images)
    if config.batch_size > num_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {num_train} training images")
    mesh = parallel.make_mesh()
    parallel.check_batch_divides(config.batch_size, mesh)

    input_mean, input_std = dataset.channel_stats()
    model = build_model(config, input_mean, input_std)
    steps_per_epoch = num_train // config.batch_size
    state = create_train_state(model, config, dataset.image_shape, steps_per_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    num_params = count_params(state.params)

    checkpoints = RunCheckpoints(workdir)
    history: list[dict] = []
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise TrainingError(f"{workdir} already holds a run (step {latest}): pass --resume to continue it "
                            "or choose another --workdir")
    if latest is not None:
        saved = checkpoints.restore_meta(latest)
        check_same_run(config, Config.from_dict(saved["config"]))
        state, saved = checkpoints.restore(latest, abstract_like(state, parallel.replicated(mesh)))
        history = saved["history"]
        print(f"resumed {workdir} at step {int(state.step)} (epoch {len(history)})")
    meta = {"config": config.to_dict(), "input_mean": input_mean, "input_std": input_std,
            "num_params": num_params, "class_names": list(dataset.class_names),
            "image_shape": list(dataset.image_shape), "data_source": dataset.source}

    print(f"{config.norm} | {num_params:,} parameters | {num_train} train / {len(dataset.test_images)} test "
          f"images from {dataset.source} | {mesh.devices.size} x {jax.devices()[0].platform} device(s)")

    images = parallel.put_replicated(dataset.train_images, mesh)
    labels = parallel.put_replicated(dataset.train_labels, mesh)
    train_step = make_train_step(config, mesh)
    epoch_order = make_epoch_order(config, mesh, num_train)
    predict = make_predict(mesh, config.eval_batch_size)
    schedule = learning_rate_schedule(config, steps_per_epoch)

    start_epoch = int(state.step) // steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(epoch)
        start = time.perf_counter()
        losses, corrects = [], []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, unit="step")
        for i in bar:
            state, metrics = train_step(state, images, labels, order, i)
            losses.append(metrics["loss"])
            corrects.append(metrics["correct"])
            if (i + 1) % 10 == 0 or i + 1 == steps_per_epoch:  # sync rarely: keeps the device queue full
                seen = (i + 1) * config.batch_size
                bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.3f}",
                                acc=f"{int(np.sum(jax.device_get(corrects))) / seen:.2%}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        step_losses = np.asarray(jax.device_get(losses))
        seconds = time.perf_counter() - start
        if not np.all(np.isfinite(step_losses)):
            bad = int(np.argmax(~np.isfinite(step_losses)))
            raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {epoch * steps_per_epoch + bad + 1}"
                                f"; the last good checkpoint is step {checkpoints.latest_step()} in {workdir}")
        test = logit_metrics(predict(state, dataset.test_images), dataset.test_labels)
        record = {"epoch": epoch + 1, "step": int(state.step),
                  "lr": float(schedule(epoch * steps_per_epoch)),
                  "train_loss": float(step_losses.mean()),
                  # The --l1 penalty at the epoch's end (0 without --l1), kept apart from train_loss.
                  "train_l1": config.l1 * float(l1_penalty(state.params)),
                  "train_accuracy": int(np.sum(jax.device_get(corrects))) / (steps_per_epoch * config.batch_size),
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "seconds": seconds, "images_per_second": steps_per_epoch * config.batch_size / seconds}
        history.append(record)
        checkpoints.save(int(state.step), state, {**meta, "history": history},
                         metrics={"test_accuracy": record["test_accuracy"]})
        write_json(workdir / "metrics.json", history)
        tqdm.write(f"epoch {epoch + 1:3d} | lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                   f"acc {record['train_accuracy']:.2%} | test loss {record['test_loss']:.4f} "
                   f"acc {record['test_accuracy']:.2%} | {record['images_per_second']:.0f} img/s "
                   f"| {seconds:.1f}s")
    checkpoints.close()

    summary = summarize(history, num_params)
    print(format_summary(config.norm, summary))
    return {"state": state, "history": history, "num_params": num_params, "summary": summary}


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
