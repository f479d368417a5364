"""The batch-size study: every norm x batch size x seed, test error against batch size.

    python scripts/sweep.py --data-dir /path/to/cifar-10-binary.tar.gz --epochs 10 --seeds 0 1

The recipe is the base config's (the default one unless options change it) for every norm, at every
batch B (a norm's own recipe, `config.NORM_DEFAULTS`, does not apply: the norms are compared under one
recipe), with the learning rate scaled linearly, lr x B / (the base batch, 128 by default): the rule of
the GroupNorm paper (Wu & He 2018, after Goyal et al. 2017). Every batch trains the same number of
epochs, so every run sees the same images; the warm-up is counted in epochs too (`jaxnorm.state`), so it
is the same share of training at every batch. The report states the recipe from the config itself
(`Config.recipe(lr_scaled_with_batch=True)`).

The confound: at equal epochs a batch of 2 takes 64 times as many steps as a batch of 128. The
optional fixed-steps view (`fixed_steps_epochs`) trains chosen batch sizes for about the same number
of steps instead (so the larger batch sees more images), to tell the two apart.

BatchNorm is evaluated two ways: with its running averages (`train=False`, the usual way, and the
test accuracy recorded every epoch: the main column) and with the statistics of each test batch of
the training batch size (`batch_stat_accuracy`), which is what the network computed while it trained.

Runs live in `<runs>/<norm>-b<batch>-e<epochs>-s<seed>`: the epoch count is part of the name because
a linear-decay run extended to more epochs is not the longer recipe. A finished run is reused, an
unfinished one resumed, and a finished run keeps only its final checkpoint (small enough to commit).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxnorm import parallel
from jaxnorm.checkpoint import RunCheckpoints
from jaxnorm.config import NORM_NAMES, Config, ConfigError
from jaxnorm.data import Dataset
from jaxnorm.evaluate import reading_checkpoints, restore_run
from jaxnorm.figures import plot_sweep
from jaxnorm.runlock import RunLock
from jaxnorm.study import finished_epochs, format_mean_std, mean_std, seeds_named, train_or_reuse
from jaxnorm.train import compiled_train_calls, make_epoch_order, seconds_per_step, setup_run
from jaxnorm.utils import read_history, write_json


def scaled_lr(lr: float, batch_size: int, reference: int) -> float:
    """Linear scaling: lr x batch_size / reference, where `lr` belongs to the batch `reference`."""
    return lr * batch_size / reference


def sweep_config(base: Config, norm: str, batch_size: int, seed: int, epochs: int | None = None) -> Config:
    """`base` at another norm, batch, seed (and epoch count), its lr scaled from base.batch_size."""
    return base.replace(norm=norm, seed=seed, batch_size=batch_size, epochs=epochs or base.epochs,
                        lr=scaled_lr(base.lr, batch_size, base.batch_size)).validate()


def fixed_steps_epochs(num_train: int, batch_size: int, steps: int) -> int:
    """The whole epochs closest to `steps` steps at `batch_size` (ConfigError if that is under one epoch)."""
    per_epoch = num_train // batch_size
    if steps < per_epoch:
        raise ConfigError(f"--fixed-steps {steps} is less than one epoch at batch {batch_size} ({per_epoch} "
                          "steps): choose at least that many")
    return round(steps / per_epoch)


def run_folder(runs_root: str | Path, config: Config) -> Path:
    return Path(runs_root) / f"{config.norm}-b{config.batch_size}-e{config.epochs}-s{config.seed}"


def check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    """ConfigError now, before hours of training, for a batch the devices cannot split (GPU/TPU)."""
    for b in batch_sizes:
        parallel.devices_for_batch(b)


# ----------------------------------------------------------------------------------------------
# BatchNorm with batch statistics at test time.


def batch_stat_logits(model, state, mesh, images: np.ndarray, batch_size: int,
                      chunk: int = 1024) -> np.ndarray:
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
        logits = logits_of(state.eval_params, state.batch_stats, jax.device_put(x, rep))  # batches, ignored
        out.append(np.asarray(logits[:count]).reshape(count * batch_size, -1))
    if rest:
        out.append(np.asarray(logits_of(state.eval_params, state.batch_stats,
                                        jax.device_put(images[None, full * batch_size:], rep))[0]))
    return np.concatenate(out)


def batch_stat_accuracy(workdir: Path, dataset: Dataset, batch_size: int) -> dict:
    """Test accuracy of the run's final checkpoint with batch statistics, cached in batch-stats.json
    (keyed by the step, batch and test data, so a new checkpoint or other data recomputes it)."""
    with reading_checkpoints(workdir) as checkpoints:
        step = checkpoints.require_latest_step()
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


def keep_final_checkpoint_only(workdir: Path) -> None:
    """Delete every checkpoint of a finished run but its last (the one every report reads), so that the
    run folder is small enough to commit; training keeps the last three and the best one."""
    with RunLock(workdir), contextlib.closing(RunCheckpoints(workdir)) as checkpoints:
        final = checkpoints.require_latest_step()
        for step in checkpoints.all_steps():
            if step != final:
                checkpoints.manager.delete(step)


def run_sweep(base: Config, dataset: Dataset, *, norms: Sequence[str], batch_sizes: Sequence[int],
              seeds: Sequence[int], runs_root: Path, fixed_steps: int | None = None,
              progress: bool = True, train: bool = True) -> list[dict]:
    """Train (or reuse, or resume) every norm x batch x seed; one record per run with its test accuracies.
    With train=False, only the finished runs, and nothing trains.

    Every batch trains `base.epochs` epochs, or with `fixed_steps` the whole epochs closest to that many
    steps. `base.lr` belongs to `base.batch_size`; each run gets it scaled to its batch.
    """
    check_batch_sizes(batch_sizes)
    num_train = len(dataset.train_images)
    epochs = {b: fixed_steps_epochs(num_train, b, fixed_steps) if fixed_steps else base.epochs
              for b in batch_sizes}
    # Seed by seed: an interrupted sweep has whole seeds done, and can report them (--seeds 0).
    configs = [sweep_config(base, norm, b, seed, epochs[b])
               for seed in seeds for b in batch_sizes for norm in norms]
    records = []
    for config in configs:
        workdir = run_folder(runs_root, config)
        if not train and finished_epochs(workdir, config) < config.epochs:
            print(f"{workdir}: not finished, left out")
            continue
        train_or_reuse(config, workdir, dataset, progress=progress)
        keep_final_checkpoint_only(workdir)
        history = read_history(workdir)[:config.epochs]
        record = {"norm": config.norm, "batch_size": config.batch_size, "seed": config.seed, "lr": config.lr,
                  "epochs": len(history), "steps": history[-1]["step"], "workdir": str(workdir),
                  "final_test": history[-1]["test_accuracy"],
                  "seconds": sum(e["seconds"] for e in history),
                  # The median epoch's speed; the first epoch, which compiles, counts only in a 1-epoch run.
                  "images_per_second": statistics.median(e["images_per_second"]
                                                         for e in history[1:] or history),
                  "devices": ", ".join(sorted({e.get("devices", "not recorded") for e in history}))}
        if config.norm == "bn":
            with_batch_stats = batch_stat_accuracy(workdir, dataset, config.batch_size)
            record["final_test_batch_stats"] = with_batch_stats["accuracy"]
        records.append(record)
    return records


# Columns of the report: (label, norm, record key of the final accuracy). BatchNorm's usual evaluation
# (running averages) first, as in the paper.
def _columns(norms: Sequence[str]) -> list[tuple[str, str, str]]:
    columns = []
    for norm in norms:
        if norm == "bn":
            columns += [("BatchNorm, running averages", norm, "final_test"),
                        ("BatchNorm, batch statistics", norm, "final_test_batch_stats")]
        else:
            columns.append((NORM_NAMES[norm], norm, "final_test"))
    return columns


def _values(records: list[dict], norm: str, batch_size: int, key: str) -> list[float]:
    return [r[key] for r in records if r["norm"] == norm and r["batch_size"] == batch_size and key in r]


def _table(records: list[dict], first_columns: dict) -> list[str]:
    """Final test accuracy, a row per batch: `first_columns` (header -> value at a batch), then the norms."""
    columns = _columns(list(dict.fromkeys(r["norm"] for r in records)))
    lines = ["| " + " | ".join([*first_columns, *(c[0] for c in columns)]) + " |",
             "|" + "---:|" * (len(first_columns) + len(columns))]
    for b in sorted({r["batch_size"] for r in records}):
        cells = [str(value(b)) for value in first_columns.values()]
        cells += [format_mean_std(v) if (v := _values(records, norm, b, key)) else "-"
                  for _, norm, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _speed_section(records: list[dict], several_seeds: bool) -> list[str]:
    """The budget, as the runs measured it: images/s per norm and batch, a run's minutes, the total."""
    norms = list(dict.fromkeys(r["norm"] for r in records))
    machines = collections.Counter(r["devices"] for r in records)
    hours = sum(r["seconds"] for r in records) / 3600
    lines = ["## Training speed", "",
             "As the runs measured it, one run at a time (the machine, as each run's metrics.json names it: "
             + "; ".join(f"{m} for {n} run{'s' if n > 1 else ''}" for m, n in machines.items())
             + "): training images per second in a run's median epoch (the first epoch, which compiles, left "
             "out), and a run's training time (compilation included, the per-epoch test evaluation not)"
             + (", the fastest of the seeds (other work on a shared machine only slows a run)"
                if several_seeds else "")
             + f". The whole sweep: {len(records)} runs, {hours:.1f} hours of training.", "",
             "| batch | " + " | ".join(f"{norm} images/s" for norm in norms) + " | "
             + " | ".join(f"{norm} minutes" for norm in norms) + " |",
             "|" + "---:|" * (1 + 2 * len(norms))]
    for b in sorted({r["batch_size"] for r in records}):
        speeds = [_values(records, norm, b, "images_per_second") for norm in norms]
        minutes = [[s / 60 for s in _values(records, norm, b, "seconds")] for norm in norms]
        lines.append(f"| {b} | " + " | ".join(f"{max(v):,.0f}" if v else "-" for v in speeds)
                     + " | " + " | ".join(f"{min(v):.1f}" if v else "-" for v in minutes) + " |")
    return lines + [""]


