"""Evaluation: predict and metrics on the device, restoring a run from its folder, and its report files.

    from jaxnorm.evaluate import restore_run, dataset_for_run, write_run_report
    run = restore_run("checkpoints/bn")                 # final checkpoint, model rebuilt from its config
    record = write_run_report(run, dataset_for_run(run))  # evaluation.json, misclassified.png, curves.png

A run's per-epoch evaluation is on the test set, or with --train-split on validation images held out of
the training files (`Config.evaluation_set`); reports say which. Nothing is chosen on the test set: the
final checkpoint is the default, and "best" exists only as the best validation checkpoint.

Everything here is measured from a checkpoint or computed from the model; nothing is typed by hand.
Training uses `make_predict` and `logit_metrics` for its per-epoch test figures, so both report the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import parallel
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxnorm.config import ACTIVATION_NAMES, NORM_NAMES, Config
from jaxnorm.data import DataError, Dataset, first_train_images, load_dataset
from jaxnorm.figures import misclassified_grid, plot_curves
from jaxnorm.models import build_model
from jaxnorm.state import create_train_state
from jaxnorm.utils import quiet_absl, write_json

# ----------------------------------------------------------------------------------------------
# Predictions and metrics, computed on the device.


def make_predict(mesh, batch_size: int, *, flip_average: bool = False):
    """predict(state, images) -> float32 logits for every image (uint8 host or device array), as one
    array replicated over the mesh (every host can read all of it).

    flip_average: test-time augmentation, the mean of the logits of each image and its mirror image
    (for data trained with random flips)."""
    batch_size = math.ceil(batch_size / mesh.devices.size) * mesh.devices.size
    rep, shard = parallel.replicated(mesh), parallel.data_sharded(mesh)

    @functools.partial(jax.jit, out_shardings=rep)
    def logits_of(state, x):
        x = jax.lax.with_sharding_constraint(x, shard)
        variables = {"params": state.eval_params, "batch_stats": state.batch_stats}
        logits = state.apply_fn(variables, x, train=False)
        if flip_average:
            logits = (logits + state.apply_fn(variables, x[:, :, ::-1], train=False)) / 2
        return logits

    def predict(state, images) -> jax.Array:
        n = len(images)
        padded = np.zeros((math.ceil(n / batch_size) * batch_size, *images.shape[1:]), images.dtype)
        padded[:n] = np.asarray(images)
        batches = (jax.device_put(padded[i:i + batch_size], shard) for i in range(0, len(padded), batch_size))
        chunks = list(parallel.limit_in_flight(logits_of(state, batch) for batch in batches))
        return jnp.concatenate(chunks)[:n]

    return predict


@functools.partial(jax.jit, static_argnames="num_classes")
def _per_example(logits, labels, num_classes: int) -> dict:
    """The one log-softmax: per-example loss, prediction and its probability; the confusion matrix."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    predicted = jnp.argmax(log_probs, -1)
    return {"loss": -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0],
            "predicted": predicted, "correct": predicted == labels,
            "probability": jnp.exp(jnp.max(log_probs, -1)),
            "confusion": jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predicted].add(1)}


def _on_device(logits, labels, num_classes: int | None = None) -> dict:
    logits = jnp.asarray(logits)
    # Labels go where the logits are (replicated over the mesh), so this also runs on several hosts.
    labels = jax.device_put(np.asarray(labels, np.int32), logits.sharding)
    return _per_example(logits, labels, num_classes or logits.shape[-1])


def logit_metrics(logits, labels) -> dict:
    """Mean cross-entropy and accuracy of `logits` against `labels`."""
    m = _on_device(logits, labels)
    return {"loss": float(jnp.mean(m["loss"])), "accuracy": float(jnp.mean(m["correct"]))}


