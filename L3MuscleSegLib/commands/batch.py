"""``l3muscleseg batch``: a cohort from a manifest, resumable, on local processes or Dask.

The exit code is the number of failed cases (capped at 125); 0 when all succeeded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
from pathlib import Path

from ._common import add_model_arguments, parse_folds

NAME = "batch"
HELP = ("Segment every case of a manifest CSV (case_id, path, slice and/or z_mm; optional "
        "height_m, sex, reference) into per-case outputs and one cohort CSV; resumable.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST.csv",
                        help="one row per case; relative paths are relative to its folder; "
                        "slice is an index or 'auto' (L3 localiser), z_mm an LPS z")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder: <case>-* files per case and cohort.csv; "
                        "rerunning into it skips finished cases")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="local worker processes, each loading the model once (default 1)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run on this Dask cluster instead; its workers must see the "
                        "model, the CTs and --out at the same paths")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo finished cases too, replacing their outputs")


def run(args: argparse.Namespace) -> int:
    from ..cohort import read_manifest, run_batch

    cases = read_manifest(args.manifest)
    summary = run_batch(cases, args.out, segmenter_factory(args), workers=args.workers,
                        scheduler=args.scheduler, overwrite=args.overwrite,
                        progress=_print_progress)
    print(f"{summary.total} cases: {summary.succeeded} done now, {summary.skipped} done "
          f"before, {len(summary.failures)} failed. Cohort table: {summary.csv_path}")
    for case_id, error in summary.failures:
        print(f"FAILED {case_id}: {error}", file=sys.stderr)
    return summary.exit_code


def segmenter_factory(args: argparse.Namespace) -> functools.partial:
    """A picklable recipe that builds the segmenter inside each worker process.

    Local workers share this machine's CPUs (or use ``--threads`` each); Dask workers use
    what their machine has.
    """
    from ..inference import Segmenter, available_cpus
    from ..models import resolve_model

    threads = args.threads or (
        None if args.scheduler else max(1, available_cpus() // max(1, args.workers)))
    return functools.partial(Segmenter, resolve_model(args.model).resolve(),
                             folds=parse_folds(args.folds), device=args.device, tta=args.tta,
                             checkpoint=args.checkpoint, num_threads=threads)


def _print_progress(progress) -> None:
    if progress.case_id is None:
        print(f"{progress.total} cases, {progress.skipped} already done", file=sys.stderr)
        return
    rate = f"{progress.rate_per_min:.1f} cases/min" if progress.rate_per_min else ""
    eta = (f"ETA {dt.timedelta(seconds=round(progress.eta_s))}"
           if progress.eta_s is not None else "")
    failed = f"{progress.failed} failed" if progress.failed else ""
    details = ", ".join(part for part in (rate, eta, failed) if part)
    print(f"[{progress.done}/{progress.total}] {progress.case_id}  {details}",
          file=sys.stderr, flush=True)
