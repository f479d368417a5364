"""The normalisation study's report: one table row per norm (mean ± std over seeds), curves, grids.

    python scripts/study.py --data-dir /path/to/cifar-10-binary.tar.gz     # bn, gn, ln x seeds 0 1 2

Everything in study.md is computed from the runs' metrics and checkpoints; the data source is named,
and a subset of CIFAR-10 is labelled as such.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxnorm.checkpoint import CheckpointError
from jaxnorm.config import IDENTITY, NORM_NAMES, RECIPE, Config, ConfigError
from jaxnorm.data import TFDS_SOURCES, Dataset
from jaxnorm.evaluate import network_name, network_variants, reading_checkpoints, variants
from jaxnorm.figures import plot_curves
from jaxnorm.train import train_and_evaluate

BENCHMARK_TRAIN_SIZE = {"cifar10": 50_000, "mnist": 60_000}
# A reused run must share every field that shapes its result with the study's config. The epochs too,
# except that a step-schedule run may be extended: its learning rate does not depend on the total,
# while a linear or cosine decay extended to more epochs is not the longer recipe.
STUDY_IDENTITY = tuple(f for f in Config.fields_with_role(IDENTITY, RECIPE) if f != "epochs")


def run_variant(config: Config) -> str:
    """The suffix that keeps a variant's run folders and report files apart from the plain network's:
    "", "-skip", "-relu-first", "-ws" (weight standardisation), "-l1_1e-05", or a combination in that
    order."""
    return "".join(f"-{suffix}" for _, suffix in variants(config))


def shared_variants(configs: Iterable[Config]) -> list[tuple[str, str]]:
    """(label, folder suffix) of each variant that every config in `configs` has, in `variants`' order."""
    each = [variants(c) for c in configs]
    return [v for v in each[0] if all(v in other for other in each[1:])]


def shared_variant(configs: Iterable[Config]) -> str:
    """The part of `run_variant` that every config in `configs` has: the suffix of a study's report files,
    while each run folder carries its own norm's whole variant (a norm's own defaults may add one)."""
    return "".join(f"-{suffix}" for _, suffix in shared_variants(configs))


# Options that change how a report is made, not what it says: left out of its "produced by" command.
PRESENTATION_ONLY = ("--no-progress", "--reevaluate", "--report-only")


def report_command(script_file: str, argv: Sequence[str]) -> str:
    """The command that produced a report, as the report prints it: `python scripts/<name> <argv>`."""
    argv = [a for a in argv if a not in PRESENTATION_ONLY]
    return shlex.join(["python", f"scripts/{Path(script_file).name}", *argv])


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


