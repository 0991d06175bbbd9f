"""Report of a search and of what was pruned and retrained from it: report.json and PNG plots.

    python -m launch.report --run-dir runs/synthetic/search --reference runs/synthetic/train
    dnis report --run-dir runs/synthetic/search --retrain runs/synthetic-cr20 --out reports/synthetic

Retrain runs inside the search directory are found on their own; ``--retrain`` adds
others. Writes ``report.json``, ``alpha.png``, ``dims.png``, ``cr_auc.png`` and
``params.png`` to ``--out`` (default ``<run-dir>/report``; ``report.json`` last) and
prints the compression-ratio table. One process, no process group; see
``pipeline.report`` for what each file holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import ConfigError
from pipeline.report import ReportError, build_report, format_summary, write_report
from launch import run_as_process


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory of a finished search")
    parser.add_argument(
        "--retrain", action="append", default=[], type=Path, metavar="DIR",
        help="a retrain run outside the search directory (repeatable)",
    )
    parser.add_argument("--reference", type=Path, help="a plain training run: the full-table model at CR 1")
    parser.add_argument("--out", type=Path, help="report directory (default: <run-dir>/report)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        report = build_report(args.run_dir, args.retrain, args.reference)
    except (ReportError, ConfigError) as error:
        raise SystemExit(f"dnis report: {error}") from None
    out = args.out or args.run_dir / "report"
    write_report(report, out)
    print(format_summary(report))
    print(f"report: {out / 'report.json'} and {', '.join(report['plots'])}")
    return report


if __name__ == "__main__":
    run_as_process(main)
