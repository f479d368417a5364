"""The figures of a run or a study: a grid of misclassified images, the loss/accuracy curves and the
batch-size sweep's error against batch size.

Matplotlib is used here only, through `Figure` objects (no pyplot state, no display needed), and
imported on first use: a script that draws nothing (training, a refused command) starts a second
sooner. Titles are wrapped to the figure's width (`_wrapped`), so a long name or path is never cut off.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from jaxnorm.config import Config

# One colour per norm in every figure, so that a norm looks the same in the curves and in the sweep.
NORM_COLORS = {"bn": "tab:blue", "gn": "tab:orange", "ln": "tab:green"}
_MORE_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure
    return Figure(layout="constrained", **kwargs)


def misclassified_grid(images: np.ndarray, chosen: Sequence[dict], class_names: Sequence[str],
                       path: str | Path, *, rows: int = 5, cols: int = 2, title: str = "") -> Figure:
    """Save (and return) a rows x cols grid of the `chosen` images (records of
    `evaluate.choose_misclassified`), as stored (un-normalised uint8), each annotated with its true and
    predicted class and probability."""
    if len(chosen) > rows * cols:
        raise ValueError(f"{len(chosen)} images do not fit a {rows}x{cols} grid")
    # Wide enough for a run title's two lines unwrapped even at 2 columns ("10,224 parameters |
    # validation accuracy 99.22% (step 11715)"); constrained layout keeps the labels of one row clear
    # of the images above.
    fig = _figure(figsize=(max(2.2 * cols, 5.2), 2.3 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), chosen, strict=False):  # the grid's last cells may stay empty
        image = np.asarray(images[c["index"]])
        if image.shape[-1] == 1:  # grayscale (MNIST): show as gray, not a colour map
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(f"true: {class_names[c['true']]}\npred: {class_names[c['predicted']]} "
                     f"({c['probability']:.0%})", fontsize=9)
    if not chosen:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=10)
    fig.suptitle(_wrapped(title, fig, 10), fontsize=10)
    fig.savefig(path, dpi=100)
    return fig


def _chars_across(inches: float, fontsize: float) -> int:
    """How many characters of text at `fontsize` fit across `inches`."""
    return int(inches * 72 / (0.62 * fontsize))  # DejaVu Sans averages under 0.62 em a glyph


def _wrapped(title: str, fig: Figure, fontsize: float) -> str:
    """`title` with every line wrapped to the figure's width, so no part of it falls outside. A line
    too long breaks at its " | " separators first, so a phrase ("(weight average, step 7020)") stays
    whole; only a part too long by itself (a path) wraps inside."""
    chars = _chars_across(fig.get_figwidth(), fontsize)
    lines = []
    for line in title.splitlines():
        parts = line.split(" | ")
        packed = [parts[0]]
        for part in parts[1:]:
            if len(packed[-1]) + len(" | ") + len(part) <= chars:
                packed[-1] += " | " + part
            else:
                packed.append(part)
        lines += packed
    return "\n".join(textwrap.fill(line, chars) for line in lines)


def plot_curves(runs: Mapping[str, tuple[Config, Sequence[list[dict]]]], path: str | Path, title: str = "",
                evaluation_set: str = "test") -> Figure:
    """Save (and return) loss and accuracy (%) per epoch, train dashed with open markers, the per-epoch
    evaluation (`evaluation_set`: "test" or "validation") solid with filled ones; each label's mean over
    its histories. `runs`: label -> (config, histories). The config gives the colour (its norm's) and
    the wording: a run trained with label smoothing has a train loss (the smoothed cross-entropy, above
    the plain one the evaluation measures) that says so; a run evaluated as a moving average of its
    weights (--ema-decay) has evaluation curves that say so."""
    fig = _figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    spare = iter(_MORE_COLORS)
    used = set()
    for label, (config, histories) in runs.items():
        color = NORM_COLORS[config.norm]
        color = next(spare) if color in used else color  # two variants of one norm in one figure
        used.add(color)
        epochs = min(len(h) for h in histories)
        if epochs == 0:
            continue
        x = np.arange(1, epochs + 1)
        marker = "o" if epochs <= 20 else None
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "accuracy", 100.0)):
            train = "train, label-smoothed" if key == "loss" and config.label_smoothing else "train"
            evaluation = f"{evaluation_set}, weight average" if config.ema_decay else evaluation_set
            for split, name, style, fill in (("train", train, "--", "none"),
                                             ("test", evaluation, "-", "full")):
                y = scale * np.mean([[e[f"{split}_{key}"] for e in h[:epochs]] for h in histories], axis=0)
                ax.plot(x, y, style, color=color, marker=marker, fillstyle=fill, markersize=5,
                        label=f"{label} {name}")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        # A long label (a network with several variants) wraps to the panel, less the line sample.
        chars = _chars_across(fig.get_figwidth() * ax.get_position().width - 0.6, 8)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, [textwrap.fill(label, chars) for label in labels], fontsize=8)
    fig.suptitle(_wrapped(title, fig, 10), fontsize=10)
    fig.savefig(path, dpi=100)
    return fig


def plot_sweep(series: list[dict], batch_sizes: Sequence[int], path: str | Path, title: str = "",
               legend_title: str | None = "mean ± std over seeds") -> Figure:
    """Test error (%) against batch size (`jaxnorm.sweep.sweep_series`) in the GroupNorm paper's layout:
    batch on a log2 axis, decreasing to the right; one colour per norm, BatchNorm's running averages
    solid and its batch statistics dashed; mean ± std over the seeds as error bars. The series are
    shifted a little sideways so that error bars at the same batch stay apart."""
    fig = _figure(figsize=(7.0, 5.2))
    ax = fig.subplots()
    shifts = np.linspace(-0.06, 0.06, len(series)) if len(series) > 1 else [0.0] * len(series)  # log2 units
    for line, shift in zip(series, shifts, strict=True):
        x = np.asarray(line["batch_sizes"], float) * 2.0 ** shift
        ax.errorbar(x, line["mean"], yerr=line["std"], fmt="s--" if line["batch_stats"] else "o-",
                    color=NORM_COLORS[line["norm"]], mfc="white" if line["batch_stats"] else None,
                    capsize=4, elinewidth=1, markersize=6, label=line["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
    ax.minorticks_off()
    ax.invert_xaxis()  # large batches left, as in the GroupNorm paper
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, title=legend_title, title_fontsize=8)
    ax.set_title(_wrapped(title, fig, 10), fontsize=10)
    fig.savefig(path, dpi=110)
    return fig
