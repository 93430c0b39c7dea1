"""Per-slice inference time: the in-process Segmenter against the nnUNetv2_predict path.

Not a test: it prints medians over repeated runs. Each measurement runs in a fresh child
process, so its peak resident memory (RSS) is its own. See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "L3MuscleSegLib" / "data" / "demo_model"
SLICE_MM = 3.0  # thickness written into the input NIfTI
DEFAULT_DATASET = "Dataset990_DefaultL3"


# ---------------------------------------------------------------- a default-size 2D model


def plan_default_2d(root: Path) -> dict:
    """nnU-Net's own ExperimentPlanner on the fingerprint of 100 one-slice 512² CT at 0.78 mm.

    The fingerprint is written by hand (no images needed to plan, apart from one file that
    tells nnU-Net which reader to use); planning runs in a child process with nnU-Net's
    folder variables set in that child's environment only.
    """
    raw, preprocessed = root / "raw" / DEFAULT_DATASET, root / "preprocessed" / DEFAULT_DATASET
    (raw / "imagesTr").mkdir(parents=True)
    preprocessed.mkdir(parents=True)
    labels = {"background": 0, "psoas": 1, "paraspinal": 2, "abdominal_wall": 3}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 100,
        "file_ending": ".nii.gz", "name": DEFAULT_DATASET}))
    write_slice_nifti(np.zeros((8, 8), np.float32), (0.78, 0.78),
                      raw / "imagesTr" / "case_0000.nii.gz")
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [[SLICE_MM, 0.78, 0.78]] * 100,
        "shapes_after_crop": [[1, 512, 512]] * 100,
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 40.0, "median": 42.0, "std": 30.0, "min": -200.0, "max": 250.0,
            "percentile_00_5": -90.0, "percentile_99_5": 150.0}},
        "median_relative_size_after_cropping": 1.0}))
    code = ("from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner "
            f"import ExperimentPlanner; ExperimentPlanner('{DEFAULT_DATASET}').plan_experiment()")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return json.loads((preprocessed / "nnUNetPlans.json").read_text())


def build_default_model(root: Path, n_folds: int = 5) -> tuple[Path, int]:
    """A model folder with nnU-Net's default 2D network, He-initialised random weights.

    Every fold holds the same weights (hard links, to spare disk); the predictor still
    loads each fold's file separately, as it would for trained folds.
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = plan_default_2d(root)
    manager = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("2d"), 1, 4, enable_deep_supervision=False)
    model = root / "results" / DEFAULT_DATASET / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True)
    shutil.copy(root / "raw" / DEFAULT_DATASET / "dataset.json", model)
    (model / "plans.json").write_text(json.dumps(plans))
    first = model / "fold_0" / "checkpoint_final.pth"
    first.parent.mkdir()
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "2d"},
                "inference_allowed_mirroring_axes": (0, 1)}, first)
    for fold in range(1, n_folds):
        (model / f"fold_{fold}").mkdir()
        os.link(first, model / f"fold_{fold}" / "checkpoint_final.pth")
    return model, sum(p.numel() for p in network.parameters())


# ---------------------------------------------------------------- measurements (children)


def write_slice_nifti(pixels: np.ndarray, spacing_rc, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(pixels[None])
    image.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0]), SLICE_MM))
    sitk.WriteImage(image, str(path))


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def measure_segmenter(model: str, image: str, tta: bool, repeats: int, threads: int) -> dict:
    import SimpleITK as sitk

    from L3MuscleSegLib.geometry import slice_from_array
    from L3MuscleSegLib.inference import Segmenter

    source = sitk.ReadImage(image)
    spacing = source.GetSpacing()
    slice_ = slice_from_array(sitk.GetArrayFromImage(source)[0], (spacing[1], spacing[0]))
    start = time.perf_counter()
    segmenter = Segmenter(model, device="cpu", tta=tta, num_threads=threads or None)
    load = time.perf_counter() - start
    segmenter.predict(slice_)  # first call: allocator and kernel warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter.predict(slice_)
        seconds.append(time.perf_counter() - start)
    return {"load_s": load, "per_slice_s": seconds, "folds": list(segmenter.folds),
            "peak_rss_mb": peak_rss_mb()}


