"""Validation runs compared: one row per run folder, from its metrics and its final evaluation.

Recipes are chosen on validation images (`--train-split`), never on the test set; `run_row` refuses a run
measured on the test set. Each row names how its recipe differs from the dataset's defaults
(`recipe_changes`), so the table says what was compared without hand-written labels.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxnorm.config import RUNTIME, Config, ConfigError

IGNORED = set(Config.fields_with_role(RUNTIME)) | {"seed", "norm", "train_split", "dataset"}


def recipe_changes(config: Config) -> str:
    """The fields where `config` differs from its dataset's defaults, as command-line flags."""
    default = Config.for_dataset(config.dataset)
    flags = []
    for name, value in config.to_dict().items():
        if name in IGNORED or value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value:g}"
                     if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags) or "defaults"


def run_row(workdir: Path) -> dict:
    evaluation = workdir / "evaluation.json"
    if not evaluation.is_file():
        raise ConfigError(f"{workdir} has no evaluation.json: run python scripts/evaluate.py --workdir "
                          f"{workdir} --final")
    record = json.loads(evaluation.read_text())
    config = Config.from_dict(record["config"])
    history = record["history"]
    if config.evaluation_set != "validation":
        raise ConfigError(f"{workdir} was evaluated on the test set, not a validation split: tuning compares "
                          "validation runs only (--train-split)")
    if record["epoch"] != len(history) or len(history) != config.epochs:
        raise ConfigError(f"{workdir}: evaluation.json is not of the finished run's final checkpoint "
                          f"(epoch {record['epoch']} of {config.epochs}): rerun evaluate.py --final")
    best = max(history, key=lambda e: e["test_accuracy"])
    return {"run": workdir.name, "norm": config.norm, "seed": config.seed, "recipe": recipe_changes(config),
            "epochs": config.epochs, "train_split": config.train_split,
            "final_train": history[-1]["train_accuracy"], "final_validation": record["test"]["accuracy"],
            "best_validation": best["test_accuracy"], "best_epoch": best["epoch"],
            "final_validation_flip": record.get("test_flip_average", {}).get("accuracy"),
            "validation_images": record["test"]["count"], "seconds": sum(e["seconds"] for e in history)}


def write_tuning_table(rows: list[dict], command: str) -> str:
    splits = sorted({(r["train_split"], r["validation_images"]) for r in rows})
    lines = [
        "# Validation runs", "",
        "Each run trains on the first N training images and is measured on the rest (the validation split: "
        + "; ".join(f"{n:,} / {v:,}" for n, v in splits) + "); the test images are never used. "
        "*Recipe*: the flags by which the run differs from the defaults. "
        "*Running train*: measured during the last epoch on the training batches as trained. "
        "*Best validation* is the highest epoch's figure, shown to judge the curve, "
        "not to choose a checkpoint. *Flip-averaged*: the final checkpoint with test-time flip averaging.",
        "",
        "Produced by:", "", "```bash", command, "```", "",
        "| run | norm | seed | recipe | running train | **final validation** | best validation (epoch) | "
        "final validation, flip-averaged | wall (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["norm"], r["recipe"] != "defaults", r["recipe"], r["seed"])):
        flip = f"{r['final_validation_flip']:.2%}" if r["final_validation_flip"] is not None else "-"
        lines.append(f"| {r['run']} | {r['norm']} | {r['seed']} | `{r['recipe']}` | {r['final_train']:.2%} | "
                     f"**{r['final_validation']:.2%}** | {r['best_validation']:.2%} ({r['best_epoch']}) | "
                     f"{flip} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
