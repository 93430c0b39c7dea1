"""One case end to end: CT → L3 slice → segmentation → metrics → exports and report.

Shared by ``l3muscleseg segment``, the demo, batch runs and the Slicer module's export, so
every path writes the same files with the same contents. The JSON report is written last:
its presence with ``"status": "ok"`` means the case finished.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import InputError
from .export import (
    write_full_volume_label,
    write_json,
    write_metrics_csv,
    write_overlay_png,
    write_pair,
)
from .geometry import AxialSlice, Volume, canonical_from_source_image, pick_slice, read_volume
from .metrics import MuscleMetrics, check_height, check_labels, compute_slice_metrics

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int, str], None]
REPORT_SUFFIX = "-report.json"
AUTO = "auto"  # slice choice: find L3 automatically
_VERSIONED_PACKAGES = ("numpy", "SimpleITK", "torch", "nnunetv2")


class Predictor(Protocol):
    """The seam between the pipeline and a model (``inference.Segmenter`` in production)."""

    def predict(self, slice_: AxialSlice, progress: ProgressCallback | None = None,
                cancel: Any = None) -> Any: ...

    def provenance(self) -> dict: ...


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    report_path: Path
    image_path: Path
    label_path: Path
    overlay_path: Path
    row: dict  # one cohort-CSV row: identifiers, metrics, QC
    labels: np.ndarray
    slice_: AxialSlice
    metrics: MuscleMetrics


def report_path(out_dir: str | Path, case_id: str) -> Path:
    return Path(out_dir) / f"{case_id}{REPORT_SUFFIX}"


def is_case_done(out_dir: str | Path, case_id: str) -> bool:
    """True when the case's report exists, says ok, and every file it lists exists."""
    path = report_path(out_dir, case_id)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    outputs = report.get("outputs", {}).values()
    return report.get("status") == "ok" and all((path.parent / p).is_file() for p in outputs)


def segment_case(ct_path: str | Path, case_id: str, out_dir: str | Path,
                 predictor: Predictor, *, slice_index: int | str | None = None,
                 z_mm: float | None = None, height_m: float | None = None,
                 reference_path: str | Path | None = None, full_volume_label: bool = False,
                 overwrite: bool = False, refuse_low_confidence: bool = False,
                 cohort_csv: str | Path | None = None,
                 progress: ProgressCallback | None = None, cancel: Any = None) -> CaseResult:
    """Segment and measure one CT at one axial slice, writing every per-case output.

    ``slice_index="auto"`` finds the mid-L3 slice by counting vertebrae; a doubtful answer
    is refused when ``refuse_low_confidence``, and otherwise flagged for review.
    """
    volume = read_volume(ct_path)
    localization = None
    if slice_index == AUTO:
        slice_, localization = locate_l3_slice(volume, case_id, out_dir,
                                               refuse_low_confidence, overwrite)
    else:
        slice_ = pick_slice(volume, index=slice_index, z_mm=z_mm)
    _refuse_existing_report(Path(out_dir), case_id, overwrite)
    result = predictor.predict(slice_, progress=progress, cancel=cancel)
    return write_case(volume, slice_, result.labels, case_id, out_dir,
                      height_m=height_m, reference=_optional_labels(reference_path, slice_),
                      full_volume_label=full_volume_label, overwrite=overwrite,
                      inference=_inference_section(predictor, result), qc=_qc_section(result),
                      localization=localization, cohort_csv=cohort_csv)


def locate_l3_slice(volume: Volume, case_id: str, out_dir: str | Path,
                    refuse_low_confidence: bool, overwrite: bool = False
                    ) -> tuple[AxialSlice, dict]:
    """The automatic mid-L3 slice and its localisation record (preview PNG written beside
    the outputs). A low-confidence answer is never used silently."""
    from .localize import format_report, localize_l3, write_preview

    located = localize_l3(volume)
    log.info("L3 localisation of %s:\n%s", volume.source, format_report(located))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    preview = write_preview(volume, located, Path(out_dir) / f"{case_id}-l3-locate.png",
                            overwrite)
    if not located.found or (located.needs_review and refuse_low_confidence):
        raise InputError(
            f"Automatic L3 localisation is not sure for '{volume.source}': {located.reason} "
            f"Check the preview {preview}, then give the slice number, or accept the "
            "proposed slice (--accept-low-confidence) to segment it flagged for review."
        )
    return (pick_slice(volume, z_mm=located.l3_z_mm),
            located.to_dict() | {"preview": preview.name})


