"""Metrics on a hand-counted 4×5 slice, and the ``l3muscleseg metrics`` command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib.cli import main
from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.metrics import METRIC_COLUMNS, TABLE_COLUMNS, compute_metrics

# 1 psoas, 2 paraspinal, 3 abdominal wall. Muscle pixels sit on the window boundaries;
# background pixels hold values that would count if the masks leaked.
LABELS = np.array([
    [1, 1, 0, 2, 2],
    [1, 1, 0, 2, 2],
    [3, 3, 0, 0, 0],
    [3, 0, 0, 0, 1],
], dtype=np.uint8)
HU = np.array([
    [-29, -30, 0, -190, -191],
    [150, 151, -100, 0, 100],
    [30, 50, 40, -1000, 1000],
    [70, -50, 20, 60, 40],
], dtype=np.float32)
REFERENCE = np.array([
    [1, 1, 0, 2, 0],
    [1, 0, 0, 2, 2],
    [3, 3, 3, 0, 0],
    [0, 0, 0, 0, 0],
], dtype=np.uint8)
SPACING = (0.5, 0.8)  # (row, col) mm: 0.4 mm² = 0.004 cm² per pixel
CM2 = 0.004

# Hand-computed. Psoas HU -29, -30, 150, 151, 40: mean 282/5 = 56.4; squared deviations
# 7293.16 + 7464.96 + 8760.96 + 8949.16 + 268.96 = 32737.2; in window -29, 150, 40; IMAT -30.
# Paraspinal -190, -191, 0, 100: mean -70.25; squared deviations 14340.0625 + 14580.5625 +
# 4935.0625 + 28985.0625 = 62840.75; in window 0, 100; IMAT -190 (-191 is out).
# Abdominal wall 30, 50, 70: mean 50, squared deviations 800; all in window; no IMAT.
# Total: 12 pixels, sum 151, sum of squares 48642 + 82581 + 8300 = 139523.
EXPECTED = {
    "psoas": (5, 56.4, math.sqrt(32737.2 / 5), 3, 1),
    "paraspinal": (4, -70.25, math.sqrt(62840.75 / 4), 2, 1),
    "abdominal_wall": (3, 50.0, math.sqrt(800 / 3), 3, 0),
    "total": (12, 151 / 12, math.sqrt(139523 / 12 - (151 / 12) ** 2), 8, 2),
}
# Overlaps with REFERENCE, counted by hand: (both, predicted, reference).
# psoas 3 of 5 vs 3; paraspinal 3 of 4 vs 3; abdominal wall 2 of 3 vs 3 ((2,2) vs (3,0));
# any muscle: 8 of 12 vs 9.
EXPECTED_DICE = {"psoas": (6 / 8, 3 / 5), "paraspinal": (6 / 7, 3 / 4),
                 "abdominal_wall": (4 / 6, 2 / 4), "total": (16 / 21, 8 / 13)}
MEAN_DICE = (6 / 8 + 6 / 7 + 4 / 6) / 3


def _by_key(result):
    return {m.key: m for m in (*result.classes, result.total)}


def test_areas_and_hu_statistics_match_hand_counts():
    result = compute_metrics(HU, LABELS, SPACING)
    for key, (pixels, mean, sd, in_window, imat) in EXPECTED.items():
        m = _by_key(result)[key]
        assert m.pixels == pixels, key
        assert m.area_cm2 == pytest.approx(pixels * CM2), key
        assert m.mean_hu == pytest.approx(mean), key
        assert m.sd_hu == pytest.approx(sd), key
        assert m.muscle_window_area_cm2 == pytest.approx(in_window * CM2), key
        assert m.imat_area_cm2 == pytest.approx(imat * CM2), key
        assert m.dice is None and m.jaccard is None
    assert result.mean_dice is None and result.smi_cm2_m2 is None
    assert [m.name for m in result.classes] == ["Psoas", "Paraspinal", "Abdominal wall"]


def test_dice_and_jaccard_match_hand_counts():
    result = compute_metrics(HU, LABELS, SPACING, reference=REFERENCE)
    for key, (dice, jaccard) in EXPECTED_DICE.items():
        assert _by_key(result)[key].dice == pytest.approx(dice), key
        assert _by_key(result)[key].jaccard == pytest.approx(jaccard), key
    assert result.mean_dice == pytest.approx(MEAN_DICE)


def test_total_dice_ignores_confusion_between_classes():
    labels, reference = np.ones((2, 2), np.uint8), np.full((2, 2), 2, np.uint8)
    result = compute_metrics(np.zeros((2, 2)), labels, (1, 1), reference=reference)
    assert [m.dice for m in result.classes] == [0.0, 0.0, 1.0]  # wall: both empty
    assert result.total.dice == 1.0 and result.total.jaccard == 1.0
    assert result.mean_dice == pytest.approx(1 / 3)


def test_empty_class_gives_nan_statistics_and_defined_dice():
    labels = np.where(LABELS == 3, 0, LABELS)
    absent_in_both = compute_metrics(HU, labels, SPACING, reference=np.where(
        REFERENCE == 3, 0, REFERENCE))
    wall = absent_in_both.classes[2]
    assert wall.pixels == 0 and wall.area_cm2 == 0.0 and wall.imat_area_cm2 == 0.0
    assert math.isnan(wall.mean_hu) and math.isnan(wall.sd_hu)
    assert (wall.dice, wall.jaccard) == (1.0, 1.0)
    absent_in_one = compute_metrics(HU, labels, SPACING, reference=REFERENCE)
    assert (absent_in_one.classes[2].dice, absent_in_one.classes[2].jaccard) == (0.0, 0.0)


def test_smi_is_total_area_over_height_squared():
    result = compute_metrics(HU, LABELS, SPACING, height_m=1.6)
    assert result.smi_cm2_m2 == pytest.approx(12 * CM2 / 1.6**2)
    assert result.height_m == 1.6


def test_row_has_stable_columns_and_table_one_row_per_class():
    bare = compute_metrics(HU, LABELS, SPACING).row()
    full = compute_metrics(HU, LABELS, SPACING, reference=REFERENCE, height_m=1.6).row()
    assert tuple(bare) == tuple(full) == METRIC_COLUMNS
    assert full["psoas_area_cm2"] == pytest.approx(5 * CM2)
    assert full["abdominal_wall_jaccard"] == pytest.approx(0.5)
    assert full["total_imat_area_cm2"] == pytest.approx(2 * CM2)
    assert (full["spacing_row_mm"], full["spacing_col_mm"]) == SPACING
    assert bare["psoas_dice"] is None and bare["smi_cm2_m2"] is None
    table = compute_metrics(HU, LABELS, SPACING).table()
    assert [row["class"] for row in table] == [
        "Psoas", "Paraspinal", "Abdominal wall", "Total muscle"]
    assert all(list(row) == [key for key, _ in TABLE_COLUMNS] for row in table)
    assert [row["pixels"] for row in table] == [5, 4, 3, 12]


def test_bad_label_values_are_named():
    labels = LABELS.copy()
    labels[0, 2], labels[3, 3] = 7, 255
    with pytest.raises(InputError, match=r"values 7, 255"):
        compute_metrics(HU, labels, SPACING)
    with pytest.raises(InputError, match=r"reference contains label values -1"):
        compute_metrics(HU, LABELS, SPACING, reference=np.full(HU.shape, -1))


def test_shape_mismatch_is_refused():
    with pytest.raises(InputError, match=r"shape \(4, 4\).*\(4, 5\)"):
        compute_metrics(HU, LABELS[:, :4], SPACING)
    with pytest.raises(InputError, match=r"reference has shape \(5, 4\)"):
        compute_metrics(HU, LABELS, SPACING, reference=REFERENCE.T)


@pytest.mark.parametrize("spacing", [(0.0, 0.8), (-0.5, 0.8), (0.5,), (float("nan"), 1.0)])
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(InputError, match="spacing"):
        compute_metrics(HU, LABELS, spacing)


@pytest.mark.parametrize("height", [175, 0.3, float("nan")])
def test_implausible_height_is_named(height):
    with pytest.raises(InputError, match=rf"Height {height!r} m"):
        compute_metrics(HU, LABELS, SPACING, height_m=height)


# ---------------------------------------------------------------- the command

CT_SPACING = (2.0, 2.5, 3.0)  # (i = column, j = row, k): 5 mm² = 0.05 cm² per pixel
CT_ORIGIN = (-4.0, 6.0, 50.0)


def _write(path, array_kji, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(CT_SPACING)
    image.SetOrigin(origin)
    image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """A one-slice LPS CT; its label stored flipped (RAS-like) and its reference inside a
    3-slice volume, so only matching by physical position gives the right numbers."""
    ct = _write(tmp_path / "case7-image.nii.gz", HU[None].astype(np.int16), CT_ORIGIN)
    flipped_origin = (CT_ORIGIN[0] + 2.0 * 4, CT_ORIGIN[1] + 2.5 * 3, CT_ORIGIN[2])
    label = _write(tmp_path / "case7-label.nii.gz", LABELS[::-1, ::-1][None], flipped_origin,
                   direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    decoys = np.full((3, *REFERENCE.shape), 3, np.uint8)
    decoys[1] = REFERENCE
    reference = _write(tmp_path / "reference.nrrd", decoys,
                       (CT_ORIGIN[0], CT_ORIGIN[1], CT_ORIGIN[2] - 3.0))
    return ct, label, reference


def _table_row(out: str, name: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(name))
    return line[len(name):].split()


def test_command_prints_hand_computed_table(pair, capsys):
    ct, label, reference = pair
    assert main(["metrics", ct, label, "--reference", reference, "--height-m", "1.6"]) == 0
    out = capsys.readouterr().out
    # pixels, area, mean HU, SD, window area, IMAT, Dice, Jaccard at 0.05 cm² per pixel
    assert _table_row(out, "Psoas") == [
        "5", "0.25", "56.4", "80.9", "0.15", "0.05", "0.750", "0.600"]
    assert _table_row(out, "Paraspinal") == [
        "4", "0.20", "-70.2", "125.3", "0.10", "0.05", "0.857", "0.750"]
    assert _table_row(out, "Abdominal wall") == [
        "3", "0.15", "50.0", "16.3", "0.15", "0.00", "0.667", "0.500"]
    assert _table_row(out, "Total muscle") == [
        "12", "0.60", "12.6", "107.1", "0.40", "0.10", "0.762", "0.615"]
    assert "Mean Dice (3 classes): 0.758" in out
    assert "SMI: 0.23 cm²/m² (height 1.60 m)" in out  # 0.6 / 1.6²


def test_command_picks_slice_of_3d_ct_and_writes_csv_and_json(pair, tmp_path, capsys):
    ct, label, _ = pair
    volume = np.stack([np.full(HU.shape, -1000), HU, np.full(HU.shape, 400)]).astype(np.int16)
    ct3d = _write(tmp_path / "ct3d.nii.gz", volume, (CT_ORIGIN[0], CT_ORIGIN[1], 47.0))
    out_csv, out_json = tmp_path / "metrics.csv", tmp_path / "metrics.json"
    assert main(["metrics", ct3d, label, "--slice", "1", "--csv", str(out_csv),
                 "--json", str(out_json)]) == 0
    assert _table_row(capsys.readouterr().out, "Psoas")[:3] == ["5", "0.25", "56.4"]
    assert main(["metrics", ct, label, "--csv", str(out_csv), "--append"]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["ct3d", "case7"]
    assert [float(r["total_area_cm2"]) for r in rows] == pytest.approx([0.6, 0.6])
    assert rows[0]["psoas_dice"] == "" and rows[0]["slice_index"] == "1"
    report = json.loads(out_json.read_text())
    assert report["psoas_pixels"] == 5 and report["psoas_dice"] is None
    assert report["classes"][3]["class"] == "Total muscle"


def test_command_refuses_existing_outputs_without_overwrite(pair, tmp_path):
    ct, label, _ = pair
    out_json = tmp_path / "m.json"
    out_json.write_text("{}")
    assert main(["metrics", ct, label, "--json", str(out_json)]) == 1
    assert out_json.read_text() == "{}"
    assert main(["metrics", ct, label, "--json", str(out_json), "--overwrite"]) == 0
    assert json.loads(out_json.read_text())["case_id"] == "case7"


def test_command_exit_codes_on_bad_input(pair, tmp_path, capsys):
    ct, label, _ = pair
    bad = LABELS.copy()
    bad[0, 2] = 7
    bad_label = _write(tmp_path / "bad.nii.gz", bad[None], CT_ORIGIN)
    assert main(["metrics", ct, bad_label]) == 1
    assert "label values 7" in capsys.readouterr().err
    assert main(["metrics", ct, str(tmp_path / "missing.nii.gz")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["metrics", ct, _write(tmp_path / "elsewhere.nii.gz", LABELS[None],
                                       (CT_ORIGIN[0], CT_ORIGIN[1], 80.0))]) == 1
    assert "another slice" in capsys.readouterr().err
    assert main(["metrics", ct, label, "--height-m", "175"]) == 1
    assert "Height 175.0 m" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--height-m", "tall"], ["--slice", "0", "--z", "50"]])
def test_command_bad_usage_exits_2(pair, extra):
    ct, label, _ = pair
    with pytest.raises(SystemExit) as exit_info:
        main(["metrics", ct, label, *extra])
    assert exit_info.value.code == 2
