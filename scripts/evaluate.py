"""Evaluate a training run from its folder alone: metrics, misclassified grid and curves.

    python scripts/evaluate.py --workdir checkpoints/bn               # the final checkpoint, data as trained
    python scripts/evaluate.py --workdir checkpoints/bn --step 3910   # another checkpoint
    python scripts/evaluate.py --workdir checkpoints/val-bn --best    # best validation epoch (--train-split)
    python scripts/evaluate.py --workdir checkpoints/gn --data-dir /moved/to/cifar-10-binary.tar.gz

Writes evaluation.json, misclassified.png and curves.png (the run's whole history) into the run
folder. A run trained with random flips is also measured with test-time flip averaging (each test
image and its mirror image, logits averaged), reported on its own line. Checkpoints written on a GPU,
a TPU or several devices restore on one CPU. A run trained with --train-split is evaluated on its
validation images (held out of the training files), and the output says "validation", not "test";
only such a run has a "best" checkpoint, chosen on validation accuracy.
"""

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.evaluate import (
    dataset_for_run,
    format_metrics,
    reading_checkpoints,
    restore_run,
    write_run_report,
)
from jaxnorm.runlock import RunLock


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="the run folder (holding ckpt/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="checkpoint step (default: the final checkpoint)")
    which.add_argument("--final", action="store_true", help="the final checkpoint (the default)")
    which.add_argument("--best", action="store_true", help="the epoch of the best validation accuracy "
                       "(only for a run trained with --train-split)")
    p.add_argument("--data-dir", help="where the data is, if not where the run was trained from")
    p.add_argument("--count", type=int, help="misclassified images to show (default rows x cols)")
    p.add_argument("--rows", type=int, default=5, help="grid rows (default %(default)s)")
    p.add_argument("--cols", type=int, default=2, help="grid columns (default %(default)s)")
    args = p.parse_args(argv)
    if args.rows <= 0 or args.cols <= 0 or (args.count is not None and args.count <= 0):
        p.error("--rows, --cols and --count must be positive")
    if args.count is not None and args.count > args.rows * args.cols:
        p.error(f"--count {args.count} does not fit a {args.rows}x{args.cols} grid")
    return args


def main(argv=None):
    args = parse_args(argv)
    with reading_checkpoints(args.workdir) as checkpoints:  # a bad folder: one line, and nothing created
        checkpoints.require_latest_step()
    with RunLock(args.workdir):  # it writes into the run folder: not while a training run does
        run = restore_run(args.workdir, args.step, best=args.best)
        dataset = dataset_for_run(run, args.data_dir)
        record = write_run_report(run, dataset, rows=args.rows, cols=args.cols, count=args.count)
    print(f"{args.workdir}: {run.config.norm}, {record['num_params']:,} parameters, step {run.step} "
          f"(epoch {record['epoch']} of {len(run.history)}), data {dataset.source}")
    evaluated = run.config.evaluation_set  # "test", or "validation" for a --train-split run
    for key, name in (("train", "train"), ("test", evaluated)):
        m = record[key]
        print(f"{name:10s} accuracy {m['accuracy']:.2%}  loss {m['loss']:.4f}  ({m['count']} images)")
    if "test_flip_average" in record:
        m = record["test_flip_average"]
        print(f"{evaluated:10s} accuracy {m['accuracy']:.2%}  loss {m['loss']:.4f}  "
              "with test-time flip averaging")
    print("\n" + format_metrics(record["test"], dataset.class_names, title=f"{evaluated} set"))
    curves = ", curves.png" if run.history else ""
    print(f"\nwrote evaluation.json, misclassified.png{curves} in {args.workdir}")


if __name__ == "__main__":
    run_main(main)
