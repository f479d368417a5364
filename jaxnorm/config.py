"""Every knob of a run in one dataclass; the defaults are the CIFAR-10 recipe.

    python scripts/train.py --norm bn                   # BatchNorm, 20 epochs, batch 128
    python scripts/train.py --dataset mnist --norm gn   # the MNIST net, 15 epochs, batch 64, 2 groups

The CIFAR-10 recipe (SGD with Nesterov momentum, lr 0.1 after a 1-epoch warm-up decaying linearly to 0,
no dropout) was chosen over the reference implementations' (lr 0.05 x0.1 after 10 epochs, dropout
0.05) on a validation split of the training images: see results/cifar10-jpeg/tuning.md.

The dataset-dependent defaults live in one place, `DATASET_DEFAULTS` (and `NORM_DEFAULTS` where one norm's
recipe differs), applied by `Config.for_dataset`.
The command-line options of every script are generated from the fields (`jaxnorm.cli`).

`Config` is saved inside every checkpoint, so a run can be rebuilt (model, data, schedule) from its
folder alone.
"""

from __future__ import annotations

import dataclasses
import math

from jaxnorm.networks import network_layers, normalised_widths

NORMS = ("bn", "gn", "ln")
NORM_NAMES = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm"}
SCHEDULES = ("step", "linear", "cosine")
DATASETS = ("cifar10", "mnist", "folder", "synthetic")  # folder: train/<class>/*, test/<class>/* images
PRECISIONS = ("f32", "bf16")
FIRST_CONVS = ("random", "whitened", "whitened-frozen")
ACTIVATION_NAMES = {"relu": "ReLU", "gelu": "GELU"}  # --activation -> its name in titles and reports
ACTIVATIONS = tuple(ACTIVATION_NAMES)

# Where a dataset's recipe differs from the CIFAR-10 defaults of `Config`. MNIST: the reference
# implementations' 15 epochs, batch 64 and lr 0.05, with the CIFAR-10 schedule and no dropout (chosen
# on a validation split: results/mnist/tuning.md); 2 groups (the largest count dividing 10, 16 and 8);
# no flips (digits are not mirror-symmetric); --crop shifts by at most 2 pixels (a digit fills the
# central 20x20 of 28x28).
DATASET_DEFAULTS = {"mnist": {"epochs": 15, "batch_size": 64, "groups": 2, "flip": False, "crop_padding": 2,
                              "lr": 0.05}}

# Where one norm's recipe differs from its dataset's defaults: (dataset, norm) -> fields, each chosen on a
# validation split (results/<data>/tuning.md). `python scripts/train.py --norm X` trains with them, the
# study trains each norm with its own recipe, and its report gives each recipe.
NORM_DEFAULTS: dict[tuple[str, str], dict] = {
    ("cifar10", "gn"): {"label_smoothing": 0.1},
    ("cifar10", "ln"): {"label_smoothing": 0.2},
    ("mnist", "ln"): {"first_conv": "whitened"},
}

# (3x3 conv width, 1x1 transition width) of the CIFAR-10 network; every preset stays under 50,000.
WIDTH_PRESETS = {"base": (24, 16), "narrow": (16, 16), "wide": (28, 16)}

# What runs saved before a field existed did, for `Config.from_dict`: the step schedule without warm-up
# or Nesterov, crops by 4 pixels.
SAVED_BEFORE_THE_FIELD = {"schedule": "step", "warmup_epochs": 0.0, "nesterov": False, "crop_padding": 4}

# What a field is to a run (field metadata "role"):
IDENTITY = "identity"  # the model and data: resuming with another value is refused
RECIPE = "recipe"      # how it is trained: a resumed run may change it; a study's reused runs must match
RUNTIME = "runtime"    # where and how fast: never changes a result