def write_sweep(records: list[dict], out: Path, *, data: str, base: Config, command: str | None = None,
                label: str | None = None, fixed_steps_records: Sequence[dict] = (),
                missing: Sequence[str] = ()) -> Path:
    """Write <out>/batch-sweep.md, batch-sweep.png and batch-sweep.json from the sweep's records (and the
    fixed-steps view's, if any).

    `data` describes the data in the text (source included); `label` names it in the figure's title."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r["batch_size"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    epochs = "/".join(map(str, sorted({r["epochs"] for r in records})))
    several = len(seeds) > 1  # one seed: no mean, no error bars to explain
    epoch_text = f"{epochs} epoch{'s' if epochs != '1' else ''}"
    plot_sweep(sweep_series(records), sizes, out / "batch-sweep.png",
               title=f"{label or data}: {epoch_text} at every batch\n"
                     + (f"mean ± std over {seeds_named(seeds)}" if several else seeds_named(seeds)),
               legend_title="mean ± std over seeds" if several else None)
    recipe = base.replace(epochs=records[0]["epochs"]).recipe(lr_scaled_with_batch=True)
    smallest, largest = sizes[0], sizes[-1]

    lines = ["# Batch-size study", "", f"Data: {data}.", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    lines += [f"CNN (width {base.width}/{base.transition_width}); {recipe} (the learning rate scaled "
              "linearly with the batch B, the GroupNorm paper's rule; the warm-up counted in epochs, so it "
              f"is the same share of training at every batch); {seeds_named(seeds)}. Final test accuracy"
              + (", mean ± sample standard deviation over the seeds." if several else "."), "",
              *([f"Not trained yet, so left out (those cells have fewer seeds): {', '.join(missing)}.", ""]
                if missing else []),
              "*BatchNorm, running averages* is the usual evaluation (`train=False`, as in the paper and "
              "every other table here); *BatchNorm, batch statistics* normalises each test batch of the "
              "training batch size with its own mean and variance, as the network did while it trained. "
              "GroupNorm and LayerNorm use no batch statistics: they have one evaluation.", "",
              f"The confound: every batch trains the same epochs, so batch {smallest} takes "
              f"{largest // smallest} times as many steps as batch {largest} (the steps per epoch column). A "
              "change with the batch mixes the normalisation's statistics with the number of updates; "
              "GroupNorm and LayerNorm, which use no batch statistics, show the second alone.", "",
              "![test error against batch size](batch-sweep.png)", ""]
    num_train = {r["batch_size"]: r["steps"] // r["epochs"] for r in records}
    lines += _table(records, {"batch": str, "lr": lambda b: f"{scaled_lr(base.lr, b, base.batch_size):.4g}",
                              "steps per epoch": lambda b: f"{num_train[b]:,}"})
    lines += ["", *_speed_section(records, several)]
    if fixed_steps_records:
        steps = {r["batch_size"]: r["steps"] for r in fixed_steps_records}
        runs_epochs = {r["batch_size"]: r["epochs"] for r in fixed_steps_records}
        lines += ["## The same number of steps", "",
                  "Each batch trained for the whole epochs closest to the same number of steps, so the "
                  "larger batch sees more images; everything else as above. Final test accuracy:", ""]
        lines += _table(list(fixed_steps_records), {"batch": str, "steps": lambda b: f"{steps[b]:,}",
                                                     "epochs": lambda b: runs_epochs[b]})
        lines.append("")
    path = out / "batch-sweep.md"
    path.write_text("\n".join(lines))
    summary = {"data": data, "command": command, "recipe": recipe, "runs": records,
               "fixed_steps_runs": list(fixed_steps_records), "missing_runs": list(missing)}
    (out / "batch-sweep.json").write_text(json.dumps(summary, indent=1))
    return path


def sweep_series(records: list[dict]) -> list[dict]:
    """Per column of the report: test error (%) at each batch size, mean and sample std over the seeds."""
    sizes = sorted({r["batch_size"] for r in records})
    series = []
    for label, norm, key in _columns(list(dict.fromkeys(r["norm"] for r in records))):
        points = [(b, [100 * (1 - v) for v in _values(records, norm, b, key)]) for b in sizes]
        points = [(b, e) for b, e in points if e]
        series.append({"label": label, "norm": norm, "batch_stats": key == "final_test_batch_stats",
                       "batch_sizes": [b for b, _ in points], "mean": [mean_std(e)[0] for _, e in points],
                       "std": [mean_std(e)[1] for _, e in points]})
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
                     "epoch_seconds": math.floor(len(dataset.train_images) / b) * seconds,
                     "load_average": os.getloadavg()[0]})  # a busy machine shows in the table
    return rows


def format_step_times(rows: list[dict], norm: str, num_train: int) -> str:
    """The step-time table with the machine's 1-minute load average after each measurement: the timing
    itself keeps the cores busy, and a load well above their count means other work competed (slow,
    noisy times)."""
    lines = [f"| batch | devices | {norm} step (ms) | images/s | epoch of {num_train:,} images (s) | "
             f"load average ({os.cpu_count()} cores) |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch_size']} | {r['devices']} | {r['step_ms']:.1f} | {r['images_per_second']:.0f} | "
              f"{r['epoch_seconds']:.0f} | {r['load_average']:.1f} |" for r in rows]
    return "\n".join(lines)