def classification_metrics(logits, labels, num_classes: int) -> dict:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix
    (rows: true class, columns: predicted class)."""
    m = _on_device(logits, labels, num_classes)
    confusion = np.asarray(m["confusion"], np.int64)
    totals = confusion.sum(1)
    per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
    return {"loss": float(jnp.mean(m["loss"])), "accuracy": float(jnp.mean(m["correct"])),
            "count": int(len(labels)),
            "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
            "confusion_matrix": confusion.tolist()}


def choose_misclassified(logits, labels, count: int) -> list[dict]:
    """The first `count` misclassified images, in dataset order: index, true, predicted, probability."""
    m = jax.device_get(_on_device(logits, labels))
    labels = np.asarray(labels)
    wrong = np.flatnonzero(m["predicted"] != labels)[:count]
    return [{"index": int(i), "true": int(labels[i]), "predicted": int(m["predicted"][i]),
             "probability": float(m["probability"][i])} for i in wrong]


def summarize(history: list[dict], num_params: int, evaluation_set: str = "test") -> dict:
    """The final accuracies of a run's history (the line train.py prints at the end); with a validation
    split also the best validation epoch. `final_test_accuracy` is on `evaluation_set` (the history's
    `test_accuracy`)."""
    if not history:
        return {"num_params": num_params, "epochs": 0}
    last = history[-1]
    summary = {"num_params": num_params, "epochs": len(history), "evaluation_set": evaluation_set,
               "final_train_accuracy": last["train_accuracy"], "final_test_accuracy": last["test_accuracy"],
               "seconds": sum(h["seconds"] for h in history)}
    if evaluation_set == "validation":
        best = max(history, key=lambda h: h["test_accuracy"])
        summary.update(best_validation_accuracy=best["test_accuracy"], best_validation_epoch=best["epoch"])
    return summary


def format_summary(norm: str, s: dict) -> str:
    if not s.get("epochs"):
        return f"{norm}: {s['num_params']:,} parameters, no epochs trained"
    line = (f"{norm}: {s['num_params']:,} parameters | final train {s['final_train_accuracy']:.2%} "
            f"{s['evaluation_set']} {s['final_test_accuracy']:.2%}")
    if "best_validation_accuracy" in s:
        line += f" | best validation {s['best_validation_accuracy']:.2%} (epoch {s['best_validation_epoch']})"
    return line


# ----------------------------------------------------------------------------------------------
# Restoring a run for evaluation.


@dataclasses.dataclass
class RestoredRun:
    workdir: Path
    step: int
    config: Config
    meta: dict  # the checkpoint's JSON record: config, input statistics, class names, history, ...
    model: nn.Module
    state: Any  # TrainState on the current devices
    mesh: Any
    history: list[dict]  # the whole run's epochs (from the latest checkpoint), whichever step is restored

    @property
    def epoch(self) -> int:
        """The epochs the restored checkpoint had trained."""
        return len(self.meta["history"])


@contextlib.contextmanager
def reading_checkpoints(workdir: str | Path) -> Iterator[RunCheckpoints]:
    """The run's checkpoints opened read-only (nothing is created or changed), closed on exit; a missing
    or foreign folder is a CheckpointError."""
    with quiet_absl():  # Orbax warns on every read-only manager; the user asked for nothing wrong
        checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        yield checkpoints
    finally:
        checkpoints.close()


def restore_run(workdir: str | Path, step: int | None = None, *, best: bool = False) -> RestoredRun:
    """The run in `workdir` at `step`, by default its final checkpoint; with `best` the checkpoint of
    the best validation accuracy (only for a run with a validation split). An unreadable checkpoint is
    skipped with a warning for the newest readable one, while an unreadable `step` is an error.

    The model is rebuilt from the config saved in the checkpoint, and the state restored onto the
    devices of this process (one CPU is fine) through an abstract target, whatever wrote it.
    """
    with reading_checkpoints(workdir) as checkpoints:
        checkpoints.require_latest_step()  # the one message for empty or half-written folders
        mesh = parallel.make_mesh()

        def target(meta):  # the restore target, from the checkpoint's own record
            if not isinstance(meta, dict) or "config" not in meta or "image_shape" not in meta:
                raise CheckpointError(f"{workdir}: its checkpoints were not written by jaxnorm "
                                      "(no config in them)")
            config, model = Config.from_dict(meta["config"]), _model_of(meta)
            # Shapes only (no computation): the optimizer's state shapes do not depend on steps_per_epoch.
            shapes = jax.eval_shape(lambda: create_train_state(model, config, tuple(meta["image_shape"]),
                                                               steps_per_epoch=1))
            return abstract_like(shapes, parallel.replicated(mesh))

        if step is not None:
            state, meta = checkpoints.restore(step, target(checkpoints.restore_meta(step)))
        else:
            prefer = checkpoints.require_best_validation_step() if best else None  # None: the newest readable
            step, state, meta = checkpoints.restore_readable(target, prefer=prefer)
        _, newest = checkpoints.readable_meta()  # the whole run's history, whichever step is restored
    return RestoredRun(Path(workdir), int(step), Config.from_dict(meta["config"]), meta, _model_of(meta),
                       state, mesh, newest["history"])


def _model_of(meta: dict) -> nn.Module:
    return build_model(Config.from_dict(meta["config"]), meta["input_mean"], meta["input_std"],
                       num_classes=len(meta.get("class_names", range(10))))


def dataset_for_run(run: RestoredRun, data_dir: str | None = None) -> Dataset:
    """The run's dataset (from its saved config, or `data_dir`), checked against what it was trained on."""
    recorded = run.config.data_dir
    if data_dir is None and recorded and not Path(recorded).expanduser().exists():
        where = Path(recorded).expanduser().absolute()
        note = "" if Path(recorded).is_absolute() else f" (the run recorded the relative path {recorded})"
        raise DataError(f"the data {run.workdir} was trained on is not at {where}{note}: "
                        "pass --data-dir PATH to where it is now")
    with quiet_absl():
        dataset = load_dataset(run.config.dataset, data_dir if data_dir is not None else run.config.data_dir,
                               train_split=run.config.train_split)
    dataset = first_train_images(dataset, run.config.train_images)
    if tuple(dataset.image_shape) != tuple(run.meta["image_shape"]):
        raise DataError(f"the data has images of shape {dataset.image_shape} but the run was trained on "
                        f"{tuple(run.meta['image_shape'])}")
    if list(dataset.class_names) != list(run.meta.get("class_names", dataset.class_names)):
        raise DataError("the data's class names differ from the run's: wrong --data-dir?")
    return dataset


