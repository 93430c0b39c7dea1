"""Model-folder validation and the Segmenter, on small real nnU-Net v2 model folders.

The tiny model (conftest's ``tiny_model``, built by tests/nnunet_fixtures.py) is planned by
nnU-Net, trained briefly and cached between runs; nothing of nnU-Net is mocked. The
fidelity tests run the real ``nnUNetv2_predict_from_modelfolder`` in a child process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_fixtures import (
    DATASET_NAME,
    MODEL_SUBDIR,
    SIZE,
    SPACING_MM,
    tiny_case,
    write_one_slice_nifti,
)

from L3MuscleSegLib.errors import CancelledError, InputError, ModelError
from L3MuscleSegLib.geometry import slice_from_array
from L3MuscleSegLib.inference import (
    MODEL_CARD,
    Segmenter,
    available_cpus,
    format_folds,
    resolve_device,
    validate_model_folder,
)
from L3MuscleSegLib.jobs import SubprocessRunner, run_checked
from L3MuscleSegLib.qc import dice

DEMO_MODEL = Path(__file__).resolve().parents[1] / "L3MuscleSegLib" / "data" / "demo_model"
# One torch thread: tiny networks run faster so, and far faster on a busy shared runner.
ON_CPU = {"device": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def segmenter(tiny_model) -> Segmenter:
    return Segmenter(tiny_model, **ON_CPU)


@pytest.fixture(scope="module")
def case():
    image, truth = tiny_case(100)
    return slice_from_array(image, (SPACING_MM, SPACING_MM)), truth


def copy_model(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / MODEL_SUBDIR))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- validate_model_folder


def test_valid_folder_is_described(tiny_model):
    info = validate_model_folder(tiny_model)
    assert info.folds_found == info.folds == (0, 1, 2)
    assert (info.configuration, info.trainer, info.plans) == ("2d", "nnUNetTrainer",
                                                              "nnUNetPlans")
    assert info.dataset_name == DATASET_NAME
    assert dict(info.label_mapping) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert info.mirror_axes == (0, 1)
    assert info.card_label is None
    assert info.summary == "3 folds found (0–2), 2d, labels OK"


def test_fold_lists_are_formatted():
    assert format_folds((0, 1, 2, 3, 4)) == "0–4"
    assert format_folds((0, 2, 3)) == "0, 2, 3"
    assert format_folds((1, 2)) == "1, 2"


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match="Model folder not found: .*nowhere"):
        validate_model_folder(tmp_path / "nowhere")


def test_parent_folder_points_to_the_model_folder(tiny_model):
    with pytest.raises(ModelError, match=f"dataset.json and plans.json missing.*{MODEL_SUBDIR}"):
        validate_model_folder(tiny_model.parent)


def test_fold_folder_points_to_its_parent(tiny_model):
    with pytest.raises(ModelError, match="'fold_0' is one fold: pass its parent folder"):
        validate_model_folder(tiny_model / "fold_0")


def test_missing_plans_is_named(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "plans.json").unlink()
    with pytest.raises(ModelError, match="plans.json missing"):
        validate_model_folder(model)


def test_unfinished_fold_says_what_was_found_and_how_to_fix(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "fold_1" / "checkpoint_final.pth").rename(model / "fold_1" / "checkpoint_best.pth")
    with pytest.raises(ModelError) as raised:
        validate_model_folder(model)
    message = str(raised.value)
    assert "fold_1 has no checkpoint_final.pth; found checkpoint_best.pth" in message
    assert "training did not finish" in message
    assert "checkpoint='checkpoint_best.pth'" in message
    assert "folds=[0, 2]" in message
    assert validate_model_folder(model, folds=[0, 2]).summary == (
        "2 folds found (0, 2), 2d, labels OK")
    assert validate_model_folder(model, checkpoint="checkpoint_best.pth", folds=[1]).folds == (1,)
    with pytest.raises(ModelError, match="fold_0 has no checkpoint_best.pth; found "
                       "checkpoint_final.pth.*pass checkpoint='checkpoint_final.pth'"):
        validate_model_folder(model, checkpoint="checkpoint_best.pth")


@pytest.mark.parametrize("content, complaint", [
    (b"not a zip file", "Cannot read checkpoint .*damaged or incomplete"),
    ({"state_dict": {}}, "not a checkpoint written by nnU-Net v2"),
])
def test_unusable_checkpoint_is_explained(tiny_model, tmp_path, content, complaint):
    model = copy_model(tiny_model, tmp_path)
    file = model / "fold_0" / "checkpoint_final.pth"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        torch.save(content, file)
    with pytest.raises(ModelError, match=complaint):
        validate_model_folder(model)


def test_requested_fold_must_exist(tiny_model):
    with pytest.raises(ModelError, match="fold_5 not found .*folds present: 0–2"):
        validate_model_folder(tiny_model, folds=[0, 5])


def test_3d_model_is_refused(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)

    def add_3d(plans):
        plans["configurations"]["3d_fullres"] = {"inherits_from": "2d", "patch_size": [1, 64, 64],
                                                 "spacing": [5.0, 4.0, 4.0]}

    edit_json(model / "plans.json", add_3d)
    for fold in (0, 1, 2):
        file = model / f"fold_{fold}" / "checkpoint_final.pth"
        checkpoint = torch.load(file, weights_only=False)
        checkpoint["init_args"]["configuration"] = "3d_fullres"
        torch.save(checkpoint, file)
    with pytest.raises(ModelError, match="holds a 3d_fullres model .* needs a 2d model"):
        validate_model_folder(model)


@pytest.mark.parametrize("names", [
    ("Psoas", "erector_spinae", "Abdominal Muscles"),
    ("psoas_major", "paraspinal muscles", "abdominal wall"),
    ("iliopsoas", "Paraspinal", "abdominal_wall"),
])
def test_label_synonyms_map_by_name(tiny_model, tmp_path, names):
    model = copy_model(tiny_model, tmp_path)
    edit_json(model / "dataset.json", lambda d: d.update(labels={
        "background": 0, names[0]: 1, names[1]: 2, names[2]: 3}))
    assert dict(validate_model_folder(model).label_mapping) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_unmappable_label_is_named_and_explicit_mapping_accepted(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    edit_json(model / "dataset.json", lambda d: d.update(labels={
        "background": 0, "psoas": 1, "paraspinal": 2, "liver": 3}))
    with pytest.raises(ModelError, match="'liver' \\(id 3\\) .* label_mapping"):
        validate_model_folder(model)
    info = validate_model_folder(model, label_mapping={0: 0, 1: 1, 2: 2, 3: 3})
    assert dict(info.label_mapping) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_missing_class_is_named(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    edit_json(model / "dataset.json", lambda d: d.update(labels={
        "background": 0, "psoas_left": 1, "psoas_right": 2, "abdominal_wall": 3}))
    with pytest.raises(ModelError, match="nothing maps to paraspinal"):
        validate_model_folder(model)


@pytest.mark.parametrize("mapping, complaint", [
    ({0: 0, 1: 1, 2: 2}, "ids 3 \\('abdominal_wall'\\) not mapped"),
    ({0: 0, 1: 1, 2: 2, 3: 7}, "values \\{3: 7\\} are not class values"),
    ({0: 0, 1: 1, 2: 2, 3: 3, 9: 1}, "ids \\[9\\] not in dataset.json"),
    ({0: 0, 1: 1, 2: 2, 3: 2}, "nothing maps to abdominal wall"),
])
def test_bad_explicit_mapping_is_explained(tiny_model, mapping, complaint):
    with pytest.raises(ModelError, match=complaint):
        validate_model_folder(tiny_model, label_mapping=mapping)


def test_model_card_label_is_shown(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / MODEL_CARD).write_text(json.dumps({"label": "demo, not for clinical use"}))
    info = validate_model_folder(model)
    assert info.card["label"] == info.card_label == "demo, not for clinical use"
    assert info.summary.endswith("labels OK — demo, not for clinical use")


# ---------------------------------------------------------------- devices


def test_unknown_device_is_refused():
    with pytest.raises(InputError, match="Unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="L3MuscleSegLib.inference"):
        assert resolve_device("cuda").type == "cpu"
    assert "'cuda' was requested but is not available" in caplog.text


def test_auto_device_prefers_an_accelerator():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


def test_threads_default_to_every_available_cpu_and_can_be_set(tiny_model):
    assert Segmenter(tiny_model, device="cpu").num_threads == available_cpus()
    assert Segmenter(tiny_model, device="cpu", num_threads=1).num_threads == 1


# ---------------------------------------------------------------- predict


def test_prediction_is_a_consistent_ensemble(segmenter, case):
    slice_, truth = case
    environment, threads = dict(os.environ), torch.get_num_threads()
    result = segmenter.predict(slice_)
    assert result.labels.shape == (SIZE, SIZE) and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (4, SIZE, SIZE)
    assert result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(axis=0))
    assert len(result.fold_labels) == 3 and result.folds == (0, 1, 2)
    assert result.qc.n_folds == 3 and result.qc.score is not None
    assert (result.device, result.tta) == ("cpu", True)
    assert set(result.timings) == {"load", "preprocess", "fold_0", "fold_1", "fold_2",
                                   "ensemble", "total"}
    assert dict(os.environ) == environment and torch.get_num_threads() == threads
    json.dumps(result.timings)  # reports store them
    for value in (1, 2, 3):  # the model learned, and saw the slice the right way round
        assert dice(result.labels == value, truth == value) > 0.9


def test_provenance_describes_model_and_settings(segmenter, tiny_model):
    provenance = json.loads(json.dumps(segmenter.provenance()))
    assert provenance["model_dir"] == str(tiny_model)
    assert provenance["folds"] == [0, 1, 2] and provenance["configuration"] == "2d"
    assert provenance["label_mapping"] == {"0": 0, "1": 1, "2": 2, "3": 3}
    assert provenance["model_label"] is None and provenance["tta"] is True
    assert provenance["ensemble"] == "mean of per-fold softmax probabilities"


def test_second_prediction_reads_nothing_from_disk(tiny_model, tmp_path, case):
    model = copy_model(tiny_model, tmp_path)
    segmenter = Segmenter(model, **ON_CPU)
    first = segmenter.predict(case[0])
    shutil.rmtree(model)
    second = segmenter.predict(case[0])
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)


def test_progress_is_reported_per_fold_and_cancel_stops_between_folds(segmenter, case):
    seen = []
    segmenter.predict(case[0], progress=lambda *step: seen.append(step))
    assert seen == [(0, 3, "fold 1/3"), (1, 3, "fold 2/3"), (2, 3, "fold 3/3"), (3, 3, "done")]

    cancel, seen = threading.Event(), []

    def cancel_during_fold_2(done, total, message):
        seen.append(message)
        if message == "fold 2/3":
            cancel.set()

    with pytest.raises(CancelledError, match="before fold 3/3"):
        segmenter.predict(case[0], progress=cancel_during_fold_2, cancel=cancel)
    assert seen == ["fold 1/3", "fold 2/3"]


def test_single_fold_has_no_agreement_score(tiny_model, case):
    result = Segmenter(tiny_model, folds=[1], **ON_CPU, tta=False).predict(case[0])
    assert result.folds == (1,) and len(result.fold_labels) == 1 and not result.tta
    np.testing.assert_array_equal(result.labels, result.fold_labels[0])
    assert result.qc.score is None and "single fold" in result.qc.reason


def test_label_mapping_reorders_classes(segmenter, tiny_model, tmp_path, case):
    """Swap two label names in dataset.json: our classes must follow the names."""
    model = copy_model(tiny_model, tmp_path)
    edit_json(model / "dataset.json", lambda d: d.update(labels={
        "background": 0, "abdominal_wall": 1, "paraspinal": 2, "psoas": 3}))
    swapped = Segmenter(model, **ON_CPU).predict(case[0])
    original = segmenter.predict(case[0])
    swap = np.array([0, 3, 2, 1], np.uint8)
    np.testing.assert_array_equal(swapped.labels, swap[original.labels])
    np.testing.assert_array_equal(swapped.probabilities, original.probabilities[swap])


def test_non_finite_pixels_are_refused(segmenter, case):
    pixels = case[0].pixels.copy()
    pixels[3, 4] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite pixels"):
        segmenter.predict(slice_from_array(pixels, (SPACING_MM, SPACING_MM)))


# ---------------------------------------------------------------- fidelity with nnUNetv2_predict


def as_stored_in_nifti(spacing_rc) -> tuple[float, float]:
    """NIfTI keeps float32 spacings; nnU-Net's rounding of resampled shapes can tell."""
    return tuple(float(np.float32(s)) for s in spacing_rc)


