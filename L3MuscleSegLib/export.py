"""Writing results: paired NIfTI slice, full-volume label, metrics CSV, JSON, overlay PNG.

Every writer goes through :func:`atomic_path`: the file is written under a temporary name
in the target folder and renamed into place only once complete, so an error never leaves a
half-written file, and an existing file is kept unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .errors import InputError
from .geometry import AxialSlice, Volume, slice_to_source_image
from .labels import MUSCLE_CLASSES
from .metrics import MuscleMetrics, check_labels

SOFT_TISSUE_WINDOW = (400.0, 40.0)  # (width, level) in HU
OVERLAY_ALPHA = 0.4
_INT16 = np.iinfo(np.int16)


# ---------------------------------------------------------------- atomic writing


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` if it may be written: its folder exists, and it is new or ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"'{path}' is a folder; give a file name to write.")
    if path.exists() and not overwrite:
        raise InputError(
            f"'{path}' already exists. Pass overwrite=True (command line: --overwrite) to "
            "replace it, or choose another name."
        )
    if not path.parent.is_dir():
        raise InputError(f"Folder '{path.parent}' does not exist; create it first.")
    return path


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz`` too), so writers that choose the
    format from the extension (SimpleITK, nibabel, matplotlib) work on it. If the block
    raises, the temporary file is removed and ``path`` is untouched.
    """
    path = check_writable(path, overwrite)
    suffix = _full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    temp = path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _full_suffix(path: Path) -> str:
    suffixes = path.suffixes
    return "".join(suffixes[-2:]) if len(suffixes) >= 2 and suffixes[-1] == ".gz" else path.suffix


# ---------------------------------------------------------------- images


def write_pair(out_dir: str | Path, case_id: str, slice_: AxialSlice, labels: np.ndarray,
               overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<case>-image.nii.gz`` (HU) and ``<case>-label.nii.gz`` (uint8 0–3).

    Both are one-slice images on the source volume's grid (same origin, spacing, direction
    and axis order as that slice of the source), so they overlay the source CT anywhere.
    """
    _check_case_id(case_id)
    labels = check_labels(labels, slice_.pixels.shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{case_id}-image.nii.gz"
    label_path = out_dir / f"{case_id}-label.nii.gz"
    image = slice_to_source_image(slice_, _hu_for_storage(slice_.pixels))
    label = slice_to_source_image(slice_, labels)
    with atomic_path(image_path, overwrite) as image_temp, \
            atomic_path(label_path, overwrite) as label_temp:
        sitk.WriteImage(image, str(image_temp), useCompression=True)
        sitk.WriteImage(label, str(label_temp), useCompression=True)
    return image_path, label_path


def write_full_volume_label(path: str | Path, volume: Volume, slice_: AxialSlice,
                            labels: np.ndarray, overwrite: bool = False) -> Path:
    """Write a label volume on ``volume``'s grid: zero except the slice, placed by position.

    For an oblique volume the slice lies on a resampled axial grid, so its labels land
    only on the source voxels nearest to it.
    """
    labels = check_labels(labels, slice_.pixels.shape)
    one_slice = slice_to_source_image(slice_, labels)
    grid = volume.geometry.apply_to(sitk.Image(volume.array.shape[::-1], sitk.sitkUInt8))
    placed = sitk.Resample(one_slice, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    if labels.any() and not sitk.GetArrayViewFromImage(placed).any():
        raise InputError(
            f"The slice at z = {slice_.z_mm:.1f} mm does not lie inside the volume "
            f"{volume.source or ''}; pass the volume the slice was picked from."
        )
    with atomic_path(path, overwrite) as temp:
        sitk.WriteImage(placed, str(temp), useCompression=True)
    return Path(path)


def _check_case_id(case_id: str) -> None:
    if (not isinstance(case_id, str) or not case_id.strip() or case_id in (".", "..")
            or any(sep in case_id for sep in ("/", "\\", os.sep, "\0"))):
        raise InputError(
            f"Case id {case_id!r} cannot name a file: use a non-empty name without path "
            "separators, e.g. 'case001'."
        )


def _hu_for_storage(pixels: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer within int16's range, else float32."""
    integral = np.array_equal(pixels, np.round(pixels))
    if integral and pixels.min() >= _INT16.min and pixels.max() <= _INT16.max:
        return pixels.astype(np.int16)
    return pixels.astype(np.float32)


# ---------------------------------------------------------------- tables


