"""Benchmark of the automatic L3 localiser: error and run time. Prints; not a test.

    .venv/bin/python benchmarks/bench_localize.py [--seeds N]

1. The spine-phantom suite (every variant of tests/test_localize.py, several seeds): L3
   error in mm against the phantom's truth, and whether the confidence is the expected one.
   Where the truth is ambiguous (4 or 6 lumbar vertebrae, a sacralised L5) the expected
   answer is LOW, and the error shown is that of the T12 count.
2. The real CT sample (if ../shared/data/totalsegmentator-example exists): L3 slice against
   k = 73, and TotalSegmentator's L3 label centroid through the second-opinion interface.
3. Run time on a 512 × 512 × 300 CT (a phantom resampled to 0.7 × 0.7 × 1 mm), the size the
   target (≤ 2 s on 2 cores) is stated for: median of three calls after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from L3MuscleSegLib import geometry
from L3MuscleSegLib.geometry import Volume
from L3MuscleSegLib.localize import (
    HIGH,
    LOW,
    MEDIUM,
    l3_z_from_totalseg,
    localize_l3,
    with_second_opinion,
)
from L3MuscleSegLib.spine_phantom import SpinePhantomSpec, spine_phantom

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/totalsegmentator-example"
REAL_L3_K = 73
SUITE = (  # (variant, expected confidence)
    ({}, HIGH),
    ({"slice_mm": 1.0}, HIGH),
    ({"slice_mm": 5.0}, HIGH),
    ({"scoliosis_mm": 30.0}, HIGH),
    ({"scoliosis_mm": -35.0, "slice_mm": 5.0}, HIGH),
    ({"noise_hu": 30.0}, HIGH),
    ({"fov_top": "L1"}, MEDIUM),
    ({"fov_bottom": "L5"}, MEDIUM),
    ({"n_lumbar": 4}, LOW),
    ({"n_lumbar": 6}, LOW),
    ({"sacralised": True}, LOW),
)


def phantom_suite(seeds: int) -> None:
    print(f"{'variant':<42}{'expected':>9}{'got':>24}{'|error| mm (mean, max)':>26}{'s/call':>8}")
    all_errors = []
    for variant, expected in SUITE:
        errors, got, seconds = [], [], []
        for seed in range(seeds):
            ph = spine_phantom(SpinePhantomSpec(seed=seed, **variant))
            start = time.perf_counter()
            loc = localize_l3(ph.volume)
            seconds.append(time.perf_counter() - start)
            got.append(loc.confidence)
            z = loc.l3_z_mm if expected != LOW else next(
                a.l3_z_mm for a in loc.anchors if a.name == "rib")
            errors.append(np.inf if z is None else abs(z - ph.l3_z_mm))
        all_errors += errors
        counts = ", ".join(f"{c} {got.count(c)}" for c in (HIGH, MEDIUM, LOW) if c in got)
        print(f"{str(variant or 'normal'):<42}{expected:>9}{counts:>24}"
              f"{np.mean(errors):>17.1f}{np.max(errors):>9.1f}{np.mean(seconds):>8.2f}")
    print(f"phantom suite: mean |error| {np.mean(all_errors):.1f} mm, "
          f"max {np.max(all_errors):.1f} mm over {len(all_errors)} cases")


def real_case() -> None:
    if not SAMPLE.is_dir():
        print(f"real CT: skipped ({SAMPLE} absent)")
        return
    volume = geometry.read_volume(SAMPLE / "example_ct.nii.gz")
    start = time.perf_counter()
    loc = localize_l3(volume)
    seconds = time.perf_counter() - start
    labels = Volume.from_sitk(sitk.ReadImage(str(SAMPLE / "spine/totalseg.nii.gz")))
    loc = with_second_opinion(loc, l3_z_from_totalseg(labels))
    step = volume.geometry.spacing[2]
    print(f"real CT: L3 slice {loc.l3_index} (reference {REAL_L3_K}): error "
          f"{(loc.l3_index - REAL_L3_K) * step:+.0f} mm, confidence {loc.confidence}, "
          f"{seconds:.2f} s; TotalSegmentator labels differ by "
          f"{loc.second_opinion.difference_mm:+.1f} mm")


def run_time() -> None:
    ph = spine_phantom(SpinePhantomSpec(slice_mm=1.0, fov_top="T11"))
    image = ph.volume.to_sitk()
    size, spacing = [512, 512, 300], [360 / 512, 360 / 512, 1.0]
    big = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        spacing, image.GetDirection(), -1000.0, sitk.sitkFloat32)
    volume = Volume.from_sitk(big)
    localize_l3(volume)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        loc = localize_l3(volume)
        seconds.append(time.perf_counter() - start)
    print(f"run time, 512 x 512 x 300 CT on {os.cpu_count()} cores: median "
          f"{statistics.median(seconds):.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds)})"
          f"; L3 error {abs(loc.l3_z_mm - ph.l3_z_mm):.1f} mm, {loc.confidence}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per phantom variant")
    args = parser.parse_args()
    phantom_suite(args.seeds)
    real_case()
    run_time()


if __name__ == "__main__":
    main()