def nnunet_predict(model: Path, pixels: np.ndarray, spacing_rc, folds, work: Path,
                   slice_mm: float) -> np.ndarray:
    """nnUNetv2_predict_from_modelfolder on the slice saved as a one-slice LPS NIfTI."""
    (work / "in").mkdir(parents=True)
    write_one_slice_nifti(pixels, work / "in" / "case_0000.nii.gz", spacing_rc, slice_mm)
    tool = Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")
    run_checked(SubprocessRunner(), [
        str(tool), "-i", str(work / "in"), "-o", str(work / "out"), "-m", str(model),
        "-f", *(str(f) for f in folds), "-device", "cpu", "-npp", "1", "-nps", "1",
        "--disable_progress_bar"])
    return sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out" / "case.nii.gz")))[0]


def assert_agrees_with_nnunet(result, reference: np.ndarray) -> None:
    """Dice ≥ 0.99 per class; differences only where the ensemble is unsure."""
    assert reference.shape == result.labels.shape
    for value in (1, 2, 3):
        agreement = dice(result.labels == value, reference == value)
        assert agreement >= 0.99, (
            f"class {value}: Dice {agreement:.4f} between the probability and the logit "
            f"ensemble; {result.qc.summary}")
    differ = result.labels != reference
    top2 = np.sort(result.probabilities, axis=0)[-2:]
    assert np.all(top2[1][differ] - top2[0][differ] < 0.25)


