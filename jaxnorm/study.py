"""The normalisation study's report: one table row per norm (mean ± std over seeds), curves, grids.

    python scripts/study.py --data-dir /path/to/cifar-10-binary.tar.gz     # bn, gn, ln x seeds 0 1 2

Everything in study.md is computed from the runs' metrics and checkpoints; the data source is named,
and a subset of CIFAR-10 is labelled as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxnorm.checkpoint import CheckpointError, RunCheckpoints
from jaxnorm.config import IDENTITY, NORM_NAMES, RECIPE, Config, ConfigError
from jaxnorm.data import TFDS_SOURCES, Dataset
from jaxnorm.figures import plot_curves
from jaxnorm.train import train_and_evaluate
from jaxnorm.utils import quiet_absl

BENCHMARK_TRAIN_SIZE = {"cifar10": 50_000, "mnist": 60_000}
# A reused run must share every field that shapes its result with the study's config; more epochs
# than it has are trained on top of it.
STUDY_IDENTITY = tuple(f for f in Config.fields_with_role(IDENTITY, RECIPE) if f != "epochs")


def dataset_name(name: str, dataset: Dataset) -> str:
    """A folder name for the data: cifar10 / mnist for the benchmark sets, cifar10-jpeg for a JPEG copy,
    <name>[-jpeg]-subset-<N> for fewer training images."""
    n = len(dataset.train_images)
    name += f"-{dataset.copy.lower()}" if dataset.copy else ""
    base = name.split("-")[0]
    if base in BENCHMARK_TRAIN_SIZE and n != BENCHMARK_TRAIN_SIZE[base]:
        return f"{name}-subset-{n}"
    return name


def data_title(name: str, dataset: Dataset) -> str:
    """The data's name in reports: "CIFAR-10", "CIFAR-10 (JPEG copy)", "MNIST", "image folder", ..."""
    if name not in TFDS_SOURCES:
        return "synthetic data" if name == "synthetic" else "image folder"
    return TFDS_SOURCES[name][0] + (f" ({dataset.copy} copy)" if dataset.copy else "")


def describe_data(name: str, dataset: Dataset, title: Optional[str] = None) -> str:
    """The data's title (`title` or `data_title`), sizes and source; a subset is called one."""
    n, m = len(dataset.train_images), len(dataset.test_images)
    text = f"{n:,} training / {m:,} test images from `{dataset.source}`"
    if name == "synthetic":
        return f"**synthetic data** (smoke test, {text}): not a result"
    title = title or data_title(name, dataset)
    if name in BENCHMARK_TRAIN_SIZE and n != BENCHMARK_TRAIN_SIZE[name]:
        return (f"**{n:,}-image {title} subset, not {title}** ({text}): accuracies here are not "
                f"comparable with {TFDS_SOURCES[name][0]} results")
    return f"{title} ({text})"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], percent: bool = True) -> str:
    m, s = mean_std(values)
    if percent:
        return f"{m:.2%} ± {s:.2%}" if len(values) > 1 else f"{m:.2%}"
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def finished_epochs(workdir: Path, config: Config) -> int:
    """Epochs already trained in `workdir` (0 if none), after checking the run is `config`'s."""
    if not (Path(workdir) / "ckpt").is_dir():
        return 0
    with quiet_absl():
        checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        if checkpoints.latest_step() is None:
            return 0
        _, meta = checkpoints.readable_meta()  # past unreadable checkpoints, with a warning
    finally:
        checkpoints.close()
    saved = Config.from_dict(meta.get("config", {}))
    diffs = [f"{k} {getattr(saved, k)!r} (study: {getattr(config, k)!r})" for k in STUDY_IDENTITY
             if getattr(saved, k) != getattr(config, k)]
    if diffs:
        raise ConfigError(f"{workdir} holds another run ({', '.join(diffs)}): move it or pass another --runs")
    return len(meta.get("history", []))


def train_or_reuse(config: Config, workdir: Path, dataset: Dataset, *, progress: bool = True) -> bool:
    """Reuse a finished run in `workdir` (config.epochs trained), else train it, resuming whatever is
    there (also a Ctrl-C checkpoint). Returns whether it trained."""
    done = finished_epochs(workdir, config)
    if done >= config.epochs:
        print(f"{workdir}: finished ({done} epochs), reused")
        return False
    print(f"{workdir}: training {config.norm} seed {config.seed}" + (f" (resuming at epoch {done})" if done else ""))
    train_and_evaluate(config, workdir, resume=True, dataset=dataset, progress=progress)
    return True


