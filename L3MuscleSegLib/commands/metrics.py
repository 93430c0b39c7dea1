"""``l3muscleseg metrics IMAGE LABEL``: measure a labelled slice and print a per-class table."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import InputError
from ..export import check_writable, write_json, write_metrics_csv
from ..geometry import read_slice
from ..metrics import TABLE_COLUMNS, MuscleMetrics, compute_slice_metrics
from ..pipeline import patient_height, read_labels_on_slice
from ._common import case_id_from_path

NAME = "metrics"
HELP = "Measure muscle area, HU, IMAT, Dice and SMI on a CT slice from a label map."


_FORMATS = {"area_cm2": "{:.2f}", "mean_hu": "{:.1f}", "sd_hu": "{:.1f}",
            "muscle_window_area_cm2": "{:.2f}", "imat_area_cm2": "{:.2f}",
            "dice": "{:.3f}", "jaccard": "{:.3f}"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="CT in HU: a one-slice image such as "
                        "<case>-image.nii.gz, or a 3D CT with --slice or --z")
    parser.add_argument("label", type=Path, help="label map (0 background, 1 psoas, "
                        "2 paraspinal, 3 abdominal wall), matched to the slice by position")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--slice", type=int, metavar="N",
                       help="axial slice index along the 3D CT's superior-inferior array axis")
    where.add_argument("--z", type=float, metavar="MM",
                       help="axial slice nearest to this LPS z in mm (3D CT)")
    parser.add_argument("--reference", type=Path, metavar="REF",
                        help="reference label map, for Dice and Jaccard")
    parser.add_argument("--height-m", type=float, metavar="H", help="patient height in "
                        "metres, for SMI (default: DICOM PatientSize when present)")
    parser.add_argument("--case-id", help="case id in the CSV and JSON (default: IMAGE's "
                        "file name without suffix and '-image')")
    parser.add_argument("--csv", type=Path, metavar="OUT.csv", help="write a metrics row")
    parser.add_argument("--append", action="store_true",
                        help="append the row to an existing --csv file with the same columns")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write a JSON report")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    if args.append and args.csv is None:
        raise InputError("--append needs --csv OUT.csv to append to.")
    if args.json is not None:
        check_writable(args.json, args.overwrite)
    volume, slice_ = read_slice(args.image, index=args.slice, z_mm=args.z)
    labels = read_labels_on_slice(args.label, slice_)
    reference = None if args.reference is None else read_labels_on_slice(args.reference, slice_)
    result = compute_slice_metrics(slice_, labels, reference, patient_height(args.height_m, volume))
    print(format_table(result))
    case_id = args.case_id or case_id_from_path(args.image).removesuffix("-image")
    row = {"case_id": case_id, "image": str(args.image),
           "label": str(args.label), "reference": str(args.reference or ""),
           "slice_index": slice_.index, "z_mm": slice_.z_mm, **result.row()}
    if args.csv is not None:
        write_metrics_csv(args.csv, [row], append=args.append, overwrite=args.overwrite)
    if args.json is not None:
        write_json(args.json, {**row, "classes": result.table()}, overwrite=args.overwrite)
    return 0


def format_table(result: MuscleMetrics) -> str:
    """The per-class table, then mean Dice and SMI, as aligned plain text."""
    columns = [(key, header) for key, header in TABLE_COLUMNS
               if key not in ("dice", "jaccard") or result.mean_dice is not None]
    cells = [[header for _, header in columns]]
    cells += [[_cell(key, row[key]) for key, _ in columns] for row in result.table()]
    lines = _aligned(cells)
    if result.mean_dice is not None:
        lines.append(f"Mean Dice (3 classes): {result.mean_dice:.3f}")
    if result.smi_cm2_m2 is None:
        lines.append("SMI: n/a (give --height-m)")
    else:
        lines.append(f"SMI: {result.smi_cm2_m2:.2f} cm²/m² (height {result.height_m:.2f} m)")
    return "\n".join(lines)


def _aligned(cells: list[list[str]]) -> list[str]:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(text) for text in column) for column in zip(*cells, strict=True)]
    return ["  ".join(text.ljust(w) if i == 0 else text.rjust(w)
                      for i, (text, w) in enumerate(zip(line, widths, strict=True)))
            for line in cells]


def _cell(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return _FORMATS.get(key, "{}").format(value)