def test_ensemble_agrees_with_nnunetv2_predict(tiny_model, tmp_path):
    """A finer, non-square slice with oblong pixels: nnU-Net resamples it and back."""
    image, truth = tiny_case(200, size=150)
    pixels, truth = image[5:145], truth[5:145]
    spacing = as_stored_in_nifti((1.85, 1.7))
    result = Segmenter(tiny_model, **ON_CPU).predict(slice_from_array(pixels, spacing))
    reference = nnunet_predict(tiny_model, pixels, spacing, (0, 1, 2), tmp_path, 5.0)
    assert_agrees_with_nnunet(result, reference)
    for value in (1, 2, 3):
        assert dice(result.labels == value, truth == value) > 0.9


needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "plans.json").is_file(),
                                reason="demo model absent")


@pytest.fixture(scope="module")
def demo_case():
    """A phantom slice, its spacing as a NIfTI stores it, and the demo ensemble's result."""
    from L3MuscleSegLib.phantom import make_phantom_slice

    phantom = make_phantom_slice(seed=7)
    spacing = as_stored_in_nifti(phantom.spacing_mm)
    segmenter = Segmenter(DEMO_MODEL, **ON_CPU)
    result = segmenter.predict(slice_from_array(phantom.image, spacing))
    return phantom.image, spacing, segmenter.folds, result


