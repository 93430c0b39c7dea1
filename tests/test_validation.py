"""Validation statistics on a small hand-made set, checked against scipy and hand counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats

from L3MuscleSegLib.cli import main
from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.validation import agreement, find_case_pairs, validate, write_report

SIZE = 20  # reference grid: 20 x 20 pixels of 1 x 1 mm = 0.01 cm² each
LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
X_FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def reference_labels() -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[2:6, 2:6] = 1  # psoas: 16 px
    labels[10:14, 4:12] = 2  # paraspinal: 32 px
    labels[16:18, :] = 3  # abdominal wall: 40 px
    return labels


def ct() -> np.ndarray:
    """HU rising by 1 per row, so a mask's mean HU depends on where it lies."""
    return np.repeat(np.arange(30.0, 30.0 + SIZE)[:, None], SIZE, axis=1)


def write(path, array, spacing=1.0, origin=(0.0, 0.0), direction=LPS) -> None:
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((spacing, spacing, 3.0))
    image.SetOrigin((*origin, 10.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def coarse_flipped(fine: np.ndarray) -> np.ndarray:
    """``fine`` on a 2 mm grid with x flipped: each stored pixel covers 2 x 2 fine pixels."""
    return fine[::2, ::2][:, ::-1].copy()


@pytest.fixture
def study(tmp_path):
    """Three cases with Dice known by hand; 'resampled' is stored on a coarser, flipped grid."""
    pred, ref, pred_b = (tmp_path / name for name in ("pred", "ref", "pred_b"))
    for folder in (pred, ref, pred_b):
        folder.mkdir()
    truth = reference_labels()
    wider_psoas = truth.copy()
    wider_psoas[2:6, 6] = 1  # 20 px against 16: psoas Dice 32/36
    half_wall = truth.copy()
    half_wall[16:18, 10:] = 0  # 20 px against 40: abdominal-wall Dice 40/60
    for case in ("same", "wider", "resampled"):
        write(ref / f"{case}-label.nii.gz", truth)
        write(ref / f"{case}-image.nii.gz", ct().astype(np.int16))
    write(ref / "only_in_ref.nii.gz", truth)
    write(pred / "same-label.nii.gz", truth)
    write(pred / "wider.nii.gz", wider_psoas)
    write(pred / "resampled-label.nii.gz", coarse_flipped(half_wall), spacing=2.0,
          origin=(18.5, 0.5), direction=X_FLIPPED)
    write(pred_b / "same-label.nii.gz", truth)
    write(pred_b / "wider-label.nii.gz", truth)
    write(pred_b / "resampled-label.nii.gz", half_wall)
    return pred, ref, pred_b


# Hand-computed expectations for the study fixture, in case order same, resampled, wider.
MEAN_DICE = np.array([1.0, (1 + 1 + 40 / 60) / 3, (32 / 36 + 1 + 1) / 3])
MEAN_DICE_B = np.array([1.0, (1 + 1 + 40 / 60) / 3, 1.0])
REF_AREA = np.full(3, 0.88)
PRED_AREA = np.array([0.88, 0.68, 0.92])
HU = ct()
REF_HU = np.full(3, HU[reference_labels() > 0].mean())
PRED_HU = np.array([REF_HU[0],
                    np.concatenate([HU[2:6, 2:6].ravel(), HU[10:14, 4:12].ravel(),
                                    HU[16:18, :10].ravel()]).mean(),
                    np.concatenate([HU[reference_labels() > 0], HU[2:6, 6]]).mean()])


def test_pairs_match_by_case_id_and_find_the_ct(study):
    pred, ref, _ = study
    pairs, unmatched = find_case_pairs(pred, ref)
    assert [p.case_id for p in pairs] == ["resampled", "same", "wider"]
    assert unmatched == ("only_in_ref",)
    assert all(p.ct == ref / f"{p.case_id}-image.nii.gz" for p in pairs)
    assert pairs[2].prediction.name == "wider.nii.gz"


def test_per_case_dice_area_and_hu_match_hand_counts(study):
    pred, ref, _ = study
    per_case = validate(pred, ref).per_case.set_index("case_id").loc[
        ["same", "resampled", "wider"]]
    np.testing.assert_allclose(per_case["psoas_dice"], [1, 1, 32 / 36])
    np.testing.assert_allclose(per_case["abdominal_wall_dice"], [1, 40 / 60, 1])
    np.testing.assert_allclose(per_case["mean_dice"], MEAN_DICE)
    np.testing.assert_allclose(per_case["ref_total_area_cm2"], REF_AREA)
    np.testing.assert_allclose(per_case["pred_total_area_cm2"], PRED_AREA)
    np.testing.assert_allclose(per_case["ref_total_mean_hu"], REF_HU)
    np.testing.assert_allclose(per_case["pred_total_mean_hu"], PRED_HU)


def test_summary_statistics_match_scipy(study):
    pred, ref, pred_b = study
    result = validate(pred, ref, pred_b)
    mean = result.dice.loc["mean"]
    assert mean["n"] == 3
    assert mean["mean"] == pytest.approx(MEAN_DICE.mean())
    assert mean["sd"] == pytest.approx(np.std(MEAN_DICE, ddof=1))
    assert mean["min"] == pytest.approx(MEAN_DICE.min())
    assert mean["worst_case"] == "resampled"
    assert mean["share_ge_0.90"] == pytest.approx(2 / 3)  # 0.889 is below 0.90
    assert mean["mean_below_0.90"] == pytest.approx(MEAN_DICE[1])
    psoas = result.dice.loc["psoas"]
    assert psoas["share_ge_0.90"] == pytest.approx(2 / 3)
    assert psoas["mean_below_0.90"] == pytest.approx(32 / 36)
    assert result.dice.loc["paraspinal", "share_ge_0.90"] == 1.0
    assert np.isnan(result.dice.loc["paraspinal", "mean_below_0.90"])

    area = result.agreement.loc["total_area_cm2"]
    difference = PRED_AREA - REF_AREA
    assert area["mae"] == pytest.approx(np.abs(difference).mean())
    assert area["bias"] == pytest.approx(difference.mean())
    sd = np.std(difference, ddof=1)
    assert area["loa_low"] == pytest.approx(difference.mean() - 1.96 * sd)
    assert area["loa_high"] == pytest.approx(difference.mean() + 1.96 * sd)
    assert np.isnan(area["pearson_r"])  # reference areas are all equal: r is undefined
    hu = result.agreement.loc["total_mean_hu"]
    assert hu["bias"] == pytest.approx((PRED_HU - REF_HU).mean())

    comparison = result.comparison.iloc[0]
    expected = stats.ttest_rel(MEAN_DICE_B, MEAN_DICE)
    assert comparison["t"] == pytest.approx(expected.statistic)
    assert comparison["p"] == pytest.approx(expected.pvalue)
    assert comparison["min_dice_change"] == pytest.approx(MEAN_DICE_B.min() - MEAN_DICE.min())


def test_agreement_matches_scipy_pearson_and_bland_altman():
    predicted = pd.Series([10.0, 12.5, 9.0, 15.0, 11.0])
    reference = pd.Series([10.5, 12.0, 9.5, 13.5, 11.5])
    row = agreement(predicted, reference)
    expected = stats.pearsonr(predicted, reference)
    assert row["pearson_r"] == pytest.approx(expected.statistic)
    assert row["pearson_p"] == pytest.approx(expected.pvalue)
    difference = predicted - reference  # 0.5 0.5 0.5 1.5 0.5 with signs -, +, -, +, -
    assert row["bias"] == pytest.approx(0.1)
    assert row["mae"] == pytest.approx(0.7)
    assert row["loa_high"] - row["bias"] == pytest.approx(1.96 * np.std(difference, ddof=1))


def test_identical_masks_give_dice_one_bias_zero_and_r_one(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    areas = []
    for n, rows in enumerate((2, 4, 7)):
        labels = np.zeros((SIZE, SIZE), np.uint8)
        labels[:rows, :5], labels[10:, :n + 1], labels[18:, 10:] = 1, 2, 3
        areas.append(np.count_nonzero(labels) / 100)
        write(pred / f"c{n}-label.nii.gz", labels)
        write(ref / f"c{n}-label.nii.gz", labels)
        write(pred / f"c{n}-image.nii.gz", (ct() + n).astype(np.int16))  # CT beside pred
    result = validate(pred, ref)
    assert (result.per_case[["psoas_dice", "paraspinal_dice", "abdominal_wall_dice"]] == 1).all(
        axis=None)
    np.testing.assert_allclose(result.per_case["pred_total_area_cm2"], areas)
    for quantity in ("total_area_cm2", "total_mean_hu"):
        row = result.agreement.loc[quantity]
        assert row["bias"] == 0 and row["loa_low"] == 0 and row["loa_high"] == 0
        assert row["mae"] == 0
        assert row["pearson_r"] == pytest.approx(1.0)
    assert result.dice.loc["mean", "share_ge_0.90"] == 1.0
    assert result.comparison is None


def test_without_ct_hu_is_missing_but_dice_is_computed(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    write(pred / "a.nii.gz", reference_labels())
    write(ref / "a.nii.gz", reference_labels())
    result = validate(pred, ref)
    assert result.per_case.loc[0, "mean_dice"] == 1.0
    assert np.isnan(result.per_case.loc[0, "pred_total_mean_hu"])
    assert result.agreement.loc["total_mean_hu", "n"] == 0


def test_report_writes_tables_plots_and_html_without_silent_overwrite(study, tmp_path):
    pred, ref, pred_b = study
    out = tmp_path / "report"
    report = write_report(validate(pred, ref, pred_b), out)
    names = {p.name for p in out.iterdir()}
    assert {"per_case.csv", "dice.csv", "agreement.csv", "comparison.csv", "dice_boxplot.png",
            "area_scatter.png", "bland_altman_total_area_cm2.png",
            "bland_altman_total_mean_hu.png", "report.html"} <= names
    assert not any(name.endswith(".tmp") or ".tmp." in name for name in names)
    assert (out / "dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    html = report.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4
    dice = pd.read_csv(out / "dice.csv", index_col="class")
    assert dice.loc["mean", "worst_case"] == "resampled"
    with pytest.raises(InputError, match="already exists"):
        write_report(validate(pred, ref), out)


def test_bad_label_values_and_empty_matches_are_refused(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    with pytest.raises(InputError, match="No case id"):
        validate(pred, ref)
    write(pred / "a.nii.gz", np.full((4, 4), 7, np.uint8))
    write(ref / "a.nii.gz", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="label values 7"):
        validate(pred, ref)


def test_cli_validate(study, tmp_path, capsys):
    pred, ref, pred_b = study
    out = tmp_path / "cli-report"
    assert main(["validate", "--pred", str(pred), "--ref", str(ref), "--pred-b", str(pred_b),
                 "--out", str(out)]) == 0
    assert "3 cases: mean Dice" in capsys.readouterr().out
    assert (out / "report.html").is_file()
