"""The CIFAR-10 network in PyTorch, as a speed reference for scripts/benchmark.py (torch is optional).

    python benchmarks/torch_reference.py --norm bn gn ln          # prints one JSON line per norm

The same layers, parameter count and training step as jaxnorm's CifarCNN: 3x3 convs (no bias) ->
norm -> ReLU -> dropout, 1x1 transitions + 2x2 max pooling, global average pooling, a 1x1 conv to
the logits; input normalised inside the model; the batch gathered from a uint8 dataset in memory
and flipped at random; cross-entropy; SGD with momentum 0.9 and weight decay 5e-4. NCHW (PyTorch's
default layout) on `--threads` threads. LayerNorm is jaxnorm's: each sample normalised over C, H and
W with a per-channel scale and bias, which is exactly GroupNorm with one group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def norm_layer(norm: str, channels: int, groups: int = 8) -> nn.Module:
    if norm == "bn":  # torch's momentum 0.1 is Flax's 0.9 (the weight of the old running value)
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if norm == "gn":
        return nn.GroupNorm(groups, channels, eps=1e-5)
    if norm == "ln":
        return nn.GroupNorm(1, channels, eps=1e-5)
    raise ValueError(f"unknown norm {norm!r}")


class CifarCNN(nn.Module):
    def __init__(self, norm: str = "bn", width: int = 24, transition_width: int = 16, dropout: float = 0.05,
                 num_classes: int = 10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

        def conv(cin):
            return [nn.Conv2d(cin, width, 3, padding=1, bias=False), norm_layer(norm, width), nn.ReLU(),
                    nn.Dropout(dropout)]

        def transition():
            return [nn.Conv2d(width, transition_width, 1, bias=False), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*conv(3), *conv(width), *transition(),
                                  *conv(transition_width), *conv(width), *conv(width), *transition(),
                                  *conv(transition_width), *conv(width), *conv(width),
                                  nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, num_classes, 1, bias=False),
                                  nn.Flatten())

    def forward(self, x):  # x: uint8 NCHW
        return self.body((x.float() - self.mean) / self.std)


def benchmark(norm: str, batch_size: int = 128, steps: int = 20, repeats: int = 5, threads: int = 2,
              num_images: int = 5120, eval_images: int = 10_000, dropout: float = 0.05) -> dict:
    """Median training and evaluation throughput (images/s) on random uint8 data."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (num_images,))
    model = CifarCNN(norm, dropout=dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def train(n):
        model.train()
        for _ in range(n):
            idx = torch.randint(0, num_images, (batch_size,))
            x, y = images[idx], labels[idx]
            flip = torch.rand(batch_size) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return loss.item()

    def evaluate():
        model.eval()
        with torch.no_grad():
            for i in range(0, eval_images, 500):
                model(images[i % num_images:i % num_images + 500])

    def timed(fn, reps):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    train(3)  # warm-up
    step_s = timed(lambda: train(steps), repeats) / steps
    evaluate()
    eval_s = timed(evaluate, max(1, repeats // 2))
    return {"norm": norm, "batch_size": batch_size, "threads": threads, "torch": torch.__version__,
            "dropout": dropout, "num_params": sum(p.numel() for p in model.parameters()),
            "train_images_per_s": batch_size / step_s, "eval_images_per_s": eval_images / eval_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", nargs="+", choices=("bn", "gn", "ln"), default=["bn", "gn", "ln"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.05,
                   help="as jaxnorm's --dropout (nn.Dropout(0) is a no-op)")
    args = p.parse_args(argv)
    for norm in args.norm:
        print(json.dumps(benchmark(norm, args.batch_size, args.steps, args.repeats, args.threads,
                                   dropout=args.dropout)), flush=True)


if __name__ == "__main__":
    main()