@needs_demo
def test_demo_model_folds_agree(demo_case):
    """A demo whose every slice is flagged for review would demonstrate the wrong thing."""
    qc = demo_case[3].qc
    assert not qc.review_recommended(), f"the demo model's folds disagree: {qc.summary}"


@needs_demo
def test_demo_model_agrees_with_nnunetv2_predict(demo_case, tmp_path):
    pixels, spacing, folds, result = demo_case
    reference = nnunet_predict(DEMO_MODEL, pixels, spacing, folds, tmp_path, 3.0)
    assert_agrees_with_nnunet(result, reference)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_single_fold_equals_nnunetv2_predict_exactly(which, tiny_model, tmp_path):
    """With one fold both ensembling rules coincide, so every pixel must match."""
    if which == "demo":
        if not (DEMO_MODEL / "plans.json").is_file():
            pytest.skip("demo model absent")
        from L3MuscleSegLib.phantom import make_phantom_slice

        phantom = make_phantom_slice(seed=11, size=512)
        model, pixels, spacing = DEMO_MODEL, phantom.image, phantom.spacing_mm
    else:
        model, pixels, spacing = tiny_model, tiny_case(300, size=150)[0][5:145], (1.85, 1.7)
    spacing = as_stored_in_nifti(spacing)
    result = Segmenter(model, folds=[0], **ON_CPU).predict(slice_from_array(pixels, spacing))
    reference = nnunet_predict(model, pixels, spacing, (0,), tmp_path, 3.0)
    np.testing.assert_array_equal(result.labels, reference)
