"""Body-composition metrics of one labelled axial CT slice.

Definitions, fixed here (every column name carries its unit):

* ``area_cm2`` = pixels × row spacing × column spacing / 100.
* ``mean_hu``, ``sd_hu``: mean and *population* standard deviation (ddof=0, the plain SD of
  the pixel values, as body-composition tools report it) of the class's HU values; NaN
  when the class is empty.
* ``muscle_window_area_cm2``: area of the mask's pixels with -29 <= HU <= 150.
* ``imat_area_cm2``: intermuscular adipose tissue, the mask's pixels with -190 <= HU <= -30.
  Both windows are inclusive; a non-integer HU strictly between -30 and -29 is in neither.
* ``total``: the three muscle classes together. Its Dice compares "any muscle" with "any
  muscle", so it ignores confusion between classes.
* ``dice`` = 2|A∩B| / (|A| + |B|), ``jaccard`` = |A∩B| / |A∪B|. Both masks empty: 1.0
  (the two agree that the class is absent); one empty: 0.0. ``mean_dice`` averages the
  three classes. None when no reference was given.
* ``smi_cm2_m2`` = total ``area_cm2`` / height² (skeletal muscle index).

Computed with three ``np.bincount`` passes over the slice (the total pooled from the
classes), fast enough to rerun after every brush stroke.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .geometry import AxialSlice
from .labels import LABEL_VALUES, MUSCLE_CLASSES

MUSCLE_HU_WINDOW = (-29.0, 150.0)
IMAT_HU_WINDOW = (-190.0, -30.0)
HEIGHT_RANGE_M = (0.5, 2.5)
TOTAL_KEY, TOTAL_NAME = "total", "Total muscle"

_N_LABELS = max(LABEL_VALUES) + 1
_TOTAL = _N_LABELS  # index of the all-muscle entry in _stats
_FIELDS = ("pixels", "area_cm2", "mean_hu", "sd_hu", "muscle_window_area_cm2",
           "imat_area_cm2", "dice", "jaccard")
# Flat-row columns, in order: the same for every case, with or without reference or height.
METRIC_COLUMNS: tuple[str, ...] = tuple(
    f"{key}_{field}" for key in (*(c.key for c in MUSCLE_CLASSES), TOTAL_KEY) for field in _FIELDS
) + ("mean_dice", "smi_cm2_m2", "height_m", "spacing_row_mm", "spacing_col_mm")
# Per-class table: (row key, display header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("class", "Class"),
    ("pixels", "Pixels"),
    ("area_cm2", "Area (cm²)"),
    ("mean_hu", "Mean HU"),
    ("sd_hu", "SD HU"),
    ("muscle_window_area_cm2", "Area -29..150 HU (cm²)"),
    ("imat_area_cm2", "IMAT -190..-30 HU (cm²)"),
    ("dice", "Dice"),
    ("jaccard", "Jaccard"),
)


@dataclass(frozen=True)
class ClassMetrics:
    key: str
    name: str
    pixels: int
    area_cm2: float
    mean_hu: float
    sd_hu: float
    muscle_window_area_cm2: float
    imat_area_cm2: float
    dice: float | None = None
    jaccard: float | None = None


@dataclass(frozen=True)
class MuscleMetrics:
    classes: tuple[ClassMetrics, ...]  # in the order of labels.MUSCLE_CLASSES
    total: ClassMetrics
    mean_dice: float | None
    smi_cm2_m2: float | None
    height_m: float | None
    spacing_mm: tuple[float, float]  # (row, column)

    def row(self) -> dict[str, float | int | None]:
        """One flat row with the columns of :data:`METRIC_COLUMNS`, in that order."""
        row = {f"{m.key}_{f}": getattr(m, f) for m in (*self.classes, self.total) for f in _FIELDS}
        row.update(mean_dice=self.mean_dice, smi_cm2_m2=self.smi_cm2_m2, height_m=self.height_m,
                   spacing_row_mm=self.spacing_mm[0], spacing_col_mm=self.spacing_mm[1])
        return row

    def table(self) -> list[dict[str, str | float | int | None]]:
        """One row per class, then the total; keys as in :data:`TABLE_COLUMNS`."""
        return [{"class": m.name} | {f: getattr(m, f) for f in _FIELDS}
                for m in (*self.classes, self.total)]


def compute_metrics(pixels_hu, labels, spacing_mm, reference=None, height_m=None
                    ) -> MuscleMetrics:
    """Areas, HU statistics, IMAT, Dice/Jaccard (if ``reference``) and SMI (if ``height_m``).

    ``pixels_hu`` and ``labels`` are 2D arrays of one shape; ``spacing_mm`` is (row, column).
    """
    hu = _check_pixels(pixels_hu)
    labels = check_labels(labels, hu.shape)
    spacing = _check_spacing(spacing_mm)
    height = check_height(height_m)
    cm2 = spacing[0] * spacing[1] / 100.0
    stats = _stats(hu, labels)
    overlaps = (None if reference is None
                else _overlaps(labels, check_labels(reference, hu.shape, "reference")))
    classes = tuple(
        _class_metrics(c.key, c.name, stats, c.value, cm2,
                       None if overlaps is None else overlaps[i])
        for i, c in enumerate(MUSCLE_CLASSES)
    )
    total = _class_metrics(TOTAL_KEY, TOTAL_NAME, stats, _TOTAL, cm2,
                           None if overlaps is None else overlaps[-1])
    return MuscleMetrics(
        classes=classes,
        total=total,
        mean_dice=None if overlaps is None else float(np.mean([c.dice for c in classes])),
        smi_cm2_m2=None if height is None else total.area_cm2 / height**2,
        height_m=height,
        spacing_mm=spacing,
    )


def compute_slice_metrics(slice_: AxialSlice, labels, reference=None, height_m=None
                          ) -> MuscleMetrics:
    """:func:`compute_metrics` on an :class:`AxialSlice` and canonical label arrays."""
    return compute_metrics(slice_.pixels, labels, slice_.spacing_mm, reference, height_m)


def check_labels(labels, shape: tuple[int, ...] | None = None, what: str = "labels"
                 ) -> np.ndarray:
    """``labels`` as uint8 after checking its shape and that it holds only 0, 1, 2, 3."""
    array = np.asarray(labels)
    if shape is not None and array.shape != tuple(shape):
        raise InputError(
            f"{what} has shape {array.shape} but the CT slice has shape {tuple(shape)}. "
            "Use the label map of this very slice."
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"{what} must be a numeric label array; got dtype {array.dtype}.")
    bad = ~np.isin(array, LABEL_VALUES)
    if bad.any():
        values = np.unique(array[bad])
        shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if values.size > 10 else "")
        raise InputError(
            f"{what} contains label values {shown}; only 0 (background), 1 (psoas), "
            "2 (paraspinal) and 3 (abdominal wall) are allowed. Map other values onto these "
            "classes first."
        )
    return array.astype(np.uint8, copy=False)


def check_height(height_m) -> float | None:
    """The height in metres, or None; refuses values outside 0.5–2.5 m (e.g. centimetres)."""
    if height_m is None:
        return None
    try:
        height = float(height_m)
    except (TypeError, ValueError):
        height = math.nan
    low, high = HEIGHT_RANGE_M
    if not low <= height <= high:
        raise InputError(
            f"Height {height_m!r} m is outside {low}–{high} m. Give the patient's height in "
            "metres (e.g. 1.75), not centimetres."
        )
    return height


def _check_pixels(pixels_hu) -> np.ndarray:
    hu = np.asarray(pixels_hu, dtype=np.float64)
    if hu.ndim != 2:
        raise InputError(f"CT pixels must be a 2D array [rows, cols]; got shape {hu.shape}.")
    n_bad = int(np.count_nonzero(~np.isfinite(hu)))
    if n_bad:
        raise InputError(f"CT pixels contain {n_bad} NaN or infinite values; fill them first.")
    return hu


def _check_spacing(spacing_mm) -> tuple[float, float]:
    values = tuple(float(s) for s in np.ravel(spacing_mm))
    if len(values) != 2 or not all(np.isfinite(s) and s > 0 for s in values):
        raise InputError(
            f"Pixel spacing must be two positive mm values (row, column); got {spacing_mm!r}."
        )
    return values


def _stats(hu: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per label value, then for the three muscle classes together (index ``_TOTAL``): pixel
    count, HU sum, sum of squared deviations from the mean, muscle-window and IMAT counts."""
    hu, groups = hu.ravel(), labels.ravel().astype(np.intp)
    window = _within(hu, MUSCLE_HU_WINDOW) + 2 * _within(hu, IMAT_HU_WINDOW)  # 0, 1 or 2
    by_window = np.bincount(groups * 3 + window, minlength=_N_LABELS * 3).reshape(-1, 3)
    count = by_window.sum(axis=1)
    sums = np.bincount(groups, weights=hu, minlength=_N_LABELS)
    mean = np.divide(sums, count, out=np.zeros(_N_LABELS), where=count > 0)
    squares = np.bincount(groups, weights=(hu - mean[groups]) ** 2, minlength=_N_LABELS)
    # The muscle classes together, by the pooled identity SS = Σ SS_c + Σ n_c (m_c - m)².
    muscle = slice(min(LABEL_VALUES) + 1, None)
    total_mean = sums[muscle].sum() / max(count[muscle].sum(), 1)
    total_squares = squares[muscle].sum() + (count[muscle] * (mean[muscle] - total_mean) ** 2
                                             ).sum()
    return {
        "count": np.append(count, count[muscle].sum()),
        "sum": np.append(sums, sums[muscle].sum()),
        "squares": np.append(squares, total_squares),
        "muscle_window": np.append(by_window[:, 1], by_window[muscle, 1].sum()),
        "imat": np.append(by_window[:, 2], by_window[muscle, 2].sum()),
    }


