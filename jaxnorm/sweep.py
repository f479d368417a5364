"""The batch-size study: every norm x batch size x seed, test error against batch size.

    python scripts/sweep.py --data-dir /path/to/cifar-10-binary.tar.gz     # bn gn ln x batch 2..128 x seeds 0 1 2

The learning rate is scaled linearly with the batch, lr x B / 128 (the rule of the GroupNorm paper,
Wu & He 2018, after Goyal et al. 2017), and every size trains the same number of epochs, so every run
sees the same images. Everything else is the default recipe.

BatchNorm is evaluated two ways: with its running averages (`train=False`, the usual way, and the
test accuracy recorded every epoch) and with the statistics of each test batch of the training batch
size (`batch_stat_accuracy`). The second is what the network computed while it trained; the gap
between the two is what breaks at small batches.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from jaxnorm import parallel
from jaxnorm.checkpoint import RunCheckpoints
from jaxnorm.config import NORM_NAMES, Config
from jaxnorm.data import Dataset
from jaxnorm.evaluate import restore_run
from jaxnorm.figures import plot_sweep
from jaxnorm.study import format_mean_std, mean_std, train_or_reuse
from jaxnorm.train import compiled_train_calls, make_epoch_order, seconds_per_step, setup_run
from jaxnorm.utils import quiet_absl, read_history, write_json

REFERENCE_BATCH = 128  # the batch the default learning rate belongs to


def scaled_lr(lr: float, batch_size: int, reference: int = REFERENCE_BATCH) -> float:
    """Linear scaling: lr x batch_size / reference."""
    return lr * batch_size / reference


def sweep_config(base: Config, norm: str, batch_size: int, seed: int) -> Config:
    """`base` (whose lr belongs to batch 128) at another norm, batch and seed, lr scaled to the batch."""
    return base.replace(norm=norm, seed=seed, batch_size=batch_size,
                        lr=scaled_lr(base.lr, batch_size)).validate()


def check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    """ConfigError now, before hours of training, for a batch the devices cannot split (GPU/TPU)."""
    for b in batch_sizes:
        parallel.devices_for_batch(b)


# ----------------------------------------------------------------------------------------------
# BatchNorm with batch statistics at test time.


def batch_stat_logits(model, state, mesh, images: np.ndarray, batch_size: int, chunk: int = 1024) -> np.ndarray:
    """Logits of `images` with every norm in training mode, over consecutive batches of `batch_size`
    (the last one smaller when it does not divide), dropout off and nothing updated.

    For BatchNorm each image is normalised with the mean and variance of its own test batch, as in
    training; GroupNorm and LayerNorm give exactly their usual logits (they use no batch statistics).
    """
    model = model.clone(config=model.config.replace(dropout=0.0))  # rate 0: Dropout returns its input, so
    # train=True only switches the norms
    rep = parallel.replicated(mesh)

    @jax.jit
    def logits_of(params, batch_stats, x):  # x: (batches, batch, H, W, C)
        def one(batch):  # the updated running averages are returned and dropped
            out, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                 mutable=["batch_stats"])
            return out
        return jax.vmap(one)(x)  # each batch its own statistics

    n = len(images)
    full, rest = divmod(n, batch_size)
    per_call = max(1, chunk // batch_size)  # batches per compiled call
    out = []
    for start in range(0, full, per_call):
        count = min(per_call, full - start)
        x = np.zeros((per_call, batch_size, *images.shape[1:]), images.dtype)  # padded with whole dummy
        x[:count] = images[start * batch_size:(start + count) * batch_size].reshape(count, batch_size,
                                                                                    *images.shape[1:])
        logits = logits_of(state.params, state.batch_stats, jax.device_put(x, rep))  # batches, ignored
        out.append(np.asarray(logits[:count]).reshape(count * batch_size, -1))
    if rest:
        out.append(np.asarray(logits_of(state.params, state.batch_stats,
                                        jax.device_put(images[None, full * batch_size:], rep))[0]))
    return np.concatenate(out)


def batch_stat_accuracy(workdir: Path, dataset: Dataset, batch_size: int) -> dict:
    """Test accuracy of the run's final checkpoint with batch statistics, cached in batch-stats.json
    (keyed by the step, batch and test data, so a new checkpoint or other data recomputes it)."""
    with quiet_absl():
        checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        step = checkpoints.require_latest_step()
    finally:
        checkpoints.close()
    key = {"step": step, "batch_size": batch_size, "test_images": len(dataset.test_images),
           "data_source": dataset.source}
    cache = Path(workdir) / "batch-stats.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved
    run = restore_run(workdir, step)
    logits = batch_stat_logits(run.model, run.state, run.mesh, dataset.test_images, batch_size)
    record = {**key, "accuracy": float(np.mean(logits.argmax(-1) == dataset.test_labels))}
    write_json(cache, record)
    return record


# ----------------------------------------------------------------------------------------------
# The sweep.


def run_sweep(base: Config, dataset: Dataset, *, norms: Sequence[str], batch_sizes: Sequence[int],
              seeds: Sequence[int], runs_root: Path, progress: bool = True) -> list[dict]:
    """Train (or reuse, or resume) every norm x batch x seed; one record per run with its test accuracies.

    `base.lr` is the learning rate at batch 128; each run gets it scaled to its batch.
    """
    check_batch_sizes(batch_sizes)
    # Seed by seed: an interrupted sweep has whole seeds done, and can report them (--seeds 0).
    configs = [sweep_config(base, norm, b, seed) for seed in seeds for b in batch_sizes for norm in norms]
    records = []
    for config in configs:
        workdir = Path(runs_root) / f"{config.norm}-b{config.batch_size}-s{config.seed}"
        train_or_reuse(config, workdir, dataset, progress=progress)
        history = read_history(workdir)[:config.epochs]
        record = {"norm": config.norm, "batch_size": config.batch_size, "seed": config.seed, "lr": config.lr,
                  "epochs": len(history), "workdir": str(workdir),
                  "final_test": history[-1]["test_accuracy"],
                  "best_test": max(e["test_accuracy"] for e in history),
                  "seconds": sum(e["seconds"] for e in history)}
        if config.norm == "bn":
            record["final_test_batch_stats"] = batch_stat_accuracy(workdir, dataset, config.batch_size)["accuracy"]
        records.append(record)
    return records


# Columns of the report: (label, norm, record key of the final accuracy).
def _columns(norms: Sequence[str]) -> list[tuple[str, str, str]]:
    columns = []
    for norm in norms:
        columns.append((NORM_NAMES[norm], norm, "final_test"))
        if norm == "bn":
            columns.append(("BatchNorm, batch statistics", norm, "final_test_batch_stats"))
    return columns


def _values(records: list[dict], norm: str, batch_size: int, key: str) -> list[float]:
    return [r[key] for r in records if r["norm"] == norm and r["batch_size"] == batch_size and key in r]


def write_sweep(records: list[dict], out: Path, *, data: str, base: Config, command: Optional[str] = None,
                label: Optional[str] = None) -> Path:
    """Write <out>/batch-sweep.md, batch-sweep.png and batch-sweep.json from the sweep's records.

    `data` describes the data in the text (source included); `label` names it in the figure's title."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    norms = list(dict.fromkeys(r["norm"] for r in records))
    sizes = sorted({r["batch_size"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    epochs = sorted({r["epochs"] for r in records})
    plot_sweep(sweep_series(records), sizes, out / "batch-sweep.png", title=f"{label or data}\n{'/'.join(map(str, epochs))} epochs "
               f"at every batch | mean over seeds {', '.join(map(str, seeds))}, min-max shaded")

    lines = ["# Batch-size study", "", f"Data: {data}.", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    lines += [f"Seed CNN (width {base.width}/{base.transition_width}), {'/'.join(map(str, epochs))} epochs at "
              f"every batch size (the same images seen), learning rate {base.lr:g} x B / {REFERENCE_BATCH} "
              f"(linear scaling, the GroupNorm paper's rule), x{base.lr_gamma:g} every {base.lr_step_epochs} "
              f"epochs, everything else the default recipe; seeds {', '.join(map(str, seeds))}. Test accuracy, "
              "mean ± sample standard deviation over the seeds. *BatchNorm* uses its running averages "
              "(`train=False`, as every other table here); *BatchNorm, batch statistics* normalises each "
              "test batch of the training batch size with its own mean and variance (training mode, no "
              "dropout, nothing updated), on the final checkpoint.", "",
              "![test error against batch size](batch-sweep.png)", "",
              "Final test accuracy (last epoch):", ""]
    columns = _columns(norms)
    lines += ["| batch | lr | " + " | ".join(c[0] for c in columns) + " |",
              "|---:|---:|" + "---:|" * len(columns)]
    for b in sizes:
        cells = [format_mean_std(v) if (v := _values(records, norm, b, key)) else "-" for _, norm, key in columns]
        lines.append(f"| {b} | {scaled_lr(base.lr, b):.4g} | " + " | ".join(cells) + " |")
    lines += ["", "Best test accuracy over the epochs (running averages for BatchNorm):", "",
              "| batch | " + " | ".join(NORM_NAMES[n] for n in norms) + " |", "|---:|" + "---:|" * len(norms)]
    for b in sizes:
        lines.append(f"| {b} | " + " | ".join(format_mean_std(_values(records, n, b, "best_test")) for n in norms)
                     + " |")
    lines += ["", "Training time per run (s, mean over seeds and norms; compilation included, the per-epoch "
              "test evaluation not): " + ", ".join(
                  f"batch {b} {statistics.mean(r['seconds'] for r in records if r['batch_size'] == b):.0f}"
                  for b in sizes) + ".", ""]
    path = out / "batch-sweep.md"
    path.write_text("\n".join(lines))
    (out / "batch-sweep.json").write_text(json.dumps({"data": data, "command": command, "runs": records}, indent=1))
    return path


def sweep_series(records: list[dict]) -> list[dict]:
    """Per column of the report: test error (%) at each batch size, mean and the seeds' min and max."""
    sizes = sorted({r["batch_size"] for r in records})
    series = []
    for label, norm, key in _columns(list(dict.fromkeys(r["norm"] for r in records))):
        points = [(b, [100 * (1 - v) for v in _values(records, norm, b, key)]) for b in sizes]
        points = [(b, e) for b, e in points if e]
        series.append({"label": label, "norm": norm, "batch_stats": key == "final_test_batch_stats",
                       "batch_sizes": [b for b, _ in points], "mean": [mean_std(e)[0] for _, e in points],
                       "low": [min(e) for _, e in points], "high": [max(e) for _, e in points]})
    return series


# ----------------------------------------------------------------------------------------------
# Step time at each batch size (to choose a budget).


def time_steps(base: Config, dataset: Dataset, batch_sizes: Sequence[int], steps: int = 20,
               repeats: int = 3) -> list[dict]:
    """Median seconds per training step at each batch size (compilation excluded), on these devices."""
    check_batch_sizes(batch_sizes)
    rows = []
    for b in batch_sizes:
        config = sweep_config(base, base.norm, b, base.seed)
        run = setup_run(config, dataset)
        order = make_epoch_order(config, run.mesh, len(dataset.train_images))(0)
        seconds, _ = seconds_per_step(compiled_train_calls(config, run.mesh, 1), run.state, run.images,
                                      run.labels, order, min(steps, run.steps_per_epoch), repeats)
        rows.append({"batch_size": b, "devices": run.mesh.devices.size, "step_ms": 1000 * seconds,
                     "images_per_second": b / seconds,
                     "epoch_seconds": math.floor(len(dataset.train_images) / b) * seconds})
    return rows


def format_step_times(rows: list[dict], norm: str, num_train: int) -> str:
    lines = [f"| batch | devices | {norm} step (ms) | images/s | epoch of {num_train:,} images (s) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch_size']} | {r['devices']} | {r['step_ms']:.1f} | {r['images_per_second']:.0f} | "
              f"{r['epoch_seconds']:.0f} |" for r in rows]
    return "\n".join(lines)
