"""Evaluation and report files of a run: metrics, misclassified grid, curves, model summary, receptive field.

    from jaxnorm.report import restore_run, evaluate_run
    run = restore_run("checkpoints/bn")                 # best checkpoint, model rebuilt from its config
    results = evaluate_run(run, load_dataset(...))      # accuracy, loss, per-class, confusion matrix

Everything here is measured from a checkpoint or computed from the model; nothing is typed by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import parallel
from jaxnorm.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxnorm.config import Config
from jaxnorm.data import Dataset, DataError
from jaxnorm.models import LayerSpec, build_model

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

    @property
    def history(self) -> list[dict]:
        return self.meta.get("history", [])


def restore_run(workdir: str | Path, step: Optional[int] = None) -> RestoredRun:
    """The run in `workdir` at `step` (default: the best by test accuracy, else the latest; an unreadable
    one is skipped with a warning for the newest readable one, while an unreadable `step` is an error).

    The model is rebuilt from the config saved in the checkpoint, and the state restored onto the
    devices of this process (one CPU is fine) through an abstract target, whatever wrote it.
    """
    from jaxnorm.train import create_train_state  # train imports report lazily; keep the cycle one-way

    with _quiet_absl():  # Orbax warns on every read-only manager; the user asked for nothing wrong
        checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        if not checkpoints.all_steps():
            raise CheckpointError(f"{workdir} holds no checkpoints yet (empty {checkpoints.directory.name}/ "
                                  "folder): has the run finished an epoch?")
        mesh = parallel.make_mesh()

        def model_of(meta):
            return build_model(Config.from_dict(meta["config"]), meta["input_mean"], meta["input_std"],
                               num_classes=len(meta.get("class_names", range(10))))

        def target(meta):  # the restore target, from the checkpoint's own record
            if not isinstance(meta, dict) or "config" not in meta or "image_shape" not in meta:
                raise CheckpointError(f"{workdir}: its checkpoints were not written by jaxnorm (no config in them)")
            config, model = Config.from_dict(meta["config"]), model_of(meta)
            # Shapes only (no computation): the optimizer's state shapes do not depend on steps_per_epoch.
            shapes = jax.eval_shape(lambda: create_train_state(model, config, tuple(meta["image_shape"]),
                                                               steps_per_epoch=1))
            return abstract_like(shapes, parallel.replicated(mesh))

        if step is not None:
            state, meta = checkpoints.restore(step, target(checkpoints.restore_meta(step)))
        else:
            step, state, meta = checkpoints.restore_readable(target, prefer=checkpoints.best_step())
        config = Config.from_dict(meta["config"])
        model = model_of(meta)
    finally:
        checkpoints.close()
    return RestoredRun(Path(workdir), int(step), config, meta, model, state, mesh)


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dataset_for_run(run: RestoredRun, data_dir: Optional[str] = None) -> Dataset:
    """The run's dataset (from its saved config, or `data_dir`), checked against what it was trained on."""
    from jaxnorm.data import load_dataset

    recorded = run.config.data_dir
    if data_dir is None and recorded and not Path(recorded).expanduser().exists():
        where = Path(recorded).expanduser().absolute()
        note = "" if Path(recorded).is_absolute() else f" (the run recorded the relative path {recorded})"
        raise DataError(f"the data {run.workdir} was trained on is not at {where}{note}: pass --data-dir PATH "
                        "to where it is now")
    dataset = load_dataset(run.config.dataset, data_dir if data_dir is not None else run.config.data_dir,
                           train_split=run.config.train_split)
    if tuple(dataset.image_shape) != tuple(run.meta["image_shape"]):
        raise DataError(f"the data has images of shape {dataset.image_shape} but the run was trained on "
                        f"{tuple(run.meta['image_shape'])}")
    if list(dataset.class_names) != list(run.meta.get("class_names", dataset.class_names)):
        raise DataError("the data's class names differ from the run's: wrong --data-dir?")
    return dataset