def study_rows(records: dict[str, list[dict]]) -> list[dict]:
    """Per norm: params, final/best train/test accuracy over seeds, epochs, wall time (from histories)."""
    rows = []
    for norm, runs in records.items():
        hists = [r["history"] for r in runs]
        rows.append({
            "norm": norm, "seeds": [r["config"]["seed"] for r in runs], "num_params": runs[0]["num_params"],
            "final_train": [h[-1]["train_accuracy"] for h in hists],
            "final_test": [h[-1]["test_accuracy"] for h in hists],
            "best_train": [max(e["train_accuracy"] for e in h) for h in hists],
            "best_test": [max(e["test_accuracy"] for e in h) for h in hists],
            "epochs": sorted({len(h) for h in hists}),
            "seconds": [sum(e["seconds"] for e in h) for h in hists],
            "eval_train": [r["train"]["accuracy"] for r in runs],
            # test-time flip averaging of the final checkpoint; absent for data trained without flips
            "final_test_flip_average": [r["test_flip_average"]["accuracy"] for r in runs
                                        if "test_flip_average" in r],
        })
    return rows


def write_study(records: dict[str, list[dict]], dataset: Dataset, out: Path, *, dataset_key: str,
                variant: str = "", command: Optional[str] = None) -> Path:
    """Write <out>/study.md and <out>/curves.png; the grids are copied in by the caller."""
    out = Path(out)
    if not records:
        raise CheckpointError("no runs to report")
    suffix = variant  # "", "-skip", "-l1_1e-05", ...: keeps each variant's files apart
    rows = study_rows(records)
    config = records[rows[0]["norm"]][0]["config"]
    extras = (["skip connections"] if config.get("skip") else []) + \
        ([f"L1 {config['l1']:g}"] if config.get("l1") else [])
    extra = "".join(f" + {e}" for e in extras)
    data = describe_data(dataset_key, dataset)
    plot_curves({f"{NORM_NAMES[r['norm']]}{extra}": [x["history"] for x in records[r["norm"]]]
                 for r in rows}, out / f"curves{suffix}.png",
                title=f"mean over seeds {', '.join(map(str, rows[0]['seeds']))} | {data_title(dataset_key, dataset)}"
                      + (f", {len(dataset.train_images):,} training images" if "subset" in data else ""))
    lines = [f"# Normalisation study{f' ({extra[3:]})' if extra else ''}", "",
             f"Data: {data}.", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    net = ("MNIST net" if config["dataset"] == "mnist"
           else f"Seed CNN (width {config['width']}/{config['transition_width']})")
    flip_average = all(len(r["final_test_flip_average"]) == len(r["seeds"]) for r in rows)
    lines += [f"{net}{extra}; {Config.from_dict(config).recipe()}; seeds "
              f"{', '.join(map(str, rows[0]['seeds']))} ({len(rows[0]['seeds'])} run"
              f"{'s' if len(rows[0]['seeds']) > 1 else ''} per norm). Accuracies: mean ± sample standard "
              "deviation over the seeds. Train accuracy is measured during each epoch (on the training "
              f"batches as trained: {'augmented' if config['flip'] or config['crop'] else 'not augmented'}"
              f"{', with dropout' if config['dropout'] else ''}); test accuracy after it, on the plain test "
              "images (no test-time augmentation). *Best* is the highest epoch; *final* the last."
              + (" *Final test, flip-averaged*: the last checkpoint with test-time flip averaging (the logits "
                 "of each test image and its mirror image averaged)." if flip_average else "")
              + " Wall time: training seconds per run, compilation included (the per-epoch test evaluation and "
              "data loading not), mean over seeds.", "",
              "| norm | parameters | final train | final test | best train | best test | "
              + ("final test, flip-averaged | " if flip_average else "") + "epochs | wall time (s) |",
              "|---|---:|---:|---:|---:|---:|" + ("---:|" if flip_average else "") + "---:|---:|"]
    for r in rows:
        lines.append(f"| {NORM_NAMES[r['norm']]} (`{r['norm']}`) | {r['num_params']:,} | "
                     f"{format_mean_std(r['final_train'])} | {format_mean_std(r['final_test'])} | "
                     f"{format_mean_std(r['best_train'])} | {format_mean_std(r['best_test'])} | "
                     + (f"{format_mean_std(r['final_test_flip_average'])} | " if flip_average else "")
                     + f"{'/'.join(map(str, r['epochs']))} | {format_mean_std(r['seconds'], percent=False)} |")
    lines += ["", "Loss and accuracy per epoch (train dashed, test solid; mean over seeds):", "",
              f"![curves](curves{suffix}.png)", "",
              f"Misclassified test images of seed {rows[0]['seeds'][0]}'s final checkpoint (no test-time "
              "augmentation):", ""]
    for r in rows:
        lines += [f"![{r['norm']} misclassified](misclassified-{r['norm']}{suffix}.png)", ""]
    path = out / f"study{suffix}.md"
    path.write_text("\n".join(lines))
    (out / f"study{suffix}.json").write_text(json.dumps({"data": data, "rows": rows}, indent=1))
    return path
