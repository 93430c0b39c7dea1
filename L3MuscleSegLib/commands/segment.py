"""``l3muscleseg segment``: one CT, one L3 slice, the nnU-Net ensemble, metrics and exports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipeline import AUTO, segment_case
from ._common import add_model_arguments, build_segmenter, case_id_from_path, stderr_progress
from .metrics import format_table

NAME = "segment"
HELP = "Segment psoas, paraspinal and abdominal-wall muscle on the L3 slice of a CT."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", type=Path, help="CT: NIfTI, NRRD, MHA, DICOM folder or DICOM file")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--slice", type=_slice_index, metavar="N|auto",
                       help="axial slice index along the CT's superior-inferior array axis, "
                            "or 'auto' to find the mid-L3 slice by counting vertebrae")
    where.add_argument("--z", type=float, metavar="MM", help="axial slice nearest to LPS z (mm)")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--case", dest="case_id", help="case ID for file names "
                        "(default: the CT's file name)")
    parser.add_argument("--height-m", type=float, metavar="H", help="patient height for SMI "
                        "(default: DICOM PatientSize when present)")
    parser.add_argument("--reference", type=Path, metavar="LABEL",
                        help="reference label map, adds Dice and Jaccard")
    parser.add_argument("--cohort-csv", type=Path, metavar="CSV",
                        help="also append the case's metrics row to this cohort CSV")
    parser.add_argument("--volume-label", action="store_true",
                        help="also write a full-volume label map on the CT's grid")
    parser.add_argument("--accept-low-confidence", action="store_true",
                        help="with --slice auto, segment even when the L3 finder is unsure "
                             "(the report and CSV still flag the case for review)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    case_id = args.case_id or case_id_from_path(args.ct)
    result = segment_case(
        args.ct, case_id, args.out, build_segmenter(args), slice_index=args.slice, z_mm=args.z,
        height_m=args.height_m, reference_path=args.reference,
        full_volume_label=args.volume_label, overwrite=args.overwrite,
        refuse_low_confidence=not args.accept_low_confidence, cohort_csv=args.cohort_csv,
        progress=stderr_progress,
    )
    print(f"{case_id}: slice {result.slice_.index}, z = {result.slice_.z_mm:.1f} mm")
    print(format_table(result.metrics))
    qc = result.row.get("qc_score")
    if qc is not None:
        flag = "  REVIEW RECOMMENDED" if result.row.get("review_recommended") else ""
        print(f"Fold agreement (QC): {qc:.3f}{flag}")
    print(f"Wrote {result.report_path.parent}/{case_id}-*", file=sys.stderr)
    return 0


def _slice_index(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    if text.lstrip("-").isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a slice number; give one such as 72, or 'auto'.")