# ----------------------------------------------------------------------------------------------
# The report files of one run.


def evaluate_run(run: RestoredRun, dataset: Dataset) -> dict:
    """Metrics on the whole train and test sets (evaluation mode: no augmentation or dropout).

    Returns {'train': metrics, 'test': metrics, 'test_logits': array}; the logits are for the grid. A
    run trained with random flips also gets 'test_flip_average': the test metrics with test-time flip
    averaging (`make_predict(flip_average=True)`).
    """
    predict = make_predict(run.mesh, run.config.eval_batch_size)
    n = len(dataset.class_names)
    test_logits = predict(run.state, dataset.test_images)
    train_logits = predict(run.state, dataset.train_images)
    results = {"train": classification_metrics(train_logits, dataset.train_labels, n),
               "test": classification_metrics(test_logits, dataset.test_labels, n),
               "test_logits": test_logits}
    if run.config.flip:
        flipped = make_predict(run.mesh, run.config.eval_batch_size, flip_average=True)
        results["test_flip_average"] = classification_metrics(flipped(run.state, dataset.test_images),
                                                              dataset.test_labels, n)
    return results


def format_metrics(metrics: dict, class_names: Sequence[str], title: str = "test set") -> str:
    """Per-class accuracy and the confusion matrix as text, under a heading line of its own."""
    width = max(6, max(len(c) for c in class_names))
    lines = [f"{title}:", f"{'class':<{width}}  {'accuracy':>8}  {'count':>5}"]
    confusion = np.asarray(metrics["confusion_matrix"])
    for name, acc, count in zip(class_names, metrics["per_class_accuracy"], confusion.sum(1), strict=True):
        lines.append(f"{name:<{width}}  {'-' if acc is None else f'{acc:.2%}':>8}  {count:5d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, by number)",
              f"{'':<{width + 3}} " + " ".join(f"{i:>5}" for i in range(len(class_names)))]
    for i, (name, row) in enumerate(zip(class_names, confusion, strict=True)):
        lines.append(f"{i:>2} {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def network_variants(config: Config) -> list[tuple[str, str]]:
    """(label, folder suffix) of the variants that change the network's layers, which the recipe line
    does not name: [("skip connections", "skip"), ("ReLU before the norm", "relu-first"), ("GELU", "gelu")]
    ("activation before the norm" with GELU)."""
    activation = ACTIVATION_NAMES[config.activation]
    first = f"{activation if config.activation == 'relu' else 'activation'} before the norm"
    return [(label, suffix) for on, label, suffix in (
        (config.skip, "skip connections", "skip"),
        (config.relu_before_norm, first, "relu-first"),
        (config.activation != "relu", activation, config.activation)) if on]


def variants(config: Config) -> list[tuple[str, str]]:
    """(label, folder suffix) for each way a run differs from the plain network, in a fixed order: the
    network's own variants, then weight standardisation ("ws"), a whitened first conv ("whitened",
    "whitened-frozen") and L1 ("l1_1e-05")."""
    return network_variants(config) + [(label, suffix) for on, label, suffix in (
        (config.weight_standardization, "weight standardisation", "ws"),
        (config.first_conv != "random", f"{config.first_conv} first conv", config.first_conv),
        (config.l1, f"L1 {config.l1:g}", f"l1_{config.l1:g}")) if on]


def variant_parts(config: Config) -> list[str]:
    """What sets a run apart from the plain network: ["skip connections", "L1 1e-05"]."""
    return [label for label, _ in variants(config)]


def network_name(config: Config) -> str:
    """Titles, legends: "GroupNorm (8 groups) + skip connections", "BatchNorm + L1 1e-05"."""
    norm = NORM_NAMES[config.norm] + (f" ({config.groups} groups)" if config.norm == "gn" else "")
    return "".join([norm, *(f" + {part}" for part in variant_parts(config))])


def run_title(run: RestoredRun, accuracy: float) -> str:
    """Two short lines (the figures wrap a longer one): the network, then what was measured."""
    weights = "weight average, " if run.config.ema_decay else ""
    return (f"{network_name(run.config)}\n{run.meta['num_params']:,} parameters | "
            f"{run.config.evaluation_set} accuracy {accuracy:.2%} ({weights}step {run.step})")


def write_run_report(run: RestoredRun, dataset: Dataset, *, rows: int = 5, cols: int = 2,
                     count: int | None = None) -> dict:
    """Evaluate `run` on `dataset` and write evaluation.json, misclassified.png and curves.png (the whole
    run's history) into its folder. Returns the evaluation record (as written to evaluation.json)."""
    count = rows * cols if count is None else count
    results = evaluate_run(run, dataset)
    title = run_title(run, results["test"]["accuracy"])
    chosen = choose_misclassified(results["test_logits"], dataset.test_labels, count)
    misclassified_grid(dataset.test_images, chosen, dataset.class_names, run.workdir / "misclassified.png",
                       rows=rows, cols=cols, title=title)
    if run.history:
        plot_curves({network_name(run.config): (run.config, [run.history])}, run.workdir / "curves.png",
                    title=title.replace("\n", " | "), evaluation_set=run.config.evaluation_set)
    record = {"workdir": str(run.workdir), "step": run.step, "epoch": run.epoch,
              "evaluation_set": run.config.evaluation_set,  # what "test" measures: "test" or "validation"
              "config": run.config.to_dict(), "num_params": run.meta["num_params"],
              "data_source": dataset.source, "class_names": list(dataset.class_names),
              "train": results["train"], "test": results["test"],
              **({"test_flip_average": results["test_flip_average"]}
                 if "test_flip_average" in results else {}),
              "misclassified": [{**c, "true_name": dataset.class_names[c["true"]],
                                 "predicted_name": dataset.class_names[c["predicted"]]} for c in chosen],
              "history": run.history}
    write_json(run.workdir / "evaluation.json", record)
    return record


def run_report(workdir: str | Path, dataset: Dataset, *, reuse: bool = True) -> dict:
    """The evaluation record of the run's final checkpoint: with `reuse`, its evaluation.json where that
    is of the latest checkpoint on the same data (a report regenerated from finished runs reads them
    rather than re-evaluating each, and leaves their files as they are), else `write_run_report`."""
    workdir = Path(workdir)
    if not reuse:
        return write_run_report(restore_run(workdir), dataset)
    with reading_checkpoints(workdir) as checkpoints:
        latest = checkpoints.latest_step()
    try:
        record = json.loads((workdir / "evaluation.json").read_text())
    except (OSError, ValueError):
        record = None
    same_run = isinstance(record, dict) and record.get("step") == latest
    if same_run and record.get("data_source") == dataset.source and (workdir / "misclassified.png").exists():
        return record
    return write_run_report(restore_run(workdir), dataset)
