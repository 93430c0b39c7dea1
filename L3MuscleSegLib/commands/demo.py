"""``l3muscleseg demo``: the whole job on a synthetic phantom CT with the bundled demo model."""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from ..export import atomic_path
from ..geometry import Geometry
from ..pipeline import segment_case
from ._common import stderr_progress
from .metrics import format_table

NAME = "demo"
HELP = ("Segment a synthetic phantom CT with the bundled demo model "
        "(demo, not for clinical use) and print its metrics.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), metavar="DIR",
                        help="output folder (default: out/demo)")
    parser.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026)")
    parser.add_argument("--size", type=int, default=512, choices=(256, 512),
                        help="phantom slice size in pixels (default 512)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    from ..inference import Segmenter
    from ..models import DEMO_MODEL_DIR
    from ..phantom import make_phantom_volume

    volume, truth = make_phantom_volume(args.seed, size=args.size)
    ct_path = _write_volume(args.out / "phantom-ct.nii.gz", volume.array, volume.geometry,
                            args.overwrite)
    truth_path = _write_volume(args.out / "phantom-truth-label.nii.gz", truth,
                               volume.geometry, args.overwrite)
    segmenter = Segmenter(DEMO_MODEL_DIR, device=args.device)
    result = segment_case(ct_path, "phantom", args.out, segmenter,
                          slice_index=volume.n_axial_slices // 2, reference_path=truth_path,
                          overwrite=args.overwrite, progress=stderr_progress)
    print(f"Model: {segmenter.provenance().get('model_label', 'demo model')}")
    print(f"Phantom CT: {ct_path} (slice {result.slice_.index}, z = {result.slice_.z_mm:.1f} mm)")
    print(format_table(result.metrics))
    print(f"Overlay: {result.overlay_path}")
    print(f"Report:  {result.report_path}")
    return 0


def _write_volume(path: Path, array, geometry: Geometry, overwrite: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite) as temp:
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(temp),
                        useCompression=True)
    return path