# ----------------------------------------------------------------------------------------------
# Metrics.


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    from jaxnorm.train import logit_metrics

    labels = np.asarray(labels)
    predictions = np.asarray(logits).argmax(-1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    totals = confusion.sum(1)
    per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
    return {**logit_metrics(logits, labels), "count": int(len(labels)),
            "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
            "confusion_matrix": confusion.tolist()}


def evaluate_run(run: RestoredRun, dataset: Dataset) -> dict:
    """Metrics on the whole train and test sets (evaluation mode: no augmentation or dropout).

    Returns {'train': metrics, 'test': metrics, 'test_logits': array}; the logits are for the grid.
    """
    from jaxnorm.train import make_predict

    predict = make_predict(run.mesh, run.config.eval_batch_size)
    n = len(dataset.class_names)
    test_logits = predict(run.state, dataset.test_images)
    return {"train": classification_metrics(predict(run.state, dataset.train_images), dataset.train_labels, n),
            "test": classification_metrics(test_logits, dataset.test_labels, n),
            "test_logits": test_logits}


def format_metrics(metrics: dict, class_names: Sequence[str]) -> str:
    """Per-class accuracy and the confusion matrix as text."""
    width = max(6, max(len(c) for c in class_names))
    lines = [f"{'class':<{width}}  accuracy  count"]
    confusion = np.asarray(metrics["confusion_matrix"])
    for name, acc, count in zip(class_names, metrics["per_class_accuracy"], confusion.sum(1)):
        lines.append(f"{name:<{width}}  {'-' if acc is None else f'{acc:7.2%}':>8}  {count:5d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, by number)",
              f"{'':<{width + 3}} " + " ".join(f"{i:>5}" for i in range(len(class_names)))]
    for i, (name, row) in enumerate(zip(class_names, confusion)):
        lines.append(f"{i:>2} {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures.


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def choose_misclassified(logits: np.ndarray, labels: np.ndarray, count: int) -> list[dict]:
    """The first `count` misclassified images, in dataset order: index, true, predicted, probability."""
    probs = softmax(logits)
    predicted = probs.argmax(-1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))[:count]
    return [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "probability": float(probs[i, predicted[i]])} for i in wrong]


def misclassified_grid(images: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                       class_names: Sequence[str], path: str | Path, *, rows: int = 5, cols: int = 2,
                       count: Optional[int] = None, title: str = "") -> list[dict]:
    """Save a rows x cols grid of misclassified uint8 images (as stored: un-normalised), each annotated
    with the true and predicted class and the predicted probability. Returns the chosen images' records."""
    count = rows * cols if count is None else count
    if count > rows * cols:
        raise ValueError(f"--count {count} does not fit a {rows}x{cols} grid")
    chosen = choose_misclassified(logits, labels, count)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), chosen):
        image = np.asarray(images[c["index"]])
        if image.shape[-1] == 1:  # grayscale (MNIST): show as gray, not a colour map
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(f"true: {class_names[c['true']]}\npred: {class_names[c['predicted']]} "
                     f"({c['probability']:.0%})", fontsize=9)
    if not chosen:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return chosen


def plot_curves(runs: dict[str, list[list[dict]]], path: str | Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train dashed and test solid; each label's mean over its histories."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (label, histories) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        epochs = min(len(h) for h in histories)
        if epochs == 0:
            continue
        x = np.arange(1, epochs + 1)
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for split, style in (("train", "--"), ("test", "-")):
                y = np.mean([[e[f"{split}_{key}"] for e in h[:epochs]] for h in histories], axis=0)
                ax.plot(x, y, style, color=color, marker="o" if epochs < 4 else None,
                        label=f"{label} {split}")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Model summary and receptive field.


def summary_rows(model: nn.Module, image_shape: Sequence[int]) -> list[dict]:
    """One row per top-level module with parameters, in call order: name, type, output shape, parameters."""
    calls = []  # (name, type) of each top-level submodule call, in order

    def record(module, method):
        if method == "__call__" and len(module.path) == 1:
            calls.append((module.name, type(module).__name__))
        return True

    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    _, captured = jax.eval_shape(lambda v: model.apply(v, x, train=False, capture_intermediates=record,
                                                       mutable=["intermediates"]), variables)
    params, outputs = variables["params"], captured["intermediates"]
    rows = []
    for name, kind in calls:
        if name not in params:
            continue  # dropout and other parameter-free modules
        shape = jax.tree_util.tree_leaves(outputs[name]["__call__"])[0].shape
        rows.append({"layer": name, "type": kind, "output_shape": [-1, *shape[1:]],
                     "params": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params[name]))})
    return rows


