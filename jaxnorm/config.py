"""Every knob of a run in one dataclass; the defaults are the seed CIFAR-10 recipe.

    python scripts/train.py --norm bn      # seed recipe, BatchNorm, 20 epochs, batch 128

`Config` is saved inside every checkpoint, so a run can be rebuilt (model, data, schedule) from its
folder alone.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

NORMS = ("bn", "gn", "ln")
DATASETS = ("cifar10", "synthetic")

# (3x3 conv width, 1x1 transition width) of the CIFAR-10 network; every preset stays under 50,000.
WIDTH_PRESETS = {"seed": (24, 16), "narrow": (16, 16), "wide": (28, 16)}


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
    crop: bool = False  # pad-4-and-crop on top of the seed's horizontal flips
    # Optimisation: SGD + momentum with a step-decay learning rate.
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    lr_step_epochs: int = 10  # multiply the learning rate by lr_gamma every this many epochs
    lr_gamma: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1000

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
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}: choose one of {', '.join(NORMS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "width", "transition_width",
                     "lr_step_epochs", "groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.norm == "gn" and self.width % self.groups:
            raise ConfigError(f"--groups {self.groups} does not divide the {self.width} channels of the "
                              f"normalised layers: pick a divisor of {self.width}")
        return self