# The meaningful range of every numeric knob, checked by `Config.validate`: field -> (the range as the
# error message states it, a check of the value given the whole config). None, the default of an
# Optional knob, is always accepted.
POSITIVE = ("positive", lambda value, config: value > 0)
RANGES = {
    "groups": POSITIVE,
    "width": POSITIVE,
    "transition_width": POSITIVE,
    "dropout": ("in [0, 1)", lambda value, config: 0 <= value < 1),
    "rotate": ("in [0, 180]", lambda value, config: 0 <= value <= 180),
    "crop_padding": POSITIVE,
    "cutout": (">= 0", lambda value, config: value >= 0),
    "train_split": POSITIVE,
    "train_images": POSITIVE,
    "epochs": POSITIVE,
    "batch_size": POSITIVE,
    "lr": POSITIVE,
    "momentum": ("in [0, 1)", lambda value, config: 0 <= value < 1),
    # = --epochs: a smoke run that only warms up.
    "warmup_epochs": ("in [0, --epochs]", lambda value, config: 0 <= value <= config.epochs),
    "lr_step_epochs": POSITIVE,
    "lr_gamma": ("in (0, 1]", lambda value, config: 0 < value <= 1),  # the step schedule decays
    "weight_decay": (">= 0", lambda value, config: value >= 0),
    "l1": (">= 0", lambda value, config: value >= 0),
    # 1 would train towards uniform targets.
    "label_smoothing": ("in [0, 1)", lambda value, config: 0 <= value < 1),
    "ema_decay": ("in [0, 1)", lambda value, config: 0 <= value < 1),
    "seed": ("in [0, 2**32)", lambda value, config: 0 <= value < 2 ** 32),  # what jax.random.PRNGKey takes
    "eval_batch_size": POSITIVE,
    "steps_per_call": POSITIVE,
}


class ConfigError(ValueError):
    """A configuration that cannot run; the command line prints its message as one line."""