def model_summary(model: nn.Module, image_shape: Sequence[int]) -> str:
    """A torchsummary-like table (layer, type, output shape, parameters) from the model itself."""
    rows = summary_rows(model, image_shape)
    lines = [f"{'layer':<10} {'type':<10} {'output shape':<20} {'params':>8}", "-" * 51]
    lines += [f"{r['layer']:<10} {r['type']:<10} {str(r['output_shape']):<20} {r['params']:>8,}" for r in rows]
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                                  train=False))
    stats = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables.get("batch_stats", {})))
    lines += ["-" * 51, f"{'total trainable parameters':<41} {sum(r['params'] for r in rows):>9,}"]
    if stats:
        lines.append(f"{'BatchNorm running statistics (not trained)':<41} {stats:>9,}")
    return "\n".join(lines)


def receptive_field(layers: Sequence[LayerSpec], input_size: int) -> list[dict]:
    """Receptive field, jump (input pixels between neighbouring outputs) and output size after each layer.

    rf_out = rf_in + (k - 1) * jump_in; jump_out = jump_in * s; n_out = (n_in + 2p - k) // s + 1.
    A global pool (kernel None) covers the whole map it is given.
    """
    rf, jump, size = 1, 1, input_size
    table = []
    for layer in layers:
        kernel = size if layer.kernel is None else layer.kernel
        rf += (kernel - 1) * jump
        jump *= layer.stride
        size = (size + 2 * layer.padding - kernel) // layer.stride + 1
        table.append({"layer": layer.name, "kernel": kernel, "stride": layer.stride, "padding": layer.padding,
                      "rf": rf, "jump": jump, "output_size": size})
    return table


def format_receptive_field(table: list[dict]) -> str:
    lines = [f"{'layer':<6} {'kernel':>6} {'stride':>6} {'pad':>4} {'rf':>5} {'jump':>5} {'output':>7}"]
    lines += [f"{r['layer']:<6} {r['kernel']:>6} {r['stride']:>6} {r['padding']:>4} {r['rf']:>5} {r['jump']:>5} "
              f"{r['output_size']:>4}x{r['output_size']:<2}" for r in table]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], percent: bool = True) -> str:
    m, s = mean_std(values)
    if percent:
        return f"{m:.2%} ± {s:.2%}" if len(values) > 1 else f"{m:.2%}"
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


# ----------------------------------------------------------------------------------------------
# The report files of one run.


def run_title(run: RestoredRun, test_accuracy: float) -> str:
    c = run.config
    norm = {"bn": "BatchNorm", "gn": f"GroupNorm ({c.groups} groups)", "ln": "LayerNorm"}[c.norm]
    return (f"{norm}{' + skip' if c.skip else ''} | {run.meta['num_params']:,} parameters | "
            f"test accuracy {test_accuracy:.2%} (step {run.step})")


def write_run_report(run: RestoredRun, dataset: Dataset, *, rows: int = 5, cols: int = 2,
                     count: Optional[int] = None) -> dict:
    """Evaluate `run` on `dataset` and write evaluation.json, misclassified.png and curves.png into its
    folder. Returns the evaluation record (as written to evaluation.json)."""
    from jaxnorm.train import write_json

    results = evaluate_run(run, dataset)
    title = run_title(run, results["test"]["accuracy"])
    chosen = misclassified_grid(dataset.test_images, dataset.test_labels, results["test_logits"],
                                dataset.class_names, run.workdir / "misclassified.png", rows=rows, cols=cols,
                                count=count, title=title)
    if run.history:
        plot_curves({run.config.norm: [run.history]}, run.workdir / "curves.png", title=title)
    record = {"workdir": str(run.workdir), "step": run.step, "epoch": len(run.history),
              "config": run.config.to_dict(), "num_params": run.meta["num_params"],
              "data_source": dataset.source, "class_names": list(dataset.class_names),
              "train": results["train"], "test": results["test"],
              "misclassified": [{**c, "true_name": dataset.class_names[c["true"]],
                                 "predicted_name": dataset.class_names[c["predicted"]]} for c in chosen]}
    write_json(run.workdir / "evaluation.json", record)
    return record
