"""Train the seed CNN (CIFAR-10) or the MNIST net with one normalisation layer.

    python scripts/train.py --norm gn                      # CIFAR-10, downloaded once into ~/tensorflow_datasets
    python scripts/train.py --norm bn --data-dir ../shared/data/cifar10-subset/cifar-10-binary.tar.gz
    python scripts/train.py --norm bn --resume             # continue checkpoints/bn
    python scripts/train.py --dataset mnist --norm bn --l1 1e-5   # MNIST, downloaded once -> checkpoints/mnist-bn
    python scripts/train.py --dataset folder --norm gn --data-dir my_images.zip   # train/<class>/*, test/<class>/*
    python scripts/train.py --dataset mnist --norm gn --data-dir ../shared/data/mnist --train-split 8000

Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, the command that resumes is
printed and the exit status is 128 + the signal number (130 for Ctrl-C).
"""

import argparse
import dataclasses
import os
import shlex
import sys

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import DATASET_DEFAULTS, DATASETS, NORMS, SCHEDULES, WIDTH_PRESETS, Config

DEFAULTS = Config()


def _default(name):
    """Help text for a default that depends on --dataset (argparse default None, see config_from_args)."""
    others = "; ".join(f"{v[name]} for {d}" for d, v in DATASET_DEFAULTS.items() if name in v)
    return f"(default {getattr(DEFAULTS, name)}" + (f"; {others})" if others else ")")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--norm", choices=NORMS, default=DEFAULTS.norm,
                   help="bn: BatchNorm, gn: GroupNorm, ln: LayerNorm over C,H,W (default %(default)s)")
    m.add_argument("--groups", type=int, help="GroupNorm groups, dividing every normalised width " + _default("groups"))
    m.add_argument("--preset", choices=sorted(WIDTH_PRESETS), default="seed",
                   help="channel widths: " + ", ".join(f"{k}={w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()))
    m.add_argument("--width", type=int, help="width of the 3x3 convs (overrides --preset)")
    m.add_argument("--transition-width", type=int, help="width of the 1x1 transitions (overrides --preset)")
    m.add_argument("--dropout", type=float, default=DEFAULTS.dropout,
                   help="dropout rate; whole channels in the MNIST net (default %(default)s)")
    m.add_argument("--skip", action="store_true", help="residual connections around the 3x3 convs of each block")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset,
                   help="cifar10: the seed CNN; mnist: the 10,224-parameter MNIST net, no flips; folder: the seed CNN "
                   "on the image folder --data-dir, one class per sub-folder (default %(default)s)")
    d.add_argument("--data-dir", help="CIFAR-10 archive (cifar-10-binary.tar.gz / cifar-10-python.tar.gz) or its "
                   "extracted folder; for mnist a folder of the idx files (t10k-images-idx3-ubyte.gz, ...); an image "
                   "folder train/<class>/*, test/<class>/* or a .tar/.tar.gz/.zip of one (folder; cifar10 with its "
                   "ten class names); or the folder that caches downloads (<dir>/jaxnorm-downloads) and TFDS "
                   "datasets (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    d.add_argument("--train-split", type=int, metavar="N",
                   help="train on the first N images of one file set and test on the rest (the training files, "
                   "or the test files when the folder has no training images, e.g. ../shared/data/mnist: "
                   "--train-split 8000 gives 8,000 train / 2,000 test). Needed when there are no training images")
    d.add_argument("--crop", action="store_true", help="also pad by 4 and crop randomly")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help=_default("epochs"))
    o.add_argument("--batch-size", type=int, help="global batch " + _default("batch_size"))
    o.add_argument("--lr", type=float, default=DEFAULTS.lr, help="initial learning rate (default %(default)s)")
    o.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="(default %(default)s)")
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    o.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                   help="step: x --lr-gamma every --lr-step-epochs; linear/cosine: decay to 0 at the last "
                   "step, after --warmup-epochs of linear warm-up (default %(default)s)")
    o.add_argument("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs,
                   help="linear warm-up epochs for the linear and cosine schedules (default %(default)s)")
    o.add_argument("--lr-step-epochs", type=int, default=DEFAULTS.lr_step_epochs,
                   help="multiply the learning rate by --lr-gamma every this many epochs (default %(default)s)")
    o.add_argument("--lr-gamma", type=float, default=DEFAULTS.lr_gamma, help="(default %(default)s)")
    o.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="(default %(default)s)")
    o.add_argument("--l1", type=float, default=DEFAULTS.l1, metavar="LAMBDA",
                   help="add LAMBDA * sum |conv kernels| to the loss, any norm; recorded as train_l1 "
                   "(default %(default)s: off)")
    o.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing, help="(default %(default)s)")
    o.add_argument("--seed", type=int, default=DEFAULTS.seed, help="same seed, same result (default %(default)s)")
    r = p.add_argument_group("run")
    r.add_argument("--workdir", help="run folder for checkpoints and metrics "
                   "(default checkpoints/<norm>; checkpoints/mnist-<norm>, checkpoints/folder-<norm> for those datasets)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir "
                   "(starts a new run, with a note, if it holds none yet)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines only)")
    return p.parse_args(argv)


def config_from_args(args) -> Config:
    width, transition = WIDTH_PRESETS[args.preset]
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(width=args.width or width, transition_width=args.transition_width or transition)
    return Config.for_dataset(values.pop("dataset"), **values).validate()  # dataset defaults, then flags


def resume_command(argv) -> str:
    """The command line that continues this run."""
    return shlex.join(["python", sys.argv[0], *[a for a in argv if a != "--resume"], "--resume"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = config_from_args(args)
    from jaxnorm.parallel import initialize_multihost
    from jaxnorm.train import TrainingError, TrainingInterrupted, train_and_evaluate  # after validation

    def run():
        initialize_multihost()
        try:
            default_dir = f"{config.dataset}-{config.norm}" if config.dataset in ("mnist", "folder") else config.norm
            train_and_evaluate(config, args.workdir or os.path.join("checkpoints", default_dir),
                               resume=args.resume, progress=not args.no_progress)
        except TrainingInterrupted as e:
            print(f"interrupted: {e}\nresume with: {resume_command(argv)}", file=sys.stderr)
            sys.exit(128 + e.signum)

    run_main(run, extra_errors=(TrainingError,))


if __name__ == "__main__":
    run_main(main)
