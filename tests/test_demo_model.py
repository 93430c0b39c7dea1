"""The bundled demo model: complete, labelled as a demo, accurate on held-out phantoms, and
stable against a committed reference prediction (nnU-Net's own CI pattern)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib.cli import main
from L3MuscleSegLib.geometry import slice_from_array
from L3MuscleSegLib.inference import Segmenter, validate_model_folder
from L3MuscleSegLib.labels import MUSCLE_CLASSES
from L3MuscleSegLib.metrics import compute_metrics
from L3MuscleSegLib.models import DEMO_MODEL_DIR
from L3MuscleSegLib.phantom import make_phantom_slice

DEMO_LABEL = "demo, not for clinical use"
HELDOUT_SEEDS = (1_000_101, 1_000_202)  # training used seeds below 1_000_000
REFERENCE = Path(__file__).parent / "data" / "demo_model_reference.npz"


@pytest.fixture(scope="module")
def demo_segmenter() -> Segmenter:
    return Segmenter(DEMO_MODEL_DIR, device="cpu", tta=False)  # the demo command tests TTA


def test_demo_model_is_complete_small_and_labelled():
    info = validate_model_folder(DEMO_MODEL_DIR)
    assert len(info.folds) >= 3
    assert info.configuration == "2d"
    assert info.card_label == DEMO_LABEL
    size_mb = sum(f.stat().st_size for f in DEMO_MODEL_DIR.rglob("*") if f.is_file()) / 2**20
    assert size_mb <= 25


@pytest.mark.parametrize("seed", HELDOUT_SEEDS)
def test_demo_model_reaches_dice_090_on_held_out_phantoms(demo_segmenter, seed):
    phantom = make_phantom_slice(seed, size=256)
    slice_ = slice_from_array(phantom.image, phantom.spacing_mm)
    result = demo_segmenter.predict(slice_)
    metrics = compute_metrics(phantom.image, result.labels, phantom.spacing_mm,
                              reference=phantom.labels)
    assert metrics.mean_dice >= 0.90, metrics.row()


def test_demo_model_matches_its_committed_reference(demo_segmenter):
    """Preprocessing, orientation or ensembling changes show up here as a drop in Dice."""
    reference = np.load(REFERENCE)
    slice_ = slice_from_array(reference["image"], tuple(reference["spacing_mm"]))
    labels = demo_segmenter.predict(slice_).labels
    metrics = compute_metrics(reference["image"], labels, tuple(reference["spacing_mm"]),
                              reference=reference["labels"])
    for cls in metrics.classes:
        assert cls.dice >= 0.99, (cls.name, cls.dice)


def test_demo_command_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "256", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert DEMO_LABEL in printed
    for cls in MUSCLE_CLASSES:
        assert cls.name in printed
    report = json.loads((out / "phantom-report.json").read_text())
    assert report["inference"]["model_label"] == DEMO_LABEL
    assert report["metrics"]["mean_dice"] >= 0.85  # against the phantom's own truth
    ct = sitk.ReadImage(str(out / "phantom-ct.nii.gz"))
    label = sitk.ReadImage(str(out / "phantom-label.nii.gz"))
    k = report["input"]["slice_index"]
    assert label.GetOrigin() == pytest.approx(ct[:, :, k:k + 1].GetOrigin())
    assert (out / "phantom-overlay.png").stat().st_size > 10_000