def write_metrics_csv(path: str | Path, rows: list[dict], append: bool = False,
                      overwrite: bool = False) -> Path:
    """Write metrics rows (one per case). ``append`` adds them to an existing file, whose
    header must hold the same columns; otherwise an existing file needs ``overwrite``."""
    path = Path(path)
    columns = _row_columns(rows)
    old_header = _csv_header(path) if append and path.is_file() else None
    if old_header is not None:
        _check_same_columns(path, old_header, columns)
        columns = old_header
    elif path.exists() and not overwrite:
        raise InputError(
            f"'{path}' already exists. Pass append=True (--append) to add rows to it, or "
            "overwrite=True (--overwrite) to replace it."
        )
    with atomic_path(path, overwrite=True) as temp:
        if old_header is not None:
            shutil.copyfile(path, temp)
            _end_with_newline(temp)
        with open(temp, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            if old_header is None:
                writer.writeheader()
            writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return path


def _row_columns(rows: list[dict]) -> list[str]:
    if not rows:
        raise InputError("No metrics rows to write.")
    columns = list(rows[0])
    for number, row in enumerate(rows[1:], start=2):
        if set(row) != set(columns):
            raise InputError(
                f"Metrics row {number} has columns {sorted(set(row) ^ set(columns))} that "
                "row 1 lacks or has; all rows need the same columns."
            )
    return columns


def _csv_header(path: Path) -> list[str] | None:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None) or None


def _check_same_columns(path: Path, header: list[str], columns: list[str]) -> None:
    missing, extra = sorted(set(header) - set(columns)), sorted(set(columns) - set(header))
    if missing or extra:
        raise InputError(
            f"Cannot append to '{path}': its columns differ from the new rows' (missing in the "
            f"new rows: {missing or 'none'}; not in the file: {extra or 'none'}). Write to a "
            "new CSV file instead."
        )


def _end_with_newline(path: Path) -> None:
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) not in (b"\n", b"\r"):
                f.write(b"\n")


def _csv_cell(value):
    value = _jsonable(value)
    return "" if value is None else value


def write_json(path: str | Path, obj, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented UTF-8 JSON: numpy values become Python ones, dataclasses
    dicts, paths strings, and NaN/inf become null."""
    with atomic_path(path, overwrite) as temp, open(temp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return Path(path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, PurePath):
        return str(obj)
    return obj  # anything else unknown fails in json.dump with a TypeError naming its type


# ---------------------------------------------------------------- overlay picture


def write_overlay_png(path: str | Path, slice_: AxialSlice, labels: np.ndarray, title: str,
                      metrics: MuscleMetrics | None = None, overwrite: bool = False) -> Path:
    """A PNG of the slice (soft-tissue window W400/L40) with the labels overlaid.

    Canonical pixels are anterior-up, patient right on screen left, and are shown as is.
    The legend gives each class's area when ``metrics`` is given.
    """
    labels = check_labels(labels, slice_.pixels.shape)
    figure = _overlay_figure(slice_, labels, title, metrics)
    with atomic_path(path, overwrite) as temp:
        FigureCanvasAgg(figure).print_png(temp)
    return Path(path)


def _overlay_figure(slice_: AxialSlice, labels: np.ndarray, title: str,
                    metrics: MuscleMetrics | None) -> Figure:
    rows, cols = labels.shape
    row_mm, col_mm = slice_.spacing_mm
    width_in = 6.0
    height_in = min(max(width_in * rows * row_mm / (cols * col_mm), 2.0), 12.0) + 0.6
    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    width, level = SOFT_TISSUE_WINDOW
    aspect = row_mm / col_mm
    ax.imshow(slice_.pixels, cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
              aspect=aspect, interpolation="nearest")
    ax.imshow(_label_rgba(labels), aspect=aspect, interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    ax.legend(handles=_legend_handles(metrics), loc="upper right", fontsize=8, framealpha=0.7)
    for x, y, text, ha, va in ((0.5, 0.99, "A", "center", "top"),
                               (0.5, 0.01, "P", "center", "bottom"),
                               (0.01, 0.5, "R", "left", "center"),
                               (0.99, 0.5, "L", "right", "center")):
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=8, color="yellow")
    return figure


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    colours = np.zeros((max(c.value for c in MUSCLE_CLASSES) + 1, 4))
    for cls in MUSCLE_CLASSES:
        colours[cls.value] = (*cls.color, OVERLAY_ALPHA)
    return colours[labels]


def _legend_handles(metrics: MuscleMetrics | None) -> list[Patch]:
    areas = {} if metrics is None else {m.key: m.area_cm2 for m in metrics.classes}
    return [
        Patch(color=cls.color, alpha=OVERLAY_ALPHA,
              label=f"{cls.name}: {areas[cls.key]:.1f} cm²" if cls.key in areas else cls.name)
        for cls in MUSCLE_CLASSES
    ]
