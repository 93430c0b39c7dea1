"""Training: nnU-Net log parsing, the Dice summary, folder checks, and (slow) a real run."""

from __future__ import annotations

import csv
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib import cli, dataset, training
from L3MuscleSegLib.errors import CancelledError, InputError
from L3MuscleSegLib.jobs import SubprocessRunner
from L3MuscleSegLib.phantom import make_phantom_slice

# Lines as nnU-Net 2.8 prints them (numpy 2 reprs in the Dice list).
EPOCH_LOG = """\
2026-12-04 20:18:37.209818: Epoch 4
2026-12-04 20:18:37.210171: Current learning rate: 0.00964
2026-12-04 20:18:41.673186: train_loss -0.6232
2026-12-04 20:18:41.673749: val_loss -0.5705
2026-12-04 20:18:41.673953: Pseudo dice [np.float32(0.8228), np.float32(0.9067), nan]
2026-12-04 20:18:41.674331: Epoch time: 4.47 s
2026-12-04 20:18:41.674782: Yayy! New best EMA pseudo Dice: 0.7599999865889549
2026-12-04 20:18:41.700000: Epoch 5
2026-12-04 20:18:45.100000: train_loss 1.5e-2
2026-12-04 20:18:45.200000: val_loss 0.02
2026-12-04 20:18:45.300000: Pseudo dice [0.9, 0.91, 0.92]
2026-12-04 20:18:45.400000: Epoch time: 3.7 s
"""


def test_log_parser_reports_each_finished_epoch():
    parser = training.LogParser(fold=3, num_epochs=50)
    updates = [u for u in map(parser.feed, EPOCH_LOG.splitlines()) if u is not None]

    assert len(updates) == 2
    first, second = updates
    assert (first.stage, first.fold, first.epoch, first.num_epochs) == ("train", 3, 4, 50)
    assert (first.train_loss, first.val_loss, first.epoch_seconds) == (-0.6232, -0.5705, 4.47)
    assert first.pseudo_dice[:2] == (0.8228, 0.9067) and np.isnan(first.pseudo_dice[2])
    assert first.message.startswith("fold 3 epoch 5/50: train loss -0.6232")
    assert (second.epoch, second.train_loss, second.pseudo_dice) == (5, 0.015, (0.9, 0.91, 0.92))


def test_log_parser_ignores_other_lines():
    parser = training.LogParser()
    for line in ("Epoch 7 of something else", "predicting case1", "", "train_loss_x"):
        assert parser.feed(line) is None


def write_validation_summary(model_folder: Path, fold: int, dice: dict[int, float]) -> None:
    """A validation/summary.json shaped like nnU-Net's compute_metrics_on_folder output."""
    folder = model_folder / f"fold_{fold}" / "validation"
    folder.mkdir(parents=True)
    summary = {
        "foreground_mean": {"Dice": sum(dice.values()) / 3, "IoU": 0.5},
        "mean": {str(k): {"Dice": v, "IoU": 0.5, "TP": 1.0} for k, v in dice.items()},
        "metric_per_case": [],
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_training_summary_csv_and_png(tmp_path):
    write_validation_summary(tmp_path, 0, {1: 0.90, 2: 0.80, 3: 0.70})
    write_validation_summary(tmp_path, 2, {1: 0.70, 2: 0.60, 3: 0.50})
    summary = training.write_training_summary(tmp_path, [0, 2])

    with open(summary.csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["fold", "psoas", "paraspinal", "abdominal_wall", "mean_foreground"],
        ["0", "0.9000", "0.8000", "0.7000", "0.8000"],
        ["2", "0.7000", "0.6000", "0.5000", "0.6000"],
        ["mean", "0.8000", "0.7000", "0.6000", "0.7000"],
    ]
    assert Path(summary.png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.fold for f in summary.folds] == [0, 2]
    assert summary.folds[1].dice == {"psoas": 0.7, "paraspinal": 0.6, "abdominal_wall": 0.5}


def test_summary_names_the_unfinished_fold(tmp_path):
    write_validation_summary(tmp_path, 0, {1: 0.9, 2: 0.8, 3: 0.7})
    with pytest.raises(InputError, match="fold 1"):
        training.write_training_summary(tmp_path, [0, 1])


def test_nnunet_folders_default_next_to_the_raw_folder(tmp_path):
    raw_dataset = tmp_path / "nnUNet_raw" / "Dataset711_L3SM"
    raw_dataset.mkdir(parents=True)
    (raw_dataset / "dataset.json").write_text("{}")
    folders = training.NnunetFolders.for_dataset(raw_dataset)

    assert (folders.dataset_id, folders.dataset_name) == (711, "Dataset711_L3SM")
    assert folders.preprocessed == tmp_path.resolve() / "nnUNet_preprocessed"
    assert folders.model_folder == (tmp_path.resolve() / "nnUNet_results" / "Dataset711_L3SM"
                                    / "nnUNetTrainer__nnUNetPlans__2d")
    assert folders.env() == {"nnUNet_raw": str(tmp_path.resolve() / "nnUNet_raw"),
                             "nnUNet_preprocessed": str(folders.preprocessed),
                             "nnUNet_results": str(folders.results)}


def test_not_a_dataset_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="dataset build"):
        training.NnunetFolders.for_dataset(tmp_path)


@pytest.mark.parametrize("kwargs", [{"folds": [5]}, {"folds": [1, 1]}, {"folds": []},
                                    {"device": "tpu"}])
