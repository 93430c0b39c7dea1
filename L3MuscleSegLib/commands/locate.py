"""``l3muscleseg locate``: find the L3 slice automatically, print the levels, write a preview."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..export import write_json
from ..geometry import read_volume
from ._common import case_id_from_path

NAME = "locate"
HELP = ("Find the mid-vertebral L3 slice of a CT by counting vertebrae (no model weights); "
        "exit code 1 when the answer needs review.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", type=Path, help="CT: NIfTI, NRRD, MHA, DICOM folder or DICOM file")
    parser.add_argument("--preview", type=Path, metavar="PNG",
                        help="sagittal + coronal preview with the levels marked "
                             "(default: <case>-l3-locate.png in the current folder)")
    parser.add_argument("--no-preview", action="store_true", help="write no preview")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the localisation (levels, discs, anchors) as JSON")
    parser.add_argument("--totalsegmentator", action="store_true",
                        help="second opinion from TotalSegmentator (needs the package and "
                             "its weights); disagreement lowers the confidence")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu", "mps"),
                        help="device for TotalSegmentator (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    from ..localize import (  # scipy.signal: only when locating
        format_report,
        l3_z_from_totalseg,
        localize_l3,
        run_totalsegmentator,
        with_second_opinion,
        write_preview,
    )

    volume = read_volume(args.ct)
    loc = localize_l3(volume)
    if args.totalsegmentator:
        labels = run_totalsegmentator(volume, device=args.device)
        loc = with_second_opinion(loc, l3_z_from_totalseg(labels))
    print(format_report(loc))
    if not args.no_preview:
        preview = args.preview or Path(f"{case_id_from_path(args.ct)}-l3-locate.png")
        write_preview(volume, loc, preview, overwrite=args.overwrite)
        print(f"Wrote {preview}", file=sys.stderr)
    if args.json:
        write_json(args.json, loc.to_dict(), overwrite=args.overwrite)
        print(f"Wrote {args.json}", file=sys.stderr)
    if loc.needs_review:
        print("REVIEW: the automatic L3 is not reliable enough to use unchecked; look at the "
              "preview and pick the slice by hand (segment --slice N).", file=sys.stderr)
        return 1
    return 0