def knob(default, help: str, *, role: str = RECIPE, choices=None, metavar: str | None = None):
    """A Config field with its command-line help (and choices); see `Config`."""
    return dataclasses.field(default=default, metadata={"help": help, "role": role, "choices": choices,
                                                        "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class Config:
    """One field per knob; `jaxnorm.cli` turns each into `--the-name` of every script taking a config.

    Adding a knob is a one-place change: declare it here with `knob(default, "help", role=...,
    choices=...)` (bool fields become --x/--no-x, `T | None` fields take a T); give a numeric knob its
    range in `RANGES`; read it where it is used. The role says whether a resume may change
    it (IDENTITY: no), whether a study's reused runs must share it (IDENTITY and RECIPE) or neither
    (RUNTIME). A dataset-specific default goes into `DATASET_DEFAULTS`.
    """

    # Model.
    norm: str = knob("bn", "bn: BatchNorm, gn: GroupNorm, ln: LayerNorm over C, H and W", role=IDENTITY,
                     choices=NORMS)
    groups: int = knob(8, "GroupNorm groups; must divide every normalised layer's channels", role=IDENTITY)
    width: int = knob(24, "channels of the 3x3 convs (overrides --preset)", role=IDENTITY)
    transition_width: int = knob(16, "channels of the 1x1 transitions (overrides --preset)", role=IDENTITY)
    dropout: float = knob(0.0, "dropout rate; whole channels in the MNIST net")
    skip: bool = knob(False, "residual connections around the 3x3 convs of each block", role=IDENTITY)
    relu_before_norm: bool = knob(False, "order each block conv -> ReLU -> norm instead of conv -> norm -> "
                                  "ReLU (the --activation, whichever it is); no parameters added",
                                  role=IDENTITY)
    activation: str = knob("relu", "the activation of every block: relu, or gelu (its tanh approximation, "
                           "as airbench uses); no parameters added", role=IDENTITY, choices=ACTIVATIONS)
    weight_standardization: bool = knob(
        False, "standardise the kernel of every conv that feeds a norm layer (per output channel: zero mean, "
        "unit variance; Qiao et al. 2019); no parameters added", role=IDENTITY)
    first_conv: str = knob(
        "random", "the first conv's initial kernel: random (Flax's default); whitened: the training "
        "images' patches whitened (the top eigenvectors of their covariance, each with its negative, as "
        "airbench's first layer); whitened-frozen: whitened and never trained", role=IDENTITY,
        choices=FIRST_CONVS)
    # Data.
    dataset: str = knob("cifar10", "cifar10: the CIFAR-10 CNN; mnist: the 10,224-parameter MNIST net, no "
                        "flips; folder: the CIFAR-10 CNN on the image folder --data-dir, one class per "
                        "sub-folder; synthetic: generated images for smoke runs",
                        role=IDENTITY, choices=DATASETS)
    data_dir: str | None = knob(
        None, "CIFAR-10 archive (cifar-10-binary.tar.gz / cifar-10-python.tar.gz) or its extracted folder; "
        "for mnist a folder of the idx files (t10k-images-idx3-ubyte.gz, ...); an image folder "
        "train/<class>/*, test/<class>/* or a .tar/.tar.gz/.zip of one (folder; cifar10 with its ten class "
        "names); or the folder that caches downloads (<dir>/jaxnorm-downloads) and TFDS datasets "
        "(default $TFDS_DATA_DIR or ~/tensorflow_datasets)", role=RUNTIME, metavar="PATH")
    flip: bool = knob(True, "random horizontal flips, as in the reference implementations")
    alternate_flips: bool = knob(False, "mirror each image in every other epoch, from a random first "
                                 "choice per image (airbench), instead of by a fresh coin each time")
    rotate: float = knob(0.0, "also rotate each image by a random angle in [-X, X] degrees (bilinear)",
                         metavar="X")
    crop: bool = knob(False, "also pad by --crop-padding (reflected) and crop randomly: a random translation")
    crop_padding: int = knob(4, "the largest shift of --crop, in pixels")
    cutout: int = knob(0, "also blank a random N x N square of each image (centred anywhere in it, clipped "
                       "at its edges), filled with the batch's mean colour; 0: off", metavar="N")
    train_split: int | None = knob(
        None, "train on the first N images of one file set and test on the rest (the training files, or the "
        "test files when the folder has no training images, e.g. ../shared/data/mnist: --train-split 8000 "
        "gives 8,000 train / 2,000 test)", role=IDENTITY, metavar="N")
    train_images: int | None = knob(
        None, "train on the first N training images only; the test set stays whole (the batch-size sweep's "
        "budget)", role=IDENTITY, metavar="N")
    # Optimisation: SGD + momentum; the learning rate follows `schedule`.
    epochs: int = knob(20, "epochs to train")
    batch_size: int = knob(128, "global batch, over all devices")
    lr: float = knob(0.1, "the peak learning rate")
    momentum: float = knob(0.9, "SGD momentum")
    nesterov: bool = knob(True, "Nesterov momentum")
    schedule: str = knob("linear", "step: x --lr-gamma every --lr-step-epochs; linear / cosine: decay to 0 "
                         "at the last step, after --warmup-epochs of linear warm-up", choices=SCHEDULES)
    warmup_epochs: float = knob(1.0, "linear warm-up from 0 to --lr (linear and cosine schedules)")
    lr_step_epochs: int = knob(10, "multiply the learning rate by --lr-gamma every this many epochs")
    lr_gamma: float = knob(0.1, "the step schedule's factor")
    weight_decay: float = knob(5e-4, "L2 weight decay, added to the gradient as torch.optim.SGD does")
    decay_scales_and_biases: bool = knob(True, "apply --weight-decay to the norm layers' scales and offsets "
                                         "and to the conv biases too; off: to the conv kernels only")
    l1: float = knob(0.0, "add LAMBDA * sum |conv kernels| to the loss (any norm); recorded as train_l1",
                     metavar="LAMBDA")
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy")
    # The averaged weights are in the checkpoint only when on: a resume cannot switch it.
    ema_decay: float = knob(0.0, "evaluate an exponential moving average of the weights, updated every step "
                            "with this decay (e.g. 0.999; 0: off); BatchNorm keeps its running statistics",
                            role=IDENTITY, metavar="X")
    seed: int = knob(0, "same seed, same result")
    precision: str = knob("f32", "f32, or bf16: convolutions and activations in bfloat16 (parameters, norm "
                          "statistics, loss and updates stay float32)", choices=PRECISIONS)
    eval_batch_size: int = knob(1000, "batch of the per-epoch evaluation", role=RUNTIME)
    steps_per_call: int | None = knob(
        None, "training steps per compiled call (one lax.scan); Ctrl-C and the progress bar wait for a "
        "call's end (default: 1 on CPU, the whole epoch on GPUs and TPUs, whose queue must never wait for "
        "Python)",
        role=RUNTIME, metavar="N")

    @classmethod
    def fields_with_role(cls, *roles: str) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["role"] in roles)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> Config:
        """The defaults for `dataset` and the norm in `overrides` (`DATASET_DEFAULTS` over the CIFAR-10
        ones, then `NORM_DEFAULTS`), then `overrides`."""
        norm = overrides.get("norm", cls.__dataclass_fields__["norm"].default)
        return cls(**{"dataset": dataset, **DATASET_DEFAULTS.get(dataset, {}),
                      **NORM_DEFAULTS.get((dataset, norm), {}), **overrides})

    def layers(self) -> tuple:
        """The layers of the network this config builds (see `jaxnorm.networks`)."""
        return network_layers(self.dataset, self.width, self.transition_width)

    @property
    def evaluation_set(self) -> str:
        """What the per-epoch evaluation measures: "validation" with --train-split (images held out of
        the training files), else "test"."""
        return "validation" if self.train_split else "test"

    def augmentations(self) -> list[str]:
        """The training-time augmentations this config turns on, in the order they apply, as reports name
        them; empty: the training batches are the images as they are."""
        flips = "alternating flips" if self.alternate_flips else "flips"
        return [a for a, on in ((flips, self.flip), (f"rotations up to {self.rotate:g} degrees", self.rotate),
                                (f"pad-{self.crop_padding} crops", self.crop),
                                (f"{self.cutout}x{self.cutout} cutout", self.cutout)) if on]

    def recipe(self, *, lr_scaled_with_batch: bool = False) -> str:
        """The training recipe in one line, for reports. `lr_scaled_with_batch`: the recipe of a batch-size
        sweep, "batch B" and the learning rate scaled linearly from this config's batch."""
        if self.schedule == "step":
            schedule = f"x{self.lr_gamma:g} every {self.lr_step_epochs} epochs"
        else:
            warmup = f"{self.warmup_epochs:g}-epoch linear warm-up, then " if self.warmup_epochs else ""
            schedule = f"{warmup}{self.schedule} decay to 0"
        batch, lr = f"batch {self.batch_size}", f"lr {self.lr:g}"
        if lr_scaled_with_batch:
            batch, lr = "batch B", f"lr {self.lr:g} x B / {self.batch_size}"
        decay = f"weight decay {self.weight_decay:g}"
        decay += "" if self.decay_scales_and_biases else " (kernels only)"
        parts = [batch, f"{self.epochs} epochs",
                 f"SGD {'Nesterov ' if self.nesterov else ''}momentum {self.momentum:g}",
                 f"{lr} ({schedule})", decay, f"dropout {self.dropout:g}",
                 ", ".join(self.augmentations()) or "no augmentation"]
        parts += [f"label smoothing {self.label_smoothing:g}"] if self.label_smoothing else []
        parts += [f"weight moving average {self.ema_decay:g} for evaluation"] if self.ema_decay else []
        parts += ["weight standardisation"] if self.weight_standardization else []
        parts += [f"{self.first_conv} first conv"] if self.first_conv != "random" else []
        parts += ["bfloat16 compute"] if self.precision == "bf16" else []
        parts += [f"L1 {self.l1:g}"] if self.l1 else []
        return ", ".join(parts)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A saved config; a field it lacks (saved before the field existed) takes the value such runs
        used (`SAVED_BEFORE_THE_FIELD`), not today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**SAVED_BEFORE_THE_FIELD, **{k: v for k, v in values.items() if k in known}})

    def validate(self) -> Config:
        """Raise ConfigError for anything that would fail later; returns self for chaining."""
        for f in dataclasses.fields(self):  # inf and nan pass every comparison below: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                choices = ", ".join(f.metadata["choices"])
                raise ConfigError(f"unknown {f.name} {value!r}: choose one of {choices}")
        for name, (rule, ok) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value, self):
                raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
        if self.alternate_flips and not self.flip:
            raise ConfigError("--alternate-flips needs flips: drop --no-flip")
        widths = normalised_widths(self.layers())
        if self.norm == "gn" and any(w % self.groups for w in widths):
            bad = ", ".join(str(w) for w in dict.fromkeys(widths) if w % self.groups)
            raise ConfigError(f"--groups {self.groups} does not divide the {bad} channels of the "
                              f"normalised layers: pick a divisor of {math.gcd(*widths)}")
        return self
