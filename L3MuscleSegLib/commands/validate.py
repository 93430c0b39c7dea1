"""``l3muscleseg validate``: the study's agreement statistics against reference labels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "validate"
HELP = ("Compare predicted label maps with references: Dice, share ≥ 0.90, area and HU "
        "agreement (Pearson, MAE, Bland–Altman), optional paired comparison; CSV, PNG, HTML.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, metavar="DIR",
                        help="predicted label maps: <case>-label.nii.gz or <case>.nii.gz")
    parser.add_argument("--ref", type=Path, required=True, metavar="DIR",
                        help="reference label maps, named like the predictions; the CT "
                        "<case>-image.nii.gz beside them (or the predictions) gives HU")
    parser.add_argument("--pred-b", type=Path, metavar="DIR",
                        help="second set of predictions (e.g. ensemble vs single fold): "
                        "paired t-test on per-case mean Dice and change in minimum Dice")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR",
                        help="folder for the CSV tables, PNG plots and report.html")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier report in REPORT_DIR")


def run(args: argparse.Namespace) -> int:
    from ..validation import validate, write_report

    result = validate(args.pred, args.ref, args.pred_b, progress=_print_progress)
    report = write_report(result, args.out, overwrite=args.overwrite)
    mean = result.dice.loc["mean"]
    print(f"{int(mean['n'])} cases: mean Dice {mean['mean']:.3f} ± {mean['sd']:.3f}, "
          f"min {mean['min']:.3f} ({mean['worst_case']}), "
          f"{mean['share_ge_0.90']:.0%} ≥ 0.90. Report: {report}")
    return 0


def _print_progress(done: int, total: int) -> None:
    end = "\n" if done == total else ""
    print(f"\rcompared {done}/{total}", end=end, file=sys.stderr, flush=True)
