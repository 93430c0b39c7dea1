"""The ``l3muscleseg`` command end to end on real nnU-Net models, files read back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_fixtures import SLICE_MM, SPACING_MM, tiny_case

from L3MuscleSegLib.cli import build_parser, main
from L3MuscleSegLib.commands._common import build_segmenter
from L3MuscleSegLib.geometry import Geometry, Volume

TINY = ["--device", "cpu", "--no-tta"]


def write_ras_ct(path, n_slices: int = 3) -> tuple[sitk.Image, np.ndarray]:
    """A small CT stored RAS-like (i → R, j → A, k → S), the way many NIfTI files are."""
    images, truths = zip(*(tiny_case(200 + k) for k in range(n_slices)), strict=True)
    lps = Volume(np.stack(images).astype(np.float32),
                 Geometry((SPACING_MM, SPACING_MM, SLICE_MM), (-120.0, -130.0, 40.0),
                          tuple(np.eye(3).ravel())))
    ras = sitk.Cast(sitk.DICOMOrient(lps.to_sitk(), "RAS"), sitk.sitkInt16)
    sitk.WriteImage(ras, str(path))
    truth = lps.geometry.apply_to(sitk.GetImageFromArray(np.stack(truths)))
    return ras, sitk.GetArrayFromImage(sitk.DICOMOrient(truth, "RAS"))


def test_segment_writes_a_pair_that_overlays_the_ct(tiny_model, tmp_path, capsys):
    ct, truth = write_ras_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "--slice", "1", "--model",
                 str(tiny_model), "--out", str(out), *TINY])
    assert code == 0
    printed = capsys.readouterr()
    assert "Psoas" in printed.out and "[" in printed.err  # table on stdout, progress on stderr
    label = sitk.ReadImage(str(out / "ct-label.nii.gz"))
    image = sitk.ReadImage(str(out / "ct-image.nii.gz"))
    source_slice = ct[:, :, 1:2]  # RAS-stored: k still runs inferior → superior
    for written in (label, image):
        assert written.GetSize() == source_slice.GetSize()
        assert written.GetOrigin() == pytest.approx(source_slice.GetOrigin())
        assert written.GetDirection() == pytest.approx(source_slice.GetDirection())
        assert written.GetSpacing() == pytest.approx(source_slice.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  sitk.GetArrayFromImage(source_slice))
    predicted = sitk.GetArrayFromImage(label)[0]
    for value in (1, 2, 3):  # each muscle lands where the truth has it, in source order
        overlap = np.sum((predicted == value) & (truth[1] == value))
        assert overlap > 0.7 * np.sum(truth[1] == value)
    report = json.loads((out / "ct-report.json").read_text())
    assert report["status"] == "ok"
    assert report["input"]["slice_index"] == 1
    assert report["input"]["source_orientation"] == "RAS"
    assert report["inference"]["folds"] == [0, 1, 2]
    assert report["versions"]["nnunetv2"]
    assert set(report["outputs"]) >= {"image", "label", "overlay", "metrics_csv"}
    assert report["metrics"]["psoas_area_cm2"] > 0


def test_segment_by_z_equals_segment_by_index(tiny_model, tmp_path):
    write_ras_ct(tmp_path / "ct.nii.gz")
    common = ["--model", str(tiny_model), *TINY]
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--slice", "2", "--out",
                 str(tmp_path / "a"), *common]) == 0
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--z", str(40.0 + 2 * SLICE_MM),
                 "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "ct-label.nii.gz")))
            for d in "ab")
    np.testing.assert_array_equal(a, b)


def test_segment_refuses_to_overwrite_a_finished_case(tiny_model, tmp_path, capsys):
    write_ras_ct(tmp_path / "ct.nii.gz")
    args = ["segment", str(tmp_path / "ct.nii.gz"), "--slice", "0", "--model",
            str(tiny_model), "--out", str(tmp_path / "out"), *TINY]
    assert main(args) == 0
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("where, message", [
    (["--slice", "9"], "out of range"),
    (["--z", "-500"], "outside"),
])
def test_segment_bad_slice_fails_with_a_clear_message(tiny_model, tmp_path, capsys, where,
                                                     message):
    write_ras_ct(tmp_path / "ct.nii.gz")
    code = main(["segment", str(tmp_path / "ct.nii.gz"), *where, "--model", str(tiny_model),
                 "--out", str(tmp_path / "o"), *TINY])
    assert code == 1
    assert message in capsys.readouterr().err


def test_missing_ct_fails_with_a_clear_message(tiny_model, tmp_path, capsys):
    code = main(["segment", str(tmp_path / "missing.nii.gz"), "--slice", "0", "--model",
                 str(tiny_model), "--out", str(tmp_path / "o"), *TINY])
    assert code == 1
    assert "CT not found" in capsys.readouterr().err


def test_bad_usage_exits_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(tmp_path / "ct.nii.gz"), "--model", "x", "--out", "o"])
    assert exit_info.value.code == 2  # neither --slice nor --z
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "ct", "--slice", "middle", "--model", "x", "--out", "o"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "ct", "--slice", "1", "--model", "x", "--out", "o", "--threads", "0"])
    assert exit_info.value.code == 2


def test_threads_option_reaches_the_segmenter(tiny_model):
    args = build_parser().parse_args(["segment", "ct", "--slice", "0", "--model",
                                      str(tiny_model), "--out", "o", "--threads", "1"])
    assert build_segmenter(args).num_threads == 1


def test_incomplete_model_folder_is_named(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    write_ras_ct(tmp_path / "ct.nii.gz")
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "--slice", "0", "--model",
                 str(tmp_path / "model"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "dataset.json" in capsys.readouterr().err


@pytest.mark.realdata
def test_segment_auto_finds_l3_on_the_real_ct(tiny_model, sample_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["segment", str(sample_dir / "example_ct.nii.gz"), "--slice", "auto",
                 "--model", str(tiny_model), "--out", str(out), "--case", "ts", *TINY])
    assert code == 0
    report = json.loads((out / "ts-report.json").read_text())
    assert abs(report["input"]["slice_index"] - 73) <= 3
    assert report["localization"]["confidence"] == "high"
    assert (out / report["localization"]["preview"]).is_file()
    label = sitk.ReadImage(str(out / "ts-label.nii.gz"))
    ct = sitk.ReadImage(str(sample_dir / "example_ct.nii.gz"))
    k = report["input"]["slice_index"]
    assert label.GetOrigin() == pytest.approx(ct[:, :, k:k + 1].GetOrigin())
    assert label.GetDirection() == pytest.approx(ct.GetDirection())


@pytest.mark.realdata
def test_batch_accepts_auto_slices_and_records_the_localisation(tiny_model, sample_dir,
                                                                tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case_id,path,slice\nts,{sample_dir / 'example_ct.nii.gz'},auto\n"
                        f"ts_small,{sample_dir / 'example_ct_sm.nii.gz'},auto\n")
    out = tmp_path / "out"
    code = main(["batch", str(manifest), "--model", str(tiny_model), "--out", str(out),
                 *TINY])
    assert code == 1  # the L2–T11 slab has no L3: recorded as failed, the run goes on
    lines = (out / "cohort.csv").read_text().splitlines()
    rows = {row["case_id"]: row for row in csv.DictReader(lines)}
    assert rows["ts"]["l3_confidence"] == "high"
    assert abs(int(rows["ts"]["slice_index"]) - 73) <= 3
    assert "L3" in rows["ts_small"]["error"] or "localisation" in rows["ts_small"]["error"]
