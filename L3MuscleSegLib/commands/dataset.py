"""`l3muscleseg dataset build`: image/label pairs → a validated nnU-Net v2 raw dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import dataset

NAME = "dataset"
HELP = "Build an nnU-Net v2 training dataset from <case>-image/-label.nii.gz pairs."

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="validate all pairs, then write DatasetNNN_Name (reoriented to LPS)",
        description="Validate every <case>-image.nii.gz / <case>-label.nii.gz pair, then "
                    "write OUT/DatasetNNN_NAME (imagesTr, labelsTr, dataset.json) with images "
                    "and labels reoriented to the canonical LPS grid. Nothing is written if "
                    "any pair fails.")
    build.add_argument("--pairs", nargs="+", required=True, type=Path, metavar="DIR",
                       help="folders holding the pairs (case IDs must be unique across them)")
    build.add_argument("--id", type=int, required=True, dest="dataset_id",
                       help="nnU-Net dataset ID, 1..999 (e.g. 711)")
    build.add_argument("--name", required=True, help="dataset name, e.g. L3SM")
    build.add_argument("--out", required=True, type=Path, metavar="NNUNET_RAW",
                       help="nnU-Net raw folder to write the dataset into")
    build.add_argument("--fix-geometry", action="store_true",
                       help=f"copy the image grid onto a label whose spacing/origin differ by "
                            f"≤ {dataset.FIX_TOLERANCE_MM} mm and direction by "
                            f"≤ {dataset.FIX_TOLERANCE_DIRECTION} (float noise)")
    build.add_argument("--force", action="store_true",
                       help="replace an existing dataset folder of the same ID and name")
    build.add_argument("--report", type=Path, metavar="JSON",
                       help="where to write the JSON report (default: "
                            "NNUNET_RAW/DatasetNNN_NAME.report.json)")


def run(args: argparse.Namespace) -> int:
    folder_name = dataset.dataset_folder_name(args.dataset_id, args.name)
    report = dataset.build_dataset(args.pairs, args.dataset_id, args.name, args.out,
                                   fix_geometry=args.fix_geometry, force=args.force)
    print(report.format())
    report_path = dataset.write_report(
        report, args.report or args.out / f"{folder_name}.report.json")
    print(f"Report: {report_path}")
    return EXIT_OK if report.ok else EXIT_FAILED
