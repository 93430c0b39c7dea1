"""Validation against reference label maps: the study's agreement statistics.

Cases are matched by id (``<case>-label.nii.gz`` or ``<case>.nii.gz``) and aligned in
physical space: the prediction is resampled onto the reference grid (nearest neighbour).
Per-case Dice, areas and mean HU come from :func:`metrics.compute_metrics`; the summary
statistics come from pandas and scipy.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from matplotlib.figure import Figure
from scipy import stats

from .errors import InputError
from .export import atomic_path
from .labels import MUSCLE_CLASSES
from .metrics import check_labels, compute_metrics

log = logging.getLogger(__name__)

DICE_THRESHOLD = 0.90
LABEL_SUFFIX = "-label.nii.gz"
IMAGE_SUFFIX = "-image.nii.gz"
NIFTI_SUFFIX = ".nii.gz"
NOT_LABEL_MAPS = (IMAGE_SUFFIX, "-volume-label.nii.gz")  # other outputs of segment and batch
DICE_COLUMNS = tuple(f"{c.key}_dice" for c in MUSCLE_CLASSES) + ("mean_dice",)
# Metric columns compared between prediction and reference: column -> (unit, axis label).
AGREEMENT_QUANTITIES = {
    "total_area_cm2": ("cm²", "Total muscle area (cm²)"),
    "total_mean_hu": ("HU", "Mean HU of all muscle"),
}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CasePair:
    """The files of one case: reference and prediction label maps, and the CT if found."""

    case_id: str
    reference: Path
    prediction: Path
    ct: Path | None
    prediction_b: Path | None = None


@dataclass(frozen=True)
class ValidationResult:
    per_case: pd.DataFrame  # one row per case: Dice per class, areas and HU of both
    dice: pd.DataFrame  # one row per class + mean: mean, SD, min, worst case, share ≥ 0.90
    agreement: pd.DataFrame  # one row per quantity: Pearson r/p, MAE, bias, limits
    comparison: pd.DataFrame | None  # prediction B vs A (paired t-test), when given
    unmatched: tuple[str, ...]  # case ids present in only some of the folders


# ---------------------------------------------------------------- matching files


def find_case_pairs(pred_dir: str | Path, ref_dir: str | Path,
                    pred_b_dir: str | Path | None = None
                    ) -> tuple[tuple[CasePair, ...], tuple[str, ...]]:
    """Cases present in every folder, and the ids found in only some of them."""
    folders = [Path(p) for p in (pred_dir, ref_dir, pred_b_dir) if p is not None]
    labels = [_label_files(folder) for folder in folders]
    common = sorted(set.intersection(*(set(found) for found in labels)))
    unmatched = tuple(sorted(set().union(*labels) - set(common)))
    if not common:
        raise InputError(
            f"No case id has a label map in every folder ({', '.join(map(str, folders))}). "
            f"Name them '<case>{LABEL_SUFFIX}' or '<case>{NIFTI_SUFFIX}' with the same "
            "<case> in each folder."
        )
    if unmatched:
        log.warning("%d case(s) are not in every folder and are left out: %s",
                    len(unmatched), ", ".join(unmatched[:10]))
    pairs = tuple(
        CasePair(
            case_id=case,
            reference=labels[1][case],
            prediction=labels[0][case],
            ct=_find_ct(case, folders[1], folders[0]),
            prediction_b=labels[2][case] if len(labels) == 3 else None,
        )
        for case in common
    )
    return pairs, unmatched


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"Label folder not found: '{folder}'. Pass a folder of NIfTI files.")
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(f"*{NIFTI_SUFFIX}")):
        name = path.name
        if name.endswith(NOT_LABEL_MAPS):
            continue
        if name.endswith(LABEL_SUFFIX):
            found[name.removesuffix(LABEL_SUFFIX)] = path  # wins over '<case>.nii.gz'
        else:
            found.setdefault(name.removesuffix(NIFTI_SUFFIX), path)
    return found


def _find_ct(case: str, *folders: Path) -> Path | None:
    for folder in folders:
        candidate = folder / f"{case}{IMAGE_SUFFIX}"
        if candidate.is_file():
            return candidate
    log.warning("No CT '%s%s' beside the reference or prediction: mean HU is not compared "
                "for case %s.", case, IMAGE_SUFFIX, case)
    return None


# ---------------------------------------------------------------- per case


def compare_case(pair: CasePair) -> dict:
    """Dice per class, total area and mean HU of prediction and reference for one case."""
    reference = _read_as_3d(pair.reference)
    grid = _single_slice_grid(reference, pair)
    ref_labels, spacing = _labels_on(grid, reference, pair.reference)
    pred_labels, _ = _labels_on(grid, _read_as_3d(pair.prediction), pair.prediction)
    hu = _ct_on(grid, pair.ct) if pair.ct else None
    measured = _measure(hu, pred_labels, spacing, reference=ref_labels)
    truth = _measure(hu, ref_labels, spacing)
    row = {"case_id": pair.case_id, **{c: measured[c] for c in DICE_COLUMNS}}
    for key in AGREEMENT_QUANTITIES:
        row[f"pred_{key}"] = measured[key]
        row[f"ref_{key}"] = truth[key]
    if pair.prediction_b is not None:
        labels_b, _ = _labels_on(grid, _read_as_3d(pair.prediction_b), pair.prediction_b)
        row["mean_dice_b"] = _measure(hu, labels_b, spacing, reference=ref_labels)["mean_dice"]
    return row


def _measure(hu: np.ndarray | None, labels: np.ndarray, spacing: tuple[float, float],
             reference: np.ndarray | None = None) -> dict:
    """The metrics row; without a CT, its HU columns are NaN (areas and Dice need none)."""
    pixels = np.zeros(labels.shape, np.float32) if hu is None else hu
    row = compute_metrics(pixels, labels, spacing, reference=reference).row()
    if hu is None:
        row |= {key: float("nan") for key in row if "_hu" in key}
    return row


def _read_as_3d(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"Cannot read label map '{path}': {err}. Is it a NIfTI file?") from None
    return sitk.JoinSeries(image) if image.GetDimension() == 2 else image


def _single_slice_grid(reference: sitk.Image, pair: CasePair) -> sitk.Image:
    """The grid both are compared on: the reference's, or the prediction's slice of it."""
    if 1 in reference.GetSize():
        return reference
    prediction = _read_as_3d(pair.prediction)
    if 1 in prediction.GetSize():
        log.info("Reference of %s is a volume: comparing on the predicted slice.", pair.case_id)
        return prediction
    raise InputError(
        f"Case {pair.case_id}: neither '{pair.reference}' nor '{pair.prediction}' is a single "
        "slice. Areas are measured on one axial slice: export the L3 slice of the reference."
    )


def _labels_on(grid: sitk.Image, image: sitk.Image, path: Path
               ) -> tuple[np.ndarray, tuple[float, float]]:
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array, spacing = _squeeze(resampled)
    return check_labels(array, what=f"'{path}'"), spacing


def _ct_on(grid: sitk.Image, path: Path) -> np.ndarray:
    image = _read_as_3d(path)
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(),
                              sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return _squeeze(resampled)[0]


def _squeeze(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float]]:
    """The single-slice image as a 2D array and its (row, column) spacing in mm."""
    array = sitk.GetArrayFromImage(image)
    axis = array.shape.index(1)
    spacing = [s for a, s in enumerate(reversed(image.GetSpacing())) if a != axis]
    return np.take(array, 0, axis=axis), (float(spacing[0]), float(spacing[1]))


# ---------------------------------------------------------------- statistics


def dice_summary(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per class and mean foreground: mean, SD, min with its case, share ≥ 0.90."""
    rows = {}
    for column in DICE_COLUMNS:
        dice = per_case.set_index("case_id")[column].dropna()
        below = dice[dice < DICE_THRESHOLD]
        rows[column.removesuffix("_dice")] = {
            "n": dice.size,
            "mean": dice.mean(),
            "sd": dice.std(),
            "min": dice.min(),
            "worst_case": dice.idxmin() if dice.size else None,
            "share_ge_0.90": (dice >= DICE_THRESHOLD).mean(),
            "mean_below_0.90": below.mean(),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("class")


def agreement(predicted: pd.Series, reference: pd.Series) -> dict:
    """Pearson r with p, MAE, and Bland–Altman bias with 95 % limits of agreement."""
    both = pd.concat([predicted, reference], axis=1).dropna()
    pred, ref = both.iloc[:, 0], both.iloc[:, 1]
    difference = pred - ref
    r, p = _pearson(pred, ref)
    bias, sd = difference.mean(), difference.std()
    return {
        "n": len(both), "pearson_r": r, "pearson_p": p, "mae": difference.abs().mean(),
        "bias": bias, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd,
    }


def _pearson(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    if len(x) < 2 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan"), float("nan")  # undefined for fewer than 2 distinct values
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def agreement_table(per_case: pd.DataFrame) -> pd.DataFrame:
    rows = {
        key: {"unit": unit, **agreement(per_case[f"pred_{key}"], per_case[f"ref_{key}"])}
        for key, (unit, _) in AGREEMENT_QUANTITIES.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("quantity")


def paired_comparison(per_case: pd.DataFrame) -> pd.DataFrame:
    """Prediction B vs A on per-case mean Dice: paired t-test and change in minimum Dice."""
    both = per_case[["mean_dice", "mean_dice_b"]].dropna()
    a, b = both["mean_dice"], both["mean_dice_b"]
    test = stats.ttest_rel(b, a) if len(both) >= 2 else None
    return pd.DataFrame([{
        "n": len(both),
        "mean_dice_a": a.mean(), "mean_dice_b": b.mean(),
        "mean_difference_b_minus_a": (b - a).mean(),
        "t": float(test.statistic) if test else float("nan"),
        "p": float(test.pvalue) if test else float("nan"),
        "min_dice_a": a.min(), "min_dice_b": b.min(),
        "min_dice_change": b.min() - a.min(),
    }])


# ---------------------------------------------------------------- the whole study


def validate(pred_dir: str | Path, ref_dir: str | Path, pred_b_dir: str | Path | None = None,
             progress: Progress | None = None) -> ValidationResult:
    pairs, unmatched = find_case_pairs(pred_dir, ref_dir, pred_b_dir)
    rows = []
    for done, pair in enumerate(pairs, start=1):
        rows.append(compare_case(pair))
        if progress is not None:
            progress(done, len(pairs))
    per_case = pd.DataFrame(rows)
    return ValidationResult(
        per_case=per_case,
        dice=dice_summary(per_case),
        agreement=agreement_table(per_case),
        comparison=paired_comparison(per_case) if pred_b_dir is not None else None,
        unmatched=unmatched,
    )


# ---------------------------------------------------------------- report


def write_report(result: ValidationResult, out_dir: str | Path, overwrite: bool = False
                 ) -> Path:
    """CSV tables, PNG plots and one self-contained HTML report; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"per_case": result.per_case.set_index("case_id"), "dice": result.dice,
              "agreement": result.agreement}
    if result.comparison is not None:
        tables["comparison"] = result.comparison
    for name, table in tables.items():
        with atomic_path(out / f"{name}.csv", overwrite) as tmp:
            table.to_csv(tmp)
    figures = _figures(result.per_case, result.agreement)
    for name, png in figures.items():
        with atomic_path(out / f"{name}.png", overwrite) as tmp:
            Path(tmp).write_bytes(png)
    report = out / "report.html"
    with atomic_path(report, overwrite) as tmp:
        Path(tmp).write_text(_html(tables, figures, result.unmatched), encoding="utf-8")
    return report


def _figures(per_case: pd.DataFrame, agreement_rows: pd.DataFrame) -> dict[str, bytes]:
    area = "total_area_cm2"
    figures = {
        "dice_boxplot": _dice_boxplot(per_case),
        "area_scatter": _scatter(per_case[f"ref_{area}"], per_case[f"pred_{area}"],
                                 AGREEMENT_QUANTITIES[area][1]),
    }
    for key, (_, label) in AGREEMENT_QUANTITIES.items():
        if agreement_rows.loc[key, "n"] > 0:  # e.g. no HU without the CT
            figures[f"bland_altman_{key}"] = _bland_altman(
                per_case[f"pred_{key}"], per_case[f"ref_{key}"], agreement_rows.loc[key], label)
    return figures


def _dice_boxplot(per_case: pd.DataFrame) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    data = [per_case[c].dropna() for c in DICE_COLUMNS]
    ax.boxplot(data, tick_labels=[c.name for c in MUSCLE_CLASSES] + ["Mean"])
    ax.axhline(DICE_THRESHOLD, color="grey", linestyle=":", label=f"Dice {DICE_THRESHOLD}")
    ax.set_ylabel("Dice")
    ax.set_title("Dice per class")
    ax.legend(loc="lower left")
    return _png(fig)


def _scatter(reference: pd.Series, predicted: pd.Series, label: str) -> bytes:
    both = pd.concat([reference, predicted], axis=1).dropna()
    x, y = both.iloc[:, 0], both.iloc[:, 1]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(x, y, s=16)
    limits = [min(x.min(), y.min()), max(x.max(), y.max())] if len(both) else [0, 1]
    ax.plot(limits, limits, color="grey", linestyle=":", label="identity")
    if len(both) >= 2 and x.nunique() >= 2:
        fit = stats.linregress(x, y)
        xs = np.asarray(limits)
        ax.plot(xs, fit.intercept + fit.slope * xs, color="C1",
                label=f"y = {fit.slope:.3g}x + {fit.intercept:.3g}, r = {fit.rvalue:.3f}")
    ax.set_xlabel(f"Reference: {label}")
    ax.set_ylabel(f"Predicted: {label}")
    ax.legend(loc="upper left")
    return _png(fig)


def _bland_altman(predicted: pd.Series, reference: pd.Series, row: pd.Series, label: str
                  ) -> bytes:
    both = pd.concat([predicted, reference], axis=1).dropna()
    mean = both.mean(axis=1)
    difference = both.iloc[:, 0] - both.iloc[:, 1]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter(mean, difference, s=16)
    ax.axhline(row["bias"], color="C1", label=f"bias {row['bias']:.2f}")
    for limit in ("loa_low", "loa_high"):
        ax.axhline(row[limit], color="C1", linestyle="--")
    ax.plot([], [], color="C1", linestyle="--",
            label=f"95 % limits {row['loa_low']:.2f} … {row['loa_high']:.2f}")
    ax.set_xlabel(f"Mean of predicted and reference: {label}")
    ax.set_ylabel("Predicted − reference")
    ax.set_title(f"Bland–Altman: {label}")
    ax.legend(loc="best")
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _html(tables: dict[str, pd.DataFrame], figures: dict[str, bytes],
          unmatched: tuple[str, ...]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             "<title>L3MuscleSeg validation</title></head><body>",
             "<h1>L3MuscleSeg validation</h1>",
             f"<p>{len(tables['per_case'])} cases compared; Dice threshold "
             f"{DICE_THRESHOLD}; Bland–Altman limits are bias ± 1.96 SD; "
             "differences are predicted − reference.</p>"]
    if unmatched:
        parts.append(f"<p>Left out (not in every folder): {html.escape(', '.join(unmatched))}"
                     "</p>")
    for name in ("dice", "agreement", "comparison", "per_case"):
        if name in tables:
            parts += [f"<h2>{name.replace('_', ' ').capitalize()}</h2>",
                      tables[name].to_html(float_format=lambda v: f"{v:.4g}", na_rep="–")]
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>"
                     f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
