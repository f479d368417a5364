"""The two networks as data: one tuple of layers each. Everything about a network's shape is read
from here: the forward pass (`models.py`), the GroupNorm divisibility check (`Config.validate`) and
the receptive-field table. No JAX here, so the config can use it without building anything.

Layer kinds:
  block     conv -> norm -> ReLU -> dropout (+ the input, with --skip, where the shapes allow; ReLU before
            the norm with --relu-before-norm; GELU instead of ReLU with --activation gelu)
  conv      a conv alone (the 1x1 transitions and the classifier)
  max_pool  kernel x kernel max pooling with stride `stride`
  avg_pool  global average pooling (kernel None: the whole map)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Layer(NamedTuple):
    name: str  # the parameter name of its conv (its norm is `<name>_norm`)
    kind: str
    features: int = 0  # output channels of a conv or block
    kernel: int | None = 1
    stride: int = 1
    padding: int = 0


def cifar_cnn(width: int = 24, transition_width: int = 16, num_classes: int = 10) -> tuple[Layer, ...]:
    """C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10: 3x3 blocks, 1x1 transitions, max pools, 1x1 head."""
    def block(name):
        return Layer(name, "block", width, 3, 1, 1)

    def transition(name):
        return Layer(name, "conv", transition_width, 1)

    def pool(name):
        return Layer(name, "max_pool", 0, 2, 2)

    return (block("C1"), block("C2"), transition("c3"), pool("P1"),
            block("C3"), block("C4"), block("C5"), transition("c6"), pool("P2"),
            block("C7"), block("C8"), block("C9"), Layer("GAP", "avg_pool", kernel=None),
            Layer("c10", "conv", num_classes, 1))


def mnist_net(num_classes: int = 10) -> tuple[Layer, ...]:
    """The reference implementations' MNIST net: 28x28 -> pool -> 14x14 -> pool -> 7x7 -> two valid 3x3
    -> 3x3 -> GAP."""
    return (Layer("conv1", "block", 10, 3, 1, 1), Layer("conv2", "block", 16, 3, 1, 1),
            Layer("pool1", "max_pool", 0, 2, 2), Layer("conv3", "block", 8, 1),
            Layer("conv4", "block", 16, 3, 1, 1), Layer("conv5", "block", 16, 3, 1, 1),
            Layer("conv6", "block", 16, 3, 1, 1), Layer("pool2", "max_pool", 0, 2, 2),
            Layer("conv7", "block", 8, 1), Layer("conv8", "block", 10, 3), Layer("conv9", "block", 16, 3),
            Layer("conv10", "conv", num_classes, 1), Layer("avgpool", "avg_pool", kernel=None))


def network_layers(dataset: str, width: int, transition_width: int) -> tuple[Layer, ...]:
    """The layers of the network a dataset trains: the MNIST net for mnist, the CIFAR CNN otherwise."""
    return mnist_net() if dataset == "mnist" else cifar_cnn(width, transition_width)


def normalised_widths(layers: Sequence[Layer]) -> tuple[int, ...]:
    """Channel counts of the layers followed by a norm (GroupNorm's groups must divide each)."""
    return tuple(layer.features for layer in layers if layer.kind == "block")


def receptive_field(layers: Sequence[Layer], input_size: int) -> list[dict]:
    """Receptive field, jump (input pixels between neighbouring outputs) and output size after each layer.

    rf_out = rf_in + (k - 1) * jump_in; jump_out = jump_in * s; n_out = (n_in + 2p - k) // s + 1.
    A global pool (kernel None) covers the whole map it is given.
    """
    rf, jump, size = 1, 1, input_size
    table = []
    for layer in layers:
        kernel = size if layer.kernel is None else layer.kernel
        rf += (kernel - 1) * jump
        jump *= layer.stride
        size = (size + 2 * layer.padding - kernel) // layer.stride + 1
        table.append({"layer": layer.name, "kernel": kernel, "stride": layer.stride, "padding": layer.padding,
                      "rf": rf, "jump": jump, "output_size": size})
    return table


def format_receptive_field(table: list[dict]) -> str:
    lines = [f"{'layer':<7} {'kernel':>6} {'stride':>6} {'pad':>4} {'rf':>5} {'jump':>5} {'output':>7}"]
    lines += [f"{r['layer']:<7} {r['kernel']:>6} {r['stride']:>6} {r['padding']:>4} {r['rf']:>5} "
              f"{r['jump']:>5} {str(r['output_size']) + 'x' + str(r['output_size']):>7}" for r in table]
    return "\n".join(lines)