def write_case(volume: Volume, slice_: AxialSlice, labels: np.ndarray, case_id: str,
               out_dir: str | Path, *, height_m: float | None = None,
               reference: np.ndarray | None = None, full_volume_label: bool = False,
               overwrite: bool = False, inference: dict | None = None, qc: dict | None = None,
               localization: dict | None = None, cohort_csv: str | Path | None = None,
               extra_outputs: dict[str, str] | None = None) -> CaseResult:
    """Measure ``labels`` on ``slice_`` and write the pair, overlay, optional volume label,
    ``<case>-metrics.csv`` (and a row appended to ``cohort_csv``) and, last, the JSON
    report. Also used for reviewed (hand-edited) segmentations. ``extra_outputs`` names
    files the caller wrote beside them (e.g. Slicer's ``.seg.nrrd``) for the report."""
    out_dir = Path(out_dir)
    metrics = compute_slice_metrics(slice_, labels, reference, patient_height(height_m, volume))
    image_path, label_path = write_pair(out_dir, case_id, slice_, labels, overwrite)
    overlay_path = write_overlay_png(out_dir / f"{case_id}-overlay.png", slice_, labels,
                                     _overlay_title(case_id, slice_, inference), metrics,
                                     overwrite)
    outputs = {"image": image_path.name, "label": label_path.name, "overlay": overlay_path.name}
    if full_volume_label:
        volume_label = write_full_volume_label(out_dir / f"{case_id}-volume-label.nii.gz",
                                               volume, slice_, labels, overwrite)
        outputs["volume_label"] = volume_label.name
    row = _cohort_row(case_id, volume, slice_, metrics, qc, localization)
    metrics_csv = write_metrics_csv(out_dir / f"{case_id}-metrics.csv", [row],
                                    overwrite=overwrite)
    outputs |= {"metrics_csv": metrics_csv.name} | (extra_outputs or {})
    if cohort_csv is not None:
        write_metrics_csv(cohort_csv, [row], append=True)
    report = {
        "status": "ok",
        "case_id": case_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": _input_section(volume, slice_),
        "localization": localization,
        "inference": inference,
        "qc": qc,
        "metrics": row,
        "outputs": outputs,
        "versions": package_versions(),
    }
    path = write_json(report_path(out_dir, case_id), report, overwrite)
    return CaseResult(case_id, path, image_path, label_path, overlay_path, row, labels,
                      slice_, metrics)


def read_labels_on_slice(path: str | Path, slice_: AxialSlice) -> np.ndarray:
    """The label map resampled onto the slice's canonical grid by physical position."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Label map not found: '{path}'. Check the path.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(
            f"'{path}' is not an image SimpleITK can read; give a NIfTI, NRRD or MHA label map."
        ) from None
    stored = check_labels(sitk.GetArrayViewFromImage(image), what=f"Label map '{path}'")
    on_slice = canonical_from_source_image(slice_, image)
    if stored.any() and not on_slice.any():
        raise InputError(
            f"Label map '{path}' has no labels at the CT slice (z = {slice_.z_mm:.1f} mm): it "
            "belongs to another slice or volume."
        )
    return on_slice


def _optional_labels(path: str | Path | None, slice_: AxialSlice) -> np.ndarray | None:
    return None if path is None else read_labels_on_slice(path, slice_)


def patient_height(explicit_m: float | None, volume: Volume) -> float | None:
    """The given height, else a plausible DICOM PatientSize of the volume, else None."""
    if explicit_m is not None:
        return explicit_m
    height = volume.metadata.get("patient_height_m")
    if height is None:
        return None
    try:
        check_height(height)
    except InputError as err:
        log.warning("Ignoring the DICOM patient height: %s", err)
        return None
    log.info("Using the DICOM patient height, %.2f m, for SMI.", height)
    return height


def package_versions() -> dict[str, str]:
    versions = {"l3muscleseg": __version__, "python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _refuse_existing_report(out_dir: Path, case_id: str, overwrite: bool) -> None:
    path = report_path(out_dir, case_id)
    if path.exists() and not overwrite:
        raise InputError(
            f"'{path}' already exists: case '{case_id}' was segmented before. Use another "
            "case ID or output folder, or pass --overwrite to replace its files."
        )


def _input_section(volume: Volume, slice_: AxialSlice) -> dict:
    return {
        "path": volume.source,
        "slice_index": slice_.index,
        "z_mm": slice_.z_mm,
        "axial_slices": volume.n_axial_slices,
        "slice_shape": list(slice_.pixels.shape),
        "spacing_mm": list(slice_.spacing_mm),
        "source_orientation": slice_.geometry.source_orientation,
        "oblique_resampled": volume.is_oblique,
    }


def _inference_section(predictor: Predictor, result: Any) -> dict:
    return predictor.provenance() | {
        "device": result.device,
        "tta": result.tta,
        "folds": list(result.folds),
        "timings_s": result.timings,
    }


def _qc_section(result: Any) -> dict | None:
    qc = getattr(result, "qc", None)
    return None if qc is None else qc.to_dict()


def _cohort_row(case_id: str, volume: Volume, slice_: AxialSlice, metrics: MuscleMetrics,
                qc: dict | None, localization: dict | None) -> dict:
    qc_review = bool(qc and qc.get("review_recommended"))
    l3_review = bool(localization and localization.get("needs_review"))
    return {
        "case_id": case_id,
        "source": volume.source,
        "slice_index": slice_.index,
        "z_mm": round(slice_.z_mm, 3),
        **metrics.row(),
        "qc_score": None if qc is None else qc.get("score"),
        "l3_confidence": None if localization is None else localization.get("confidence"),
        "review_recommended": qc_review or l3_review,
    }


def _overlay_title(case_id: str, slice_: AxialSlice, inference: dict | None) -> str:
    title = f"{case_id}  slice {slice_.index}  z = {slice_.z_mm:.1f} mm"
    label = (inference or {}).get("model_label")
    return f"{title}\n{label}" if label else title
