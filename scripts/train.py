"""Train the seed CNN with one normalisation layer.

    python scripts/train.py --norm gn                      # CIFAR-10 through TFDS
    python scripts/train.py --norm bn --data-dir ../shared/data/cifar10-subset/cifar-10-binary.tar.gz
    python scripts/train.py --norm bn --resume             # continue checkpoints/bn

Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, the command that resumes is
printed and the exit status is 128 + the signal number (130 for Ctrl-C).
"""

import argparse
import dataclasses
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnorm.cli import OneLineParser, run_main  # noqa: E402
from jaxnorm.config import DATASETS, NORMS, WIDTH_PRESETS, Config  # noqa: E402

DEFAULTS = Config()


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--norm", choices=NORMS, default=DEFAULTS.norm,
                   help="bn: BatchNorm, gn: GroupNorm, ln: LayerNorm over C,H,W (default %(default)s)")
    m.add_argument("--groups", type=int, default=DEFAULTS.groups, help="GroupNorm groups (default %(default)s)")
    m.add_argument("--preset", choices=sorted(WIDTH_PRESETS), default="seed",
                   help="channel widths: " + ", ".join(f"{k}={w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()))
    m.add_argument("--width", type=int, help="width of the 3x3 convs (overrides --preset)")
    m.add_argument("--transition-width", type=int, help="width of the 1x1 transitions (overrides --preset)")
    m.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="dropout rate (default %(default)s)")
    m.add_argument("--skip", action="store_true", help="residual connections around the 3x3 convs of each block")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset, help="(default %(default)s)")
    d.add_argument("--data-dir", help="CIFAR-10 archive (cifar-10-binary.tar.gz / cifar-10-python.tar.gz), "
                   "its extracted folder, or a TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    d.add_argument("--crop", action="store_true", help="also pad by 4 and crop randomly")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="(default %(default)s)")
    o.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch (default %(default)s)")
    o.add_argument("--lr", type=float, default=DEFAULTS.lr, help="initial learning rate (default %(default)s)")
    o.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="(default %(default)s)")
    o.add_argument("--lr-step-epochs", type=int, default=DEFAULTS.lr_step_epochs,
                   help="multiply the learning rate by --lr-gamma every this many epochs (default %(default)s)")
    o.add_argument("--lr-gamma", type=float, default=DEFAULTS.lr_gamma, help="(default %(default)s)")
    o.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="(default %(default)s)")
    o.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing, help="(default %(default)s)")
    o.add_argument("--seed", type=int, default=DEFAULTS.seed, help="same seed, same result (default %(default)s)")
    r = p.add_argument_group("run")
    r.add_argument("--workdir", help="run folder for checkpoints and metrics (default checkpoints/<norm>)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir "
                   "(starts a new run, with a note, if it holds none yet)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines only)")
    return p.parse_args(argv)


def config_from_args(args) -> Config:
    width, transition = WIDTH_PRESETS[args.preset]
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(width=args.width or width, transition_width=args.transition_width or transition)
    return Config(**values).validate()


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
            train_and_evaluate(config, args.workdir or os.path.join("checkpoints", config.norm),
                               resume=args.resume, progress=not args.no_progress)
        except TrainingInterrupted as e:
            print(f"interrupted: {e}\nresume with: {resume_command(argv)}", file=sys.stderr)
            sys.exit(128 + e.signum)

    run_main(run, extra_errors=(TrainingError,))


if __name__ == "__main__":
    run_main(main)