def test_bad_folds_or_device_fail_before_anything_runs(tmp_path, kwargs):
    raw_dataset = tmp_path / "nnUNet_raw" / "Dataset711_L3SM"
    raw_dataset.mkdir(parents=True)
    (raw_dataset / "dataset.json").write_text("{}")
    with pytest.raises(InputError):
        training.train(raw_dataset, **kwargs)
    assert not (tmp_path / "nnUNet_preprocessed").exists()
    assert not (tmp_path / "nnUNet_results").exists()


# ---------------------------------------------------------------- a real (tiny) run


class RecordingRunner(SubprocessRunner):
    """The real runner, remembering what each child was given."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[str], dict]] = []

    def run(self, argv, *, env=None, **kwargs):
        self.calls.append((list(argv), dict(env or {})))
        return super().run(argv, env=env, **kwargs)


def write_tiny_dataset(tmp_path: Path, n_cases: int = 10) -> Path:
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for seed in range(n_cases):
        p = make_phantom_slice(seed, size=64, spacing_mm=6.0)
        for suffix, array in (("image", p.image.astype(np.int16)), ("label", p.labels)):
            image = sitk.GetImageFromArray(array[None])
            image.SetSpacing((6.0, 6.0, 3.0))
            sitk.WriteImage(image, str(pairs / f"case{seed:02d}-{suffix}.nii.gz"))
    report = dataset.build_dataset([pairs], 799, "Tiny", tmp_path / "nnUNet_raw")
    assert report.ok, report.format()
    return Path(report.output)


def shrink_network(plans_file: Path) -> None:
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["2d"]
    config["architecture"]["arch_kwargs"].update(
        n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=[[3, 3]] * 4,
        strides=[[1, 1]] + [[2, 2]] * 3, n_conv_per_stage=[1] * 4,
        n_conv_per_stage_decoder=[1] * 3)
    config.update(patch_size=[64, 64], batch_size=2)
    plans_file.write_text(json.dumps(plans))


@pytest.mark.slow
def test_plan_train_two_folds_cancel_and_resume(tmp_path, capsys):
    raw_dataset = write_tiny_dataset(tmp_path)
    folders = training.NnunetFolders.for_dataset(raw_dataset)
    runner = RecordingRunner()
    environ_before = dict(os.environ)
    shrink_network(training.plan(folders, processes=2, runner=runner))
    assert not training.is_preprocessed(folders)
    training.preprocess(folders, processes=2, runner=runner)
    assert training.is_preprocessed(folders)

    updates: list[training.TrainingProgress] = []
    stop = threading.Event()

    def cancel_in_epoch_two(update):
        updates.append(update)
        if update.fold == 1 and update.epoch == 1:
            stop.set()

    schedule = {"epochs": 4, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                "threads": 2, "runner": runner}
    training.train(raw_dataset, folds=[0], progress=updates.append, **schedule)
    with pytest.raises(CancelledError):
        training.train(raw_dataset, folds=[1], progress=cancel_in_epoch_two, cancel=stop,
                       **schedule)
    fold_1 = folders.model_folder / "fold_1"
    assert (fold_1 / "checkpoint_latest.pth").is_file()
    assert not (fold_1 / "checkpoint_final.pth").exists()

    resumed: list[training.TrainingProgress] = []
    summary = training.train(raw_dataset, folds=[0, 1], progress=resumed.append, **schedule)

    assert dict(os.environ) == environ_before  # nnU-Net's variables went to children only
    assert all(env["nnUNet_results"] == str(folders.results) for _, env in runner.calls)
    assert runner.calls[0][0][1:3] == ["-m", "nnunetv2.experiment_planning."
                                       "plan_and_preprocess_entrypoints"]
    epochs = [(u.fold, u.epoch) for u in updates if u.epoch is not None]
    assert epochs[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    messages = [u.message for u in resumed]
    assert "fold 0 already trained" in messages and "resuming fold 1" in messages
    resumed_epochs = [u.epoch for u in resumed if u.fold == 1 and u.epoch is not None]
    assert resumed_epochs and resumed_epochs[0] >= 1 and resumed_epochs[-1] == 3
    assert "--continue" in runner.calls[-1][0]

    rows = list(csv.reader(Path(summary.csv).read_text().splitlines()))
    assert [r[0] for r in rows] == ["fold", "0", "1", "mean"]
    for fold in (0, 1):
        checkpoint = folders.model_folder / f"fold_{fold}" / "checkpoint_final.pth"
        assert checkpoint.is_file()
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["trainer_name"] == "nnUNetTrainer"
    assert saved["init_args"]["configuration"] == "2d"
    assert saved["current_epoch"] == 4

    # A new fold can start from another model's weights (all layers): with a vanishing
    # learning rate its final weights are the ones it started from.
    training.train_fold(folders, 2, init_weights=checkpoint, initial_lr=1e-12, epochs=1,
                        iterations_per_epoch=1, val_iterations_per_epoch=1, threads=2)
    started_from = saved["network_weights"]
    ended_with = torch.load(folders.model_folder / "fold_2" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)["network_weights"]
    assert started_from.keys() == ended_with.keys()
    assert all(torch.allclose(started_from[k].float(), ended_with[k].float(), atol=1e-6)
               for k in started_from)

    capsys.readouterr()
    assert cli.main(["train", str(raw_dataset), "--folds", "0", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fold 0 already trained" in out and "fold 1 already trained" in out
    assert f"Model folder: {folders.model_folder}" in out