def _within(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return (hu >= window[0]) & (hu <= window[1])


def _class_metrics(key, name, stats, group, cm2, overlap) -> ClassMetrics:
    dice, jaccard = (None, None) if overlap is None else overlap
    n = int(stats["count"][group])
    return ClassMetrics(
        key=key,
        name=name,
        pixels=n,
        area_cm2=n * cm2,
        mean_hu=float(stats["sum"][group] / n) if n else math.nan,
        sd_hu=math.sqrt(stats["squares"][group] / n) if n else math.nan,
        muscle_window_area_cm2=float(stats["muscle_window"][group] * cm2),
        imat_area_cm2=float(stats["imat"][group] * cm2),
        dice=dice,
        jaccard=jaccard,
    )


def _overlaps(labels: np.ndarray, reference: np.ndarray) -> list[tuple[float, float]]:
    """(Dice, Jaccard) per muscle class, then for any muscle vs any muscle."""
    confusion = np.bincount(
        labels.ravel().astype(np.intp) * _N_LABELS + reference.ravel(), minlength=_N_LABELS**2
    ).reshape(_N_LABELS, _N_LABELS)
    per_class = [
        _dice_jaccard(confusion[v, v], confusion[v, :].sum(), confusion[:, v].sum())
        for v in (c.value for c in MUSCLE_CLASSES)
    ]
    fg = confusion[1:, 1:].sum(), confusion[1:, :].sum(), confusion[:, 1:].sum()
    return [*per_class, _dice_jaccard(*fg)]


def _dice_jaccard(both: int, predicted: int, reference: int) -> tuple[float, float]:
    if predicted + reference == 0:
        return 1.0, 1.0
    return (float(2 * both / (predicted + reference)),
            float(both / (predicted + reference - both)))