def measure_nnunet_predict(model: str, image: str, tta: bool, repeats: int, folds: list[int]
                           ) -> dict:
    """One nnUNetv2_predict_from_modelfolder process per slice, as a per-slice call costs."""
    tool = Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")
    seconds = []
    with tempfile.TemporaryDirectory() as work:
        inputs = Path(work) / "in"
        inputs.mkdir()
        shutil.copy(image, inputs / "case_0000.nii.gz")
        argv = [str(tool), "-i", str(inputs), "-o", str(Path(work) / "out"), "-m", model,
                "-f", *map(str, folds), "-device", "cpu", "-npp", "1", "-nps", "1",
                "--disable_progress_bar"] + ([] if tta else ["--disable_tta"])
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
    return {"per_slice_s": seconds, "peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


def run_child(*args: str) -> dict:
    """A measurement in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    kind, model, image, tta, repeats, *rest = argv
    if kind == "segmenter":
        result = measure_segmenter(model, image, tta == "1", int(repeats), int(rest[0]))
    else:
        result = measure_nnunet_predict(model, image, tta == "1", int(repeats),
                                        [int(f) for f in rest])
    print(json.dumps(result))


# ---------------------------------------------------------------- report


def models_to_measure(args, work: Path) -> list[tuple[str, Path]]:
    models = []
    if args.model:
        models.append((f"model {args.model}", Path(args.model)))
    elif (DEMO_MODEL / "plans.json").is_file():
        models.append(("demo model", DEMO_MODEL))
    else:
        print(f"(demo model not found at {DEMO_MODEL}; skipped)")
    if not args.skip_default:
        model, n_parameters = build_default_model(work)
        models.append((f"default 2D nnU-Net, {n_parameters / 1e6:.1f} M parameters, "
                       "random weights", model))
    return models


def describe(name: str, runs: dict) -> list[str]:
    lines = [name]
    for tta in sorted({tta for _, tta in runs}, reverse=True):
        ours, theirs = runs[("segmenter", tta)], runs.get(("nnunet", tta))
        ours_s = statistics.median(ours["per_slice_s"])
        line = (f"  TTA {'on ' if tta else 'off'}  Segmenter {ours_s:7.2f} s/slice "
                f"(load once {ours['load_s']:.1f} s, peak RSS {ours['peak_rss_mb']:.0f} MB)")
        if theirs:
            their_s = statistics.median(theirs["per_slice_s"])
            line += (f" | nnUNetv2_predict {their_s:7.2f} s/slice (peak RSS "
                     f"{theirs['peak_rss_mb']:.0f} MB) | ratio {their_s / ours_s:.2f}×")
        lines.append(line)
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--quick", action="store_true",
                        help="one timed run each, TTA on only: a smoke run, not the numbers")
    parser.add_argument("--model", help="measure this model folder instead of the demo model")
    parser.add_argument("--skip-default", action="store_true",
                        help="skip the default-size random-weight 2D network")
    parser.add_argument("--skip-subprocess", action="store_true",
                        help="skip the nnUNetv2_predict_from_modelfolder path")
    parser.add_argument("--seed", type=int, default=3, help="phantom seed")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the Segmenter (default: its own default, every "
                             "available CPU, as nnUNetv2_predict -device cpu always uses)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    from L3MuscleSegLib.phantom import make_phantom_slice

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_phantom_slice(args.seed, size=512)
        image = work / "slice.nii.gz"
        write_slice_nifti(phantom.image, phantom.spacing_mm, image)
        print(f"Input: phantom seed {args.seed}, 512×512 at {phantom.spacing_mm[0]:.2f} mm; "
              f"{os.cpu_count()} CPUs; Segmenter threads: {args.threads or 'default'}; "
              f"median of {repeats} run(s) per figure.")
        for name, model in models_to_measure(args, work):
            runs = {}
            for tta in ((True,) if args.quick else (True, False)):
                flag = "1" if tta else "0"
                runs[("segmenter", tta)] = ours = run_child(
                    "segmenter", str(model), str(image), flag, str(repeats), str(args.threads))
                if not args.skip_subprocess:
                    runs[("nnunet", tta)] = run_child(
                        "nnunet", str(model), str(image), flag, str(repeats),
                        *map(str, ours["folds"]))
            print("\n".join(describe(f"{name}, {len(ours['folds'])} folds:", runs)), flush=True)


if __name__ == "__main__":
    main()
