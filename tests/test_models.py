"""The model store on a tiny but real nnU-Net model (a 2-stage 2D U-Net, two folds)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest
import torch

from L3MuscleSegLib import models
from L3MuscleSegLib.cli import main
from L3MuscleSegLib.errors import InputError, ModelError
from L3MuscleSegLib.inference import MODEL_CARD, validate_model_folder
from L3MuscleSegLib.labels import NNUNET_LABELS

DATASET = "Dataset711_L3SM"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__2d"
CARD_LABEL = "tiny test model, not for clinical use"
TRAINED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)  # even second: zip-exact
ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3], [3, 3]], "strides": [[1, 1], [2, 2]],
        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
PLANS = {
    "dataset_name": DATASET, "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
    "original_median_shape_after_transp": [1, 32, 32], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [32, 32], "median_image_size_in_voxels": [32, 32],
        "spacing": [1.0, 1.0], "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": RESAMPLING,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**RESAMPLING, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**RESAMPLING, "order": 1},
        "architecture": ARCHITECTURE, "batch_dice": True,
    }},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {
        "max": 300.0, "mean": 40.0, "median": 40.0, "min": -200.0,
        "percentile_00_5": -150.0, "percentile_99_5": 250.0, "std": 50.0}},
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": NNUNET_LABELS, "numTraining": 6,
                "file_ending": ".nii.gz"}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_trained_folder(folder: Path) -> None:
    """What nnUNetv2_train leaves: plans, dataset, fingerprint and per-fold outputs."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    _write_json(folder / "plans.json", PLANS)
    _write_json(folder / "dataset.json", DATASET_JSON)
    _write_json(folder / "dataset_fingerprint.json", {"spacings": [[999.0, 1.0, 1.0]] * 6})
    _write_json(folder / MODEL_CARD, {"label": CARD_LABEL})
    for fold in (0, 1):
        torch.manual_seed(fold)
        network = get_network_from_plans(
            ARCHITECTURE["network_class_name"], ARCHITECTURE["arch_kwargs"],
            ARCHITECTURE["_kw_requires_import"], 1, len(NNUNET_LABELS), deep_supervision=False)
        checkpoint = folder / f"fold_{fold}" / "checkpoint_final.pth"
        checkpoint.parent.mkdir()
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"plans": PLANS, "configuration": "2d", "fold": fold,
                                  "dataset_json": DATASET_JSON},
                    "inference_allowed_mirroring_axes": (0, 1)}, checkpoint)
        os.utime(checkpoint, (TRAINED.timestamp(), TRAINED.timestamp()))
        (folder / f"fold_{fold}" / "progress.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        _write_json(folder / f"fold_{fold}" / "validation" / "summary.json", {"fold": fold})
        (folder / f"fold_{fold}" / "checkpoint_best.pth").write_bytes(b"not copied")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """An nnUNet_results folder holding one trained 2d model."""
    results = tmp_path_factory.mktemp("nnUNet_results")
    _write_trained_folder(results / DATASET / TRAINER_FOLDER)
    return results


@pytest.fixture
def model_dir(results_dir) -> Path:
    return results_dir / DATASET / TRAINER_FOLDER


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksums(model: models.InstalledModel) -> dict[str, str]:
    return {entry.path: entry.sha256 for entry in model.manifest.files}


def _store_entries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_install_from_results_folder_records_manifest(model_dir, root):
    model = models.install_model(model_dir, root=root)

    assert (model.name, model.version) == (DATASET, "1")
    assert model.path == root / DATASET / "1"
    assert model.folds == (0, 1) and model.label == CARD_LABEL
    manifest = models.read_manifest(model.path)
    assert manifest == model.manifest
    assert manifest.configuration == "2d" and manifest.dataset_name == DATASET
    assert (manifest.trainer, manifest.plans) == ("nnUNetTrainer", "nnUNetPlans")
    assert manifest.label_names == {0: "background", 1: "psoas", 2: "paraspinal",
                                    3: "abdominal_wall"}
    assert manifest.label_mapping == {0: 0, 1: 1, 2: 2, 3: 3}
    assert manifest.num_training == 6
    assert manifest.trained_at == "2024-05-01T12:00:00+00:00"
    installed = datetime.fromisoformat(manifest.installed_at)
    assert abs((datetime.now(timezone.utc) - installed).total_seconds()) < 120
    assert manifest.source == str(model_dir.resolve())
    assert manifest.nnunetv2_version == metadata.version("nnunetv2")
    assert manifest.nnunet_folder == f"{DATASET}/{TRAINER_FOLDER}"
    expected = {rel: _sha256(model_dir / rel) for rel in (
        "dataset.json", "plans.json", "dataset_fingerprint.json", MODEL_CARD,
        "fold_0/checkpoint_final.pth", "fold_0/progress.png", "fold_0/validation/summary.json",
        "fold_1/checkpoint_final.pth", "fold_1/progress.png", "fold_1/validation/summary.json")}
    assert _checksums(model) == expected
    assert _sha256(model.path / "fold_1/checkpoint_final.pth") == expected[
        "fold_1/checkpoint_final.pth"]
    assert expected["fold_0/checkpoint_final.pth"] != expected["fold_1/checkpoint_final.pth"]
    assert not (model.path / "fold_0" / "checkpoint_best.pth").exists()
    assert [p.name for p in root.iterdir()] == [DATASET]  # no staging folder left


def test_install_from_nnunet_export_zip(results_dir, model_dir, root, tmp_path, monkeypatch):
    from nnunetv2.model_sharing import model_export
    from nnunetv2.utilities import file_path_utilities

    for module in (model_export, file_path_utilities):  # nnU-Net reads it at import time
        monkeypatch.setattr(module, "nnUNet_results", str(results_dir))
    exported = tmp_path / "exported.zip"
    model_export.export_pretrained_model(DATASET, str(exported), configurations=("2d",),
                                         folds=(0, 1))
    assert f"{DATASET}/{TRAINER_FOLDER}/fold_1/checkpoint_final.pth" in \
        zipfile.ZipFile(exported).namelist()

    model = models.install_model(exported, name="l3", version="2024.05", root=root)

    assert model.path == root / "l3" / "2024.05" and model.folds == (0, 1)
    assert model.label is None  # nnU-Net's export leaves the model card out
    assert model.manifest.trained_at == "2024-05-01T12:00:00+00:00"
    assert model.manifest.source == str(exported.resolve())
    for rel in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        assert _checksums(model)[rel] == _sha256(model_dir / rel)
    assert _store_entries(root)[:2] == ["l3", "l3/2024.05"]


@pytest.mark.parametrize("prefix", ["", "my_model/"])
def test_install_from_zip_with_model_at_its_root(model_dir, root, tmp_path, prefix):
    archive_path = tmp_path / "model.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for path in model_dir.rglob("*"):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(model_dir).as_posix())

    model = models.install_model(archive_path, root=root)

    assert model.label == CARD_LABEL and model.folds == (0, 1)
    assert _checksums(model)["fold_0/checkpoint_final.pth"] == _sha256(
        model_dir / "fold_0/checkpoint_final.pth")


def test_default_name_and_version_come_from_the_model_card(model_dir, root, tmp_path):
    carded = tmp_path / "carded"
    shutil.copytree(model_dir, carded)
    (carded / MODEL_CARD).write_text(json.dumps(
        {"name": "L3 phantom demo", "version": "2024 b", "label": CARD_LABEL}))

    model = models.install_model(carded, root=root)

    assert (model.name, model.version, model.label) == ("L3-phantom-demo", "2024-b", CARD_LABEL)
    with pytest.raises(InputError, match="--name"):
        models.install_model(carded, name="L3 phantom demo", root=root)  # typed: no rewrite


def test_installing_an_existing_version_needs_force(model_dir, root):
    first = models.install_model(model_dir, root=root)
    with pytest.raises(ModelError, match="--force"):
        models.install_model(model_dir, root=root)
    assert models.read_manifest(first.path) == first.manifest  # untouched

    second = models.install_model(model_dir, force=True, root=root)

    assert second.path == first.path
    assert [m.ref for m in models.list_models(root)] == [f"{DATASET}:1"]
    assert [p.name for p in root.iterdir()] == [DATASET]


def test_cli_install_needs_force_and_reports_exit_codes(model_dir, root, capsys):
    assert main(["model", "install", str(model_dir), "--name", "l3", "--store", str(root)]) == 0
    assert "installed l3:1" in capsys.readouterr().out
    assert main(["model", "--store", str(root), "install", str(model_dir), "--name", "l3"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["model", "install", str(model_dir), "--name", "l3", "--force",
                 "--store", str(root)]) == 0
    with pytest.raises(SystemExit) as usage:
        main(["model", "install", "--store", str(root)])  # neither FOLDER_OR_ZIP nor --demo
    assert usage.value.code == 2


def test_failed_install_leaves_nothing_in_the_store(model_dir, root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="fold_1"):
        models.install_model(broken, root=root)
    assert _store_entries(root) == []

    not_a_model = tmp_path / "notes.zip"
    with zipfile.ZipFile(not_a_model, "w") as archive:
        archive.writestr("README.txt", "no model here")
    with pytest.raises(ModelError, match="No nnU-Net model folder"):
        models.install_model(not_a_model, root=root)
    with pytest.raises(InputError, match="bad/name"):
        models.install_model(model_dir, name="bad/name", root=root)
    assert _store_entries(root) == []


def test_list_info_export_remove_round_trip(model_dir, root, tmp_path, capsys):
    older = models.install_model(model_dir, name="l3", version="1.9", root=root)
    newer = models.install_model(model_dir, name="l3", version="1.10", root=root)
    assert [m.ref for m in models.list_models(root)] == ["l3:1.9", "l3:1.10"]
    assert models.find_model("l3", root=root) == newer

    assert main(["model", "list", "--store", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "l3" in listing and "1.10" in listing and CARD_LABEL in listing
    assert main(["model", "info", "l3", "--version", "1.9", "--store", str(root)]) == 0
    info = capsys.readouterr().out
    assert str(older.path) in info and "training cases: 6" in info

    exported = models.export_model("l3", tmp_path / "l3.zip", version="1.10", root=root)
    with zipfile.ZipFile(exported) as archive:  # what nnU-Net's own importer extracts
        assert f"{DATASET}/{TRAINER_FOLDER}/fold_1/checkpoint_final.pth" in archive.namelist()
        archive.extractall(tmp_path / "nnUNet_results")
    assert validate_model_folder(tmp_path / "nnUNet_results" / DATASET / TRAINER_FOLDER
                                 ).folds_found == (0, 1)
    with pytest.raises(InputError, match="already exists"):
        models.export_model("l3", exported, root=root)
    assert [p.name for p in models.remove_model("l3", "1.10", root=root)] == ["1.10"]
    assert [m.ref for m in models.list_models(root)] == ["l3:1.9"]

    reinstalled = models.install_model(exported, name="l3", version="1.10", root=root)

    assert _checksums(reinstalled) == _checksums(newer)
    assert reinstalled.label == CARD_LABEL
    assert reinstalled.manifest.trained_at == newer.manifest.trained_at
    assert main(["model", "remove", "l3", "--store", str(root)]) == 0
    assert capsys.readouterr().out.split() == ["removed", "l3:1.9", "removed", "l3:1.10"]
    assert models.list_models(root) == [] and _store_entries(root) == []


def test_verify_reports_a_corrupted_checkpoint(model_dir, root, tmp_path, capsys):
    model = models.install_model(model_dir, name="l3", root=root)
    assert [r.ok for r in models.verify_models(root=root)] == [True]
    checkpoint = model.path / "fold_1" / "checkpoint_final.pth"
    expected = _sha256(checkpoint)
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(data))

    (report,) = models.verify_models("l3", root=root)

    assert not report.ok
    assert report.problems == (models.FileProblem(
        "fold_1/checkpoint_final.pth", expected, _sha256(checkpoint)),)
    assert main(["model", "verify", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT  l3:1" in out and "fold_1/checkpoint_final.pth" in out
    assert expected in out and f"install {model_dir.resolve()}" in out and "--force" in out
    with pytest.raises(ModelError, match="checksum"):
        models.export_model("l3", tmp_path / "bad.zip", root=root)
    assert not (tmp_path / "bad.zip").exists()

    checkpoint.unlink()
    (report,) = models.verify_models("l3", "1", root=root)
    assert report.problems[0].actual_sha256 is None


def test_resolve_model_by_dir_name_and_version(model_dir, root, tmp_path):
    models.install_model(model_dir, name="l3", version="2", root=root)
    models.install_model(model_dir, name="l3", version="10", root=root)

    assert models.resolve_model(model_dir, root=root) == model_dir
    assert models.resolve_model(str(model_dir), root=root) == model_dir
    assert models.resolve_model("l3", root=root) == root / "l3" / "10"
    assert models.resolve_model("l3:2", root=root) == root / "l3" / "2"
    with pytest.raises(ModelError, match="installed: l3"):
        models.resolve_model("psoas_net", root=root)
    with pytest.raises(ModelError, match="installed versions: 2, 10"):
        models.resolve_model("l3:3", root=root)
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(tmp_path / "missing", root=root)
    with pytest.raises(ModelError, match=r"installed: none \(install one"):
        models.resolve_model("l3", root=tmp_path / "empty_store")


def test_demo_name_is_the_bundled_model_unless_one_is_installed(model_dir, tmp_path):
    empty = tmp_path / "empty_store"
    assert models.resolve_model("demo", root=empty) == models.DEMO_MODEL_DIR
    with pytest.raises(ModelError, match="installed: none"):
        models.resolve_model("demo:1", root=empty)
    store = tmp_path / "store"
    models.install_model(model_dir, name="demo", version="7", root=store)
    assert models.resolve_model("demo", root=store) == store / "demo" / "7"


def test_store_root_comes_from_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(models.STORE_ENV, raising=False)
    assert models.store_root() == Path.home() / ".l3muscleseg" / "models"
    monkeypatch.setenv(models.STORE_ENV, str(tmp_path / "env_store"))
    assert models.store_root() == tmp_path / "env_store"
    assert models.store_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_version_sort_is_natural():
    versions = ["1.10", "v10", "1.9", "2", "v2", "1.9.1"]
    assert sorted(versions, key=models.version_key) == ["1.9", "1.9.1", "1.10", "2", "v2", "v10"]


def test_demo_model_installs(root):
    if not models.DEMO_MODEL_DIR.is_dir():
        pytest.skip(f"demo model not built yet: {models.DEMO_MODEL_DIR}")
    model = models.install_demo_model(root=root)
    assert model.ref.startswith(f"{models.DEMO_MODEL_NAME}:")
    assert models.resolve_model(models.DEMO_MODEL_NAME, root=root) == model.path
    assert all(report.ok for report in models.verify_models(root=root))
