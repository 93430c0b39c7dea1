"""The study's loop end to end on phantoms, on the CPU, without mocks: reviewed pairs →
dataset (one broken pair reported) → 2 trained folds → installed model → segment → verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_training import shrink_network

from L3MuscleSegLib import training
from L3MuscleSegLib.cli import main
from L3MuscleSegLib.phantom import make_phantom_slice

SPACING = (6.0, 6.0, 8.0)  # slices thicker than pixels, as nnU-Net 2d expects


def write_pair(folder: Path, case: str, image: np.ndarray, labels: np.ndarray) -> None:
    for suffix, array in (("image", image.astype(np.int16)), ("label", labels)):
        item = sitk.GetImageFromArray(array[None])
        item.SetSpacing(SPACING)
        sitk.WriteImage(item, str(folder / f"{case}-{suffix}.nii.gz"))


@pytest.mark.slow
def test_pairs_to_installed_model_to_segmentation(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for seed in range(8):
        p = make_phantom_slice(seed, size=64, spacing_mm=SPACING[0])
        write_pair(pairs, f"case{seed:02d}", p.image, p.labels)
    broken = tmp_path / "broken"
    broken.mkdir()
    p = make_phantom_slice(99, size=64, spacing_mm=SPACING[0])
    write_pair(broken, "bad", p.image, np.where(p.labels > 0, 7, 0).astype(np.uint8))

    raw = tmp_path / "nnUNet_raw"
    build = ["dataset", "build", "--pairs", str(pairs), str(broken), "--id", "798",
             "--name", "Loop", "--out", str(raw)]
    assert main(build) == 1
    assert "bad" in capsys.readouterr().out  # the broken pair is named, nothing written
    assert not (raw / "Dataset798_Loop").exists()
    assert main(build[:4] + build[5:]) == 0  # without the broken folder
    dataset_dir = raw / "Dataset798_Loop"

    folders = training.NnunetFolders.for_dataset(dataset_dir)
    shrink_network(training.plan(folders, processes=2))
    training.preprocess(folders, processes=2)
    training.train(dataset_dir, folds=[0, 1], epochs=2, iterations_per_epoch=2,
                   val_iterations_per_epoch=1, threads=2)

    store = tmp_path / "store"
    assert main(["model", "install", str(folders.model_folder), "--name", "loop",
                 "--store", str(store)]) == 0
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(pairs / "case03-image.nii.gz")), str(ct))
    installed = next(store.glob("loop/*/"))
    assert main(["segment", str(ct), "--slice", "0", "--model", str(installed),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-tta"]) == 0
    report = json.loads((tmp_path / "out" / "ct-report.json").read_text())
    assert report["inference"]["folds"] == [0, 1]

    assert main(["model", "verify", "loop", "--store", str(store)]) == 0
    checkpoint = next(installed.rglob("checkpoint_final.pth"))
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["model", "verify", "loop", "--store", str(store)]) == 1
    assert "checkpoint_final.pth" in capsys.readouterr().out
