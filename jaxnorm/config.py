"""Every knob of a run in one dataclass; the defaults are the seed CIFAR-10 recipe.

    python scripts/train.py --norm bn                   # seed recipe, BatchNorm, 20 epochs, batch 128
    python scripts/train.py --dataset mnist --norm gn   # the MNIST net, 15 epochs, batch 64, 2 groups

The dataset-dependent defaults live in one place, `DATASET_DEFAULTS`, applied by `Config.for_dataset`.

`Config` is saved inside every checkpoint, so a run can be rebuilt (model, data, schedule) from its
folder alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

NORMS = ("bn", "gn", "ln")
SCHEDULES = ("step", "linear", "cosine")
DATASETS = ("cifar10", "mnist", "folder", "synthetic")  # folder: train/<class>/*, test/<class>/* images

# The MNIST net's normalised layers (every conv but the last): GroupNorm's groups must divide each.
MNIST_NORM_WIDTHS = (10, 16, 8, 16, 16, 16, 8, 10, 16)

# Where a dataset's seed recipe differs from the CIFAR-10 defaults of `Config`. MNIST: the seeds' 15
# epochs and batch 64; 2 groups (the largest count dividing 10, 16 and 8); no flips (digits are not
# mirror-symmetric).
DATASET_DEFAULTS = {"mnist": {"epochs": 15, "batch_size": 64, "groups": 2, "flip": False}}

# (3x3 conv width, 1x1 transition width) of the CIFAR-10 network; every preset stays under 50,000.
WIDTH_PRESETS = {"seed": (24, 16), "narrow": (16, 16), "wide": (28, 16)}


# Meaningful ranges of the numeric knobs not checked elsewhere in `validate`.
RANGES = {
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),  # 1 would train towards uniform targets
    "lr_gamma": ("in (0, 1]", lambda v: 0 < v <= 1),  # the step schedule decays
    "weight_decay": (">= 0", lambda v: v >= 0),
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),  # what jax.random.PRNGKey takes
}


class ConfigError(ValueError):
    """A configuration that cannot run; the command line prints its message as one line."""


@dataclasses.dataclass(frozen=True)
class Config:
    # Model.
    norm: str = "bn"
    groups: int = 8  # GroupNorm groups; must divide every normalised layer's channels.
    width: int = 24
    transition_width: int = 16
    dropout: float = 0.05
    skip: bool = False
    # Data.
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    flip: bool = True  # random horizontal flips (the CIFAR-10 seeds'); off for MNIST
    crop: bool = False  # pad-4-and-crop on top of the flips
    train_split: Optional[int] = None  # carve train (first N) and test (the rest) from one file set
    train_images: Optional[int] = None  # train on the first N training images only; the test set stays whole
    # Optimisation: SGD + momentum; the learning rate follows `schedule`.
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05  # the peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "step"  # step: x lr_gamma every lr_step_epochs; linear / cosine: decay to 0 at the end
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr (linear and cosine schedules)
    lr_step_epochs: int = 10  # multiply the learning rate by lr_gamma every this many epochs
    lr_gamma: float = 0.1
    weight_decay: float = 5e-4
    l1: float = 0.0  # adds l1 * sum |conv kernels| to the loss (any norm)
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1000

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> "Config":
        """The defaults for `dataset` (`DATASET_DEFAULTS` over the CIFAR-10 ones), then `overrides`."""
        return cls(**{"dataset": dataset, **DATASET_DEFAULTS.get(dataset, {}), **overrides})

    def normalised_widths(self) -> tuple:
        """Channel counts of the layers followed by a norm, in the network this config builds."""
        return MNIST_NORM_WIDTHS if self.dataset == "mnist" else (self.width,)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> "Config":
        """Raise ConfigError for anything that would fail later; returns self for chaining."""
        for f in dataclasses.fields(self):  # inf and nan pass every comparison below: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}: choose one of {', '.join(NORMS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "width", "transition_width",
                     "lr_step_epochs", "groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.l1 >= 0:
            raise ConfigError(f"--l1 must be >= 0, got {self.l1}")
        for name, (text, ok) in RANGES.items():
            if not ok(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be {text}, got {getattr(self, name)}")
        if self.train_split is not None and self.train_split <= 0:
            raise ConfigError(f"--train-split must be positive, got {self.train_split}")
        if self.train_images is not None and self.train_images <= 0:
            raise ConfigError(f"--train-images must be positive, got {self.train_images}")
        widths = self.normalised_widths()
        if self.norm == "gn" and any(w % self.groups for w in widths):
            bad = ", ".join(str(w) for w in dict.fromkeys(widths) if w % self.groups)
            raise ConfigError(f"--groups {self.groups} does not divide the {bad} channels of the "
                              f"normalised layers: pick a divisor of {math.gcd(*widths)}")
        return self
