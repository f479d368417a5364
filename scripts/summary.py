"""Print the model summary table and the receptive-field table of a configuration.

    python scripts/summary.py --norm bn
    python scripts/summary.py --norm gn --preset narrow --skip
"""

import argparse

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import NORMS, WIDTH_PRESETS, Config

DEFAULTS = Config()


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("cifar10", "mnist"), default="cifar10",
                   help="cifar10: the seed CNN on 32x32x3; mnist: the MNIST net on 28x28x1 (default %(default)s)")
    p.add_argument("--norm", choices=NORMS, default=DEFAULTS.norm, help="(default %(default)s)")
    p.add_argument("--groups", type=int, help="GroupNorm groups (default: 8 for cifar10, 2 for mnist)")
    p.add_argument("--preset", choices=sorted(WIDTH_PRESETS), default="seed",
                   help="channel widths: " + ", ".join(f"{k}={w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()))
    p.add_argument("--width", type=int, help="width of the 3x3 convs (overrides --preset)")
    p.add_argument("--transition-width", type=int, help="width of the 1x1 transitions (overrides --preset)")
    p.add_argument("--skip", action="store_true", help="residual connections around the 3x3 convs")
    p.add_argument("--image-size", type=int, help="input height and width (default: 32 cifar10, 28 mnist)")
    p.add_argument("--channels", type=int, help="input channels (default: 3 cifar10, 1 mnist)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    width, transition = WIDTH_PRESETS[args.preset]
    mnist = args.dataset == "mnist"
    args.image_size = args.image_size or (28 if mnist else 32)
    args.channels = args.channels or (1 if mnist else 3)
    given = {"groups": args.groups} if args.groups is not None else {}
    config = Config.for_dataset(args.dataset, norm=args.norm, width=args.width or width,
                                transition_width=args.transition_width or transition, skip=args.skip,
                                **given).validate()
    if args.image_size <= 0 or args.channels <= 0:
        from jaxnorm.config import ConfigError
        raise ConfigError("--image-size and --channels must be positive")
    from jaxnorm.models import build_model
    from jaxnorm.report import format_receptive_field, model_summary, receptive_field

    model = build_model(config, (0.0,) * args.channels, (1.0,) * args.channels)
    print(model_summary(model, (args.image_size, args.image_size, args.channels)))
    print(f"\nreceptive field (input {args.image_size}x{args.image_size})")
    print(format_receptive_field(receptive_field(model.spatial_layers(), args.image_size)))


if __name__ == "__main__":
    run_main(main)
