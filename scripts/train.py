"""Train the CIFAR-10 CNN or the MNIST net with one normalisation layer.

    python scripts/train.py --norm gn                   # CIFAR-10, downloaded once into ~/tensorflow_datasets
    python scripts/train.py --norm bn --data-dir ../shared/data/cifar10-subset/cifar-10-binary.tar.gz
    python scripts/train.py --norm bn --resume          # continue checkpoints/bn
    python scripts/train.py --dataset mnist --norm bn --l1 1e-5  # MNIST (downloaded) -> checkpoints/mnist-bn
    python scripts/train.py --dataset folder --norm gn --data-dir my_images.zip  # {train,test}/<class>/*
    python scripts/train.py --dataset mnist --norm gn --data-dir ../shared/data/mnist --train-split 8000

Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, the command that resumes is
printed and the exit status is 128 + the signal number (130 for Ctrl-C).
"""

import os
import sys

from jaxnorm.cli import OneLineParser, add_config_options, command_line, config_from_args, run_main
from jaxnorm.parallel import initialize_multihost
from jaxnorm.train import train_and_evaluate


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    add_config_options(p)
    r = p.add_argument_group("run")
    r.add_argument("--workdir", help="run folder for checkpoints and metrics (default checkpoints/<norm>; "
                   "checkpoints/mnist-<norm>, checkpoints/folder-<norm> for those datasets)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir "
                   "(starts a new run, with a note, if it holds none yet)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    initialize_multihost()
    default_dir = f"{config.dataset}-{config.norm}" if config.dataset in ("mnist", "folder") else config.norm
    train_and_evaluate(config, args.workdir or os.path.join("checkpoints", default_dir), resume=args.resume,
                       progress=not args.no_progress)


if __name__ == "__main__":
    run_main(main, resume_with=command_line(sys.argv[1:], add=["--resume"]))