def describe_data(name: str, dataset: Dataset, title: str | None = None) -> str:
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
    with reading_checkpoints(workdir) as checkpoints:
        if checkpoints.latest_step() is None:
            return 0
        _, meta = checkpoints.readable_meta()  # past unreadable checkpoints, with a warning
    saved = Config.from_dict(meta.get("config", {}))
    extendable = saved.schedule == "step" and saved.epochs < config.epochs
    fields = STUDY_IDENTITY + (() if extendable else ("epochs",))
    diffs = [f"{k} {getattr(saved, k)!r} (study: {getattr(config, k)!r})" for k in fields
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
    resuming = f" (resuming at epoch {done})" if done else ""
    print(f"{workdir}: training {config.norm} seed {config.seed}{resuming}")
    train_and_evaluate(config, workdir, resume=True, dataset=dataset, progress=progress)
    return True


def study_rows(records: dict[str, list[dict]]) -> list[dict]:
    """Per norm: params, final train/evaluation accuracy over seeds (and the best validation epoch's, for
    runs with a validation split), epochs, wall time (from histories), the flip-averaged final figure."""
    rows = []
    for norm, runs in records.items():
        hists = [r["history"] for r in runs]
        row = {
            "norm": norm, "seeds": [r["config"]["seed"] for r in runs], "num_params": runs[0]["num_params"],
            "final_train": [h[-1]["train_accuracy"] for h in hists],
            "final_test": [h[-1]["test_accuracy"] for h in hists],  # test, or validation with --train-split
            "epochs": sorted({len(h) for h in hists}),
            "seconds": [sum(e["seconds"] for e in h) for h in hists],
            "eval_train": [r["train"]["accuracy"] for r in runs],
            # test-time flip averaging of the final checkpoint; absent for data trained without flips
            "final_test_flip_average": [r["test_flip_average"]["accuracy"] for r in runs
                                        if "test_flip_average" in r],
        }
        if all(Config.from_dict(r["config"]).evaluation_set == "validation" for r in runs):
            row["best_validation"] = [max(e["test_accuracy"] for e in h) for h in hists]
        rows.append(row)
    return rows


def seeds_named(seeds: Sequence[int]) -> str:
    """"seed 0" or "seeds 0, 1, 2"."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def _seeds_text(seeds: Sequence[int]) -> str:
    """"seed 0" or "mean over seeds 0, 1, 2": a single run is not called a mean."""
    return seeds_named(seeds) if len(seeds) == 1 else f"mean over {seeds_named(seeds)}"


def write_study(records: dict[str, list[dict]], dataset: Dataset, out: Path, *, dataset_key: str,
                variant: str = "", command: str | None = None) -> Path:
    """Write <out>/study.md and <out>/curves.png; the grids are copied in by the caller.

    Every figure is of the final checkpoints. The per-epoch evaluation is on the test set, or on
    validation images for runs with --train-split, and the report names it so; only then is a "best"
    (validation) epoch reported."""
    out = Path(out)
    if not records:
        raise CheckpointError("no runs to report")
    suffix = variant  # run_variant(config): keeps each variant's files apart
    rows = study_rows(records)
    # Each norm's config (its own recipe where config.NORM_DEFAULTS gives one); the first row's names the
    # data, the split and the variant, which all runs share.
    configs = {r["norm"]: Config.from_dict(records[r["norm"]][0]["config"]) for r in rows}
    config = configs[rows[0]["norm"]]
    split = config.evaluation_set  # "test", or "validation" with --train-split
    extras = [label for label, _ in shared_variants(configs.values())]  # the title: what all runs have
    seeds = rows[0]["seeds"]
    data = describe_data(dataset_key, dataset)
    names = {norm: network_name(c) for norm, c in configs.items()}
    curves = {names[r["norm"]]: (configs[r["norm"]], [x["history"] for x in records[r["norm"]]])
              for r in rows}
    sizes = {r["num_params"] for r in rows}  # one parameter count (the usual case): in the title
    plot_curves(curves, out / f"curves{suffix}.png", evaluation_set=split,
                title=f"{_seeds_text(seeds)} | {data_title(dataset_key, dataset)}"
                      + (f", {len(dataset.train_images):,} training images" if "subset" in data else "")
                      + (f" | {rows[0]['num_params']:,} parameters" if len(sizes) == 1 else ""))
    lines = ["# Normalisation study" + (f" ({', '.join(extras)})" if extras else ""), "",
             f"Data: {data}.", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    net = ("MNIST net" if config.dataset == "mnist"
           else f"CNN (width {config.width}/{config.transition_width})")
    flip_average = all(len(r["final_test_flip_average"]) == len(r["seeds"]) for r in rows)
    best = all("best_validation" in r for r in rows)
    where = ("validation images held out of the training files (--train-split), not the test set"
             if split == "validation" else "the plain test images (no test-time augmentation)")
    plural = "s" if len(seeds) > 1 else ""
    shape = "".join(f" + {label}" for label, _ in network_variants(config))  # the recipe names the rest
    groups = f", GroupNorm in {configs['gn'].groups} groups" if "gn" in configs else ""
    # Each norm's recipe: one line when they agree, else one per norm.
    recipes = {norm: c.recipe() for norm, c in configs.items()}
    shared = len(set(recipes.values())) == 1
    as_trained = {norm: ("augmented" if c.augmentations() else "not augmented")
                  + (", with dropout" if c.dropout else "") for norm, c in configs.items()}
    as_trained = (next(iter(as_trained.values())) if len(set(as_trained.values())) == 1 else
                  "; ".join(f"{norm}: {text}" for norm, text in as_trained.items()))
    recipe = config.recipe() if shared else "each norm with its own recipe (below)"
    lines += [f"{net}{shape}{groups}; {recipe}; "
              f"seed{plural} {', '.join(map(str, seeds))} "
              f"({len(seeds)} run{plural} per norm). Accuracies of the final checkpoint"
              + (": mean ± sample standard deviation over the seeds" if len(seeds) > 1 else "") + ". Train "
              f"accuracy is measured during each epoch (on the training batches as trained: {as_trained}); "
              f"{split} accuracy after it, on {where}."
              + (" *Best validation*: the highest validation accuracy of any epoch (chosen on validation "
                 "images only)." if best else "")
              + (f" *Final {split}, flip-averaged*: the final checkpoint with test-time flip averaging (the "
                 f"logits of each image and its mirror image averaged)." if flip_average else "")
              + " Wall time: training seconds per run, compilation included (the per-epoch evaluation and "
              "data loading not)" + (", mean over seeds" if len(seeds) > 1 else "") + ".", "",
              f"| norm | parameters | final train | final {split} | "
              + ("best validation | " if best else "")
              + (f"final {split}, flip-averaged | " if flip_average else "") + "epochs | wall time (s) |",
              "|---|---:|---:|---:|" + ("---:|" if best else "") + ("---:|" if flip_average else "")
              + "---:|---:|"]
    if not shared:  # before the table, so that it reads as the table's key
        lines[-2:-2] = [*(f"- {NORM_NAMES[n]} (`{n}`): {recipe}" for n, recipe in recipes.items()), ""]
    for r in rows:
        lines.append(f"| {NORM_NAMES[r['norm']]} (`{r['norm']}`) | {r['num_params']:,} | "
                     f"{format_mean_std(r['final_train'])} | {format_mean_std(r['final_test'])} | "
                     + (f"{format_mean_std(r['best_validation'])} | " if best else "")
                     + (f"{format_mean_std(r['final_test_flip_average'])} | " if flip_average else "")
                     + f"{'/'.join(map(str, r['epochs']))} | "
                     + f"{format_mean_std(r['seconds'], percent=False)} |")
    lines += ["", f"Loss and accuracy per epoch (train dashed, {split} solid; {_seeds_text(seeds)}):", "",
              f"![curves](curves{suffix}.png)", "",
              f"Misclassified {split} images of seed {seeds[0]}'s final checkpoint (no test-time "
              "augmentation):", ""]
    for r in rows:
        lines += [f"![{r['norm']} misclassified](misclassified-{r['norm']}{suffix}.png)", ""]
    path = out / f"study{suffix}.md"
    path.write_text("\n".join(lines))
    (out / f"study{suffix}.json").write_text(json.dumps({"data": data, "evaluation_set": split, "rows": rows},
                                                       indent=1))
    return path
