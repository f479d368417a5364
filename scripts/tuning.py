"""Compare validation runs: one table row per run folder, from its metrics and its final evaluation.

    python scripts/tuning.py results/cifar10-jpeg/tuning-runs/* --out results/cifar10-jpeg/tuning-runs.md

Every run must have a validation split (`--train-split`) and an `evaluation.json` of its final
checkpoint (`python scripts/evaluate.py --workdir RUN --final`). See jaxnorm/tuning.py.
"""

import shlex
from pathlib import Path

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.tuning import run_row, write_tuning_table


def main(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = p.parse_args(argv)
    rows = [run_row(w) for w in args.runs if w.is_dir()]
    if not rows:
        p.error("no run folders given")
    table = write_tuning_table(rows, shlex.join(["python", "scripts/tuning.py", *map(str, args.runs)]
                                         + (["--out", str(args.out)] if args.out else [])))
    if args.out:
        args.out.write_text(table)
        print(f"wrote {args.out}")
    else:
        print(table)


if __name__ == "__main__":
    run_main(main)
