"""Print the model summary table and the receptive-field table of a configuration.

    python scripts/summary.py --norm bn
    python scripts/summary.py --norm gn --preset narrow --skip
    python scripts/summary.py --dataset mnist
"""


from jaxnorm.cli import OneLineParser, add_config_options, config_from_args, run_main
from jaxnorm.config import ConfigError
from jaxnorm.models import build_model, model_summary
from jaxnorm.networks import format_receptive_field, receptive_field

MODEL_FIELDS = ("norm", "groups", "width", "transition_width", "skip", "relu_before_norm", "activation",
                "weight_standardization", "dataset")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    add_config_options(p, only=MODEL_FIELDS)
    p.add_argument("--image-size", type=int, help="input height and width (default: 28 for mnist, else 32)")
    p.add_argument("--channels", type=int, help="input channels (default: 1 for mnist, else 3)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    mnist = config.dataset == "mnist"
    size = args.image_size if args.image_size is not None else (28 if mnist else 32)
    channels = args.channels if args.channels is not None else (1 if mnist else 3)
    if size <= 0 or channels <= 0:
        raise ConfigError("--image-size and --channels must be positive")
    model = build_model(config, (0.0,) * channels, (1.0,) * channels)
    print(model_summary(model, (size, size, channels)))
    print(f"\nreceptive field (input {size}x{size})")
    print(format_receptive_field(receptive_field(model.spatial_layers(), size)))


if __name__ == "__main__":
    run_main(main)
