"""Headless MRML logic of the L3MuscleSeg module: MRML nodes ↔ L3MuscleSegLib, no Qt.

* volume node → :class:`Volume` / :class:`AxialSlice`, slice index ↔ RAS z;
* canonical label array → segmentation node (Psoas, Paraspinal, Abdominal wall: coloured,
  with terminology, only the chosen slice, on the CT's grid) and back;
* protection of manual edits, the metrics table node and its automatic recompute;
* export with the library's writers, and the background inference job (a child process).

Nothing here opens a dialog: errors are :class:`L3MuscleSegError` exceptions whose message
the widget shows. It runs inside Slicer and, for tests, on a bare MRML scene built from the
slicer-core wheel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from slicer.util import arrayFromVolume, arrayFromVTKMatrix, vtkMatrixFromArray
from vtk.util.numpy_support import vtk_to_numpy

import L3MuscleSegLib
from L3MuscleSegLib import geometry
from L3MuscleSegLib.errors import CancelledError, InputError, L3MuscleSegError
from L3MuscleSegLib.geometry import (
    AxialSlice,
    Geometry,
    Volume,
    canonical_from_source_image,
    check_ct_intensities,
    slice_to_source_image,
)
from L3MuscleSegLib.labels import MUSCLE_CLASSES, MuscleClass
from L3MuscleSegLib.metrics import (
    TABLE_COLUMNS,
    MuscleMetrics,
    check_height,
    check_labels,
    compute_slice_metrics,
)

if TYPE_CHECKING:
    from L3MuscleSegLib.pipeline import CaseResult

# Importing this module needs only what Slicer bundles (numpy, SimpleITK): the module must
# load before the widget installs the other packages. Library modules that need them
# (export: matplotlib; jobs: psutil; worker, pipeline) are imported where used.

log = logging.getLogger(__name__)

# Node attributes written with each result: they survive saving and reloading the scene.
CONTENT_HASH_ATTRIBUTE = "L3MuscleSeg.ContentHash"  # segments as last written by us
SLICE_Z_ATTRIBUTE = "L3MuscleSeg.SliceZ"  # LPS (= RAS) z of the segmented slice, mm
RESULT_ATTRIBUTE = "L3MuscleSeg.Result"  # the worker's result JSON (model, QC, timings)

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")  # value, scheme, meaning
SMI_HEADER = "SMI (cm²/m²)"
_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter's representation name
_SEGMENT_EVENTS = (
    slicer.vtkSegmentation.SegmentAdded,
    slicer.vtkSegmentation.SegmentRemoved,
    slicer.vtkSegmentation.SegmentModified,
    slicer.vtkSegmentation.SourceRepresentationModified,
)


class ManualEditsError(L3MuscleSegError):
    """The segmentation holds edits that a new result would overwrite."""


# ---------------------------------------------------------------- volume node → library


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4×4 IJK→RAS matrix (parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return arrayFromVTKMatrix(matrix)


def volume_from_node(volume_node) -> Volume:
    """A copy of the CT as a :class:`Volume` (float32 [k, j, i], LPS geometry)."""
    _check_ct_node(volume_node)
    array = np.array(arrayFromVolume(volume_node), dtype=np.float32)
    check_ct_intensities(array, f"Volume '{volume_node.GetName()}'")
    height = patient_height_m(volume_node)
    return Volume(array, Geometry.from_ijk_to_ras(ijk_to_ras(volume_node)),
                  source=_source_name(volume_node),
                  metadata={} if height is None else {"patient_height_m": height})


def _check_ct_node(volume_node) -> None:
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or \
            volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        kind = "nothing" if volume_node is None else volume_node.GetClassName()
        raise InputError(f"Select a CT volume (a scalar volume node); got {kind}.")
    if volume_node.GetImageData() is None:
        raise InputError(f"Volume '{volume_node.GetName()}' holds no image data; load the CT.")


def _source_name(volume_node) -> str:
    storage = volume_node.GetStorageNode()
    return (storage.GetFileName() if storage and storage.GetFileName() else
            volume_node.GetName())


def _slice_axis(volume_node) -> int:
    """IJK axis (0 = i, 1 = j, 2 = k) closest to superior–inferior, as geometry.py picks it."""
    axes = ijk_to_ras(volume_node)[:3, :3]
    return int(np.argmax(np.abs(axes[2]) / np.linalg.norm(axes, axis=0)))


def axial_slice_count(volume_node) -> int:
    _check_ct_node(volume_node)
    return volume_node.GetImageData().GetDimensions()[_slice_axis(volume_node)]


def slice_index_to_z_ras(volume_node, index: int) -> float:
    """RAS z (= LPS z) of the centre of slice ``index`` along the S–I array axis."""
    _check_ct_node(volume_node)
    ijk = (np.asarray(volume_node.GetImageData().GetDimensions(), dtype=float) - 1) / 2
    ijk[_slice_axis(volume_node)] = index
    return float((ijk_to_ras(volume_node) @ np.append(ijk, 1.0))[2])


def z_ras_to_slice_index(volume_node, z: float) -> int:
    """The slice index nearest to RAS z, clamped to the volume (slider ↔ slice view sync).

    Node coordinates: for a CT under a transform, map the slice offset through it first."""
    axis = _slice_axis(volume_node)
    step = ijk_to_ras(volume_node)[2, axis]
    index = round((z - slice_index_to_z_ras(volume_node, 0)) / step)
    return int(min(max(index, 0), axial_slice_count(volume_node) - 1))


def pick_slice(volume_node, index: int) -> AxialSlice:
    """Slice ``index`` along the S–I array axis; oblique volumes: the axial slice at its z."""
    volume = volume_from_node(volume_node)
    if volume.is_oblique:
        return geometry.pick_slice(volume, z_mm=slice_index_to_z_ras(volume_node, index))
    return geometry.pick_slice(volume, index=index)


def patient_height_m(volume_node, file_for_instance: Callable[[str], str] | None = None
                     ) -> float | None:
    """DICOM PatientSize (0010,1020) of the series the node was loaded from, if known.

    ``file_for_instance`` maps a SOP instance UID to its file; by default Slicer's DICOM
    database (absent headless, where this returns None unless it is given).
    """
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if file_for_instance is None and database is not None:
        file_for_instance = database.fileForInstance
    if not uids or file_for_instance is None:
        return None
    path = file_for_instance(uids[0])
    return _dicom_patient_size(path) if path else None


def _dicom_patient_size(path: str) -> float | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        text = reader.GetMetaData("0010|1020").strip() if reader.HasMetaDataKey(
            "0010|1020") else ""
        return check_height(float(text)) if text else None
    except (RuntimeError, ValueError, InputError) as err:
        log.warning("Ignoring PatientSize of '%s': %s", path, err)
        return None


# ---------------------------------------------------------------- labels → segmentation


def terminology_entry(muscle: MuscleClass) -> str:
    """The segment's "TerminologyEntry" tag in Slicer's serialized format."""
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, *ANATOMICAL_STRUCTURE,
        muscle.code_value, muscle.code_scheme, muscle.code_meaning,
        "", "", "",
        ANATOMIC_CONTEXT, "", "", "", "", "", "",
    )


def apply_result(volume_node, axial_slice: AxialSlice, labels, segmentation_node=None,
                 overwrite_edits: bool = False, result: dict | None = None):
    """Put canonical ``labels`` of ``axial_slice`` into a segmentation node and return it.

    A new node is added to the scene unless ``segmentation_node`` is given; its contents are
    then replaced, refused with :class:`ManualEditsError` if it holds manual edits (or
    segments we did not write) and ``overwrite_edits`` is False. The segments are built
    completely before the scene is touched, so an error leaves the scene as it was.
    ``result`` (the worker's result JSON) is kept on the node for the report.
    """
    labels = check_labels(labels, axial_slice.pixels.shape)
    if segmentation_node is not None and not overwrite_edits and \
            has_manual_edits(segmentation_node):
        raise ManualEditsError(
            f"Segmentation '{segmentation_node.GetName()}' has manual edits that a new result "
            "would overwrite. Confirm overwriting them, or choose a new output segmentation."
        )
    built = _segmentation_from_labels(volume_node, axial_slice, labels)
    if segmentation_node is None:
        scene = volume_node.GetScene()
        built.SetName(scene.GenerateUniqueName(f"{volume_node.GetName()} L3 muscle"))
        segmentation_node = scene.AddNode(built)
        segmentation_node.CreateDefaultDisplayNodes()
        place_beside(segmentation_node, volume_node)
    else:
        segmentation_node.GetSegmentation().DeepCopy(built.GetSegmentation())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    _remember_result(segmentation_node, axial_slice, result)
    return segmentation_node


def place_beside(node, volume_node) -> None:
    """Put ``node`` in the CT's patient/study folder of the subject hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    volume_item = hierarchy.GetItemByDataNode(volume_node) if hierarchy else 0
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # headless: no subject hierarchy plugin creates items for new nodes
        hierarchy.CreateItem(parent, node)


def _segmentation_from_labels(volume_node, axial_slice: AxialSlice, labels: np.ndarray):
    """A segmentation node outside the scene: one shared labelmap, one segment per class."""
    node = slicer.vtkMRMLSegmentationNode()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    one_slice = slice_to_source_image(axial_slice, labels)
    matrix, start = _placement(Geometry.of(one_slice).ijk_to_ras(), ijk_to_ras(volume_node))
    shared = _oriented_image(sitk.GetArrayViewFromImage(one_slice), matrix, start)
    for muscle in MUSCLE_CLASSES:
        segment = slicer.vtkSegment()
        segment.SetName(muscle.name)
        segment.SetColor(*muscle.color)
        segment.SetTerminology(terminology_entry(muscle))
        segment.SetLabelValue(muscle.value)
        segment.AddRepresentation(_LABELMAP, shared)
        node.GetSegmentation().AddSegment(segment, muscle.key)
    return node


def _placement(slice_matrix: np.ndarray, volume_matrix: np.ndarray
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(IJK→RAS, first IJK index) for the slice: on the volume's own grid when it lies on it
    (every non-oblique CT), so segments and CT share voxels exactly; else its own grid."""
    start = np.linalg.solve(volume_matrix, slice_matrix[:, 3])[:3]
    on_grid = (np.allclose(slice_matrix[:3, :3], volume_matrix[:3, :3], atol=1e-6)
               and np.allclose(start, np.round(start), atol=1e-3))
    if not on_grid:
        return slice_matrix, (0, 0, 0)
    return volume_matrix, tuple(int(v) for v in np.round(start))


def _oriented_image(array_kji: np.ndarray, matrix: np.ndarray, start: Sequence[int]):
    image = slicer.vtkOrientedImageData()
    stop = np.asarray(start) + np.asarray(array_kji.shape[::-1]) - 1
    image.SetExtent(start[0], stop[0], start[1], stop[1], start[2], stop[2])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ravel(array_kji)
    image.SetImageToWorldMatrix(vtkMatrixFromArray(matrix))
    return image


def _remember_result(segmentation_node, axial_slice: AxialSlice, result: dict | None) -> None:
    segmentation_node.SetAttribute(SLICE_Z_ATTRIBUTE, repr(axial_slice.z_mm))
    if result is None:
        segmentation_node.RemoveAttribute(RESULT_ATTRIBUTE)
    else:
        segmentation_node.SetAttribute(RESULT_ATTRIBUTE, json.dumps(result))
    segmentation_node.SetAttribute(CONTENT_HASH_ATTRIBUTE, content_hash(segmentation_node))


def stored_result(segmentation_node) -> dict | None:
    """The worker's result JSON stored with the segmentation (model, QC, timings), if any."""
    text = segmentation_node.GetAttribute(RESULT_ATTRIBUTE)
    return json.loads(text) if text else None


def qc_message(summary: dict | None) -> str:
    """One line on the ensemble's fold agreement, flagged when review is recommended."""
    qc = (summary or {}).get("qc")
    if not qc or qc.get("score") is None:
        return f"QC: not available ({(qc or {}).get('reason') or 'no ensemble result'})."
    flag = " — review recommended" if qc.get("review_recommended") else ""
    return f"QC (fold agreement): {qc['score']:.3f}{flag}"


def slice_of_segmentation(segmentation_node, volume_node) -> AxialSlice:
    """The CT slice a result was written for (e.g. after reloading a saved scene)."""
    z = segmentation_node.GetAttribute(SLICE_Z_ATTRIBUTE)
    if z is None:
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' was not made by L3MuscleSeg, so "
            "its slice is unknown; pick the slice in the slider."
        )
    return geometry.pick_slice(volume_from_node(volume_node), z_mm=float(z))


# ---------------------------------------------------------------- manual-edit protection


def content_hash(segmentation_node) -> str:
    """A digest of every segment's voxels by world position.

    Independent of storage details (shared or separate layers, padded extents), so only a
    real change of the segments (painting, erasing, adding or removing one) changes it.
    """
    digest = hashlib.sha256()
    for segment_id in segmentation_node.GetSegmentation().GetSegmentIDs():
        digest.update(segment_id.encode() + b"\0")
        voxels = _segment_voxels(segmentation_node, segment_id)
        if voxels is not None:
            crop, matrix = voxels
            digest.update(np.round(matrix, 3).tobytes() + np.asarray(crop.shape).tobytes())
            digest.update(np.packbits(crop).tobytes())
    return digest.hexdigest()


def has_manual_edits(segmentation_node) -> bool:
    """True when the segments differ from what L3MuscleSeg last wrote into this node
    (or, for a segmentation L3MuscleSeg never wrote, when it has any segment)."""
    stored = segmentation_node.GetAttribute(CONTENT_HASH_ATTRIBUTE)
    if stored is None:
        return segmentation_node.GetSegmentation().GetNumberOfSegments() > 0
    return stored != content_hash(segmentation_node)


# ---------------------------------------------------------------- segmentation → labels


def labels_from_segmentation(segmentation_node, volume_node, axial_slice: AxialSlice
                             ) -> np.ndarray:
    """Canonical labels (uint8 0–3) of ``axial_slice`` from the Psoas, Paraspinal and
    Abdominal wall segments, matched by position. Where segments overlap, the later class
    in the class table wins; a missing segment counts as empty."""
    _check_same_transform(segmentation_node, volume_node)
    labels = np.zeros(axial_slice.pixels.shape, np.uint8)
    for muscle, segment_id in _class_segments(segmentation_node).items():
        voxels = _segment_voxels(segmentation_node, segment_id)
        if voxels is not None:
            crop, matrix = voxels
            image = Geometry.from_ijk_to_ras(matrix).apply_to(
                sitk.GetImageFromArray(crop.astype(np.uint8)))
            labels[canonical_from_source_image(axial_slice, image) > 0] = muscle.value
    return labels


def reference_labels(reference_node, volume_node, axial_slice: AxialSlice) -> np.ndarray:
    """Canonical reference labels from a segmentation node or a label map volume node."""
    if reference_node.IsA("vtkMRMLSegmentationNode"):
        return labels_from_segmentation(reference_node, volume_node, axial_slice)
    if not reference_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(
            f"Reference '{reference_node.GetName()}' is a {reference_node.GetClassName()}; "
            "use a segmentation or a label map volume."
        )
    stored = check_labels(arrayFromVolume(reference_node),
                          what=f"Reference label map '{reference_node.GetName()}'")
    image = Geometry.from_ijk_to_ras(ijk_to_ras(reference_node)).apply_to(
        sitk.GetImageFromArray(stored))
    return canonical_from_source_image(axial_slice, image)


def _check_same_transform(segmentation_node, volume_node) -> None:
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' and CT '{volume_node.GetName()}' "
            "are under different transforms; put them under the same one (or harden both)."
        )


def _class_segments(segmentation_node) -> dict[MuscleClass, str]:
    """Segment ID of each class present: by our ID, else by name, else by terminology."""
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    found = {}
    for muscle in MUSCLE_CLASSES:
        matches = [i for i in ids if i == muscle.key] or [
            i for i in ids if segmentation.GetSegment(i).GetName().strip().lower()
            in (muscle.name.lower(), muscle.key)
        ] or [i for i in ids if _terminology_code(segmentation.GetSegment(i)) ==
              muscle.code_value]
        if matches:
            found[muscle] = matches[0]
    if not found:
        names = ", ".join(segmentation.GetSegment(i).GetName() for i in ids) or "none"
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' has no "
            f"{', '.join(m.name for m in MUSCLE_CLASSES)} segment (its segments: {names}). "
            "Name the segments after these classes."
        )
    return found


def _terminology_code(segment) -> str | None:
    entry = slicer.vtkSlicerTerminologyEntry()
    text = segment.GetTerminology()
    if not text or not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            text, entry):
        return None
    return entry.GetTypeObject().GetCodeValue()


def _segment_voxels(segmentation_node, segment_id: str
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """The segment's voxels cropped to their bounding box (bool [k, j, i]) and the IJK→RAS
    matrix of that crop; None for an empty segment."""
    segmentation_node.CreateBinaryLabelmapRepresentation()
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if image is None or image.IsEmpty():
        return None
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    mask = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        image.GetDimensions()[::-1]) == label
    where = np.nonzero(mask)
    if not where[0].size:
        return None
    lower = [int(w.min()) for w in where]
    crop = mask[tuple(slice(w.min(), w.max() + 1) for w in where)]
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(image.GetExtent()[0::2]) + lower[::-1]  # (i, j, k)
    return crop, arrayFromVTKMatrix(matrix) @ shift


# ---------------------------------------------------------------- metrics table


def update_metrics_table(table_node, metrics: MuscleMetrics) -> None:
    """One row per class plus the total, with the library's table columns; Dice and
    Jaccard only with a reference, SMI (on the total row) only with a height."""
    rows = metrics.table()
    table = vtk.vtkTable()
    for key, header in TABLE_COLUMNS:
        if key in ("dice", "jaccard") and metrics.mean_dice is None:
            continue
        table.AddColumn(_table_column(header, [row[key] for row in rows]))
    if metrics.smi_cm2_m2 is not None:
        smi = [None] * len(metrics.classes) + [metrics.smi_cm2_m2]
        table.AddColumn(_table_column(SMI_HEADER, smi))
    modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetLocked(True)
    table_node.EndModify(modifying)


def _table_column(name: str, values: list):
    if all(isinstance(v, str) for v in values):
        column = vtk.vtkStringArray()
        for value in values:
            column.InsertNextValue(value)
    else:
        integral = all(isinstance(v, (int, np.integer)) for v in values)
        column = vtk.vtkIntArray() if integral else vtk.vtkDoubleArray()
        for value in values:
            column.InsertNextValue(np.nan if value is None else value)
    column.SetName(name)
    return column


def recompute_metrics(volume_node, segmentation_node, axial_slice: AxialSlice, table_node,
                      reference_node=None, height_m: float | None = None) -> MuscleMetrics:
    """Measure the segmentation on the slice and refill the table."""
    labels = labels_from_segmentation(segmentation_node, volume_node, axial_slice)
    reference = (None if reference_node is None
                 else reference_labels(reference_node, volume_node, axial_slice))
    metrics = compute_slice_metrics(axial_slice, labels, reference, height_m)
    update_metrics_table(table_node, metrics)
    return metrics


class MetricsFollower:
    """Calls ``recompute`` after each change of a segmentation's segments.

    ``schedule`` decides when: the widget passes a debounced QTimer-based scheduler so a
    brush stroke recomputes once; the default runs at once. Errors of the recompute (e.g.
    every segment deleted) go to ``on_error`` instead of the event loop.
    """

    def __init__(self, segmentation_node, recompute: Callable[[], object],
                 schedule: Callable[[Callable[[], None]], None] | None = None,
                 on_error: Callable[[L3MuscleSegError], None] | None = None):
        self.segmentation_node = segmentation_node
        self._recompute = recompute
        self._schedule = schedule or (lambda call: call())
        self._on_error = on_error or (lambda err: log.warning("Metrics not updated: %s", err))
        self._tags = [segmentation_node.AddObserver(event, self._changed)
                      for event in _SEGMENT_EVENTS]

    def _changed(self, caller, event) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute as after an edit: for changes the segment events do not cover."""
        self._schedule(self._run)

    def _run(self) -> None:
        try:
            self._recompute()
        except L3MuscleSegError as err:
            self._on_error(err)

    def stop(self) -> None:
        for tag in self._tags:
            self.segmentation_node.RemoveObserver(tag)
        self._tags = []


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportedCase:
    case: CaseResult  # the library's per-case files and cohort row
    segmentation_path: Path
    metrics_csv: Path
    cohort_csv: Path | None


def export_case(out_dir: str | Path, case_id: str, volume_node, segmentation_node,
                axial_slice: AxialSlice | None = None, *, reference_node=None,
                height_m: float | None = None, cohort_csv: str | Path | None = None,
                overwrite: bool = False, localization: dict | None = None) -> ExportedCase:
    """Write the case as the library does (``<case>-image.nii.gz``, ``-label.nii.gz``,
    ``-overlay.png``, ``-report.json``) plus ``<case>.seg.nrrd`` and ``<case>-metrics.csv``;
    append the row to ``cohort_csv`` if given. Existing files need ``overwrite``.
    ``localization`` (how the slice was chosen) goes into the report."""
    from L3MuscleSegLib.export import check_writable
    from L3MuscleSegLib.pipeline import report_path, write_case

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path, csv_path = out_dir / f"{case_id}.seg.nrrd", out_dir / f"{case_id}-metrics.csv"
    for path in (seg_path, csv_path, report_path(out_dir, case_id)):
        check_writable(path, overwrite)
    volume = volume_from_node(volume_node)
    slice_ = axial_slice or slice_of_segmentation(segmentation_node, volume_node)
    labels = labels_from_segmentation(segmentation_node, volume_node, slice_)
    reference = (None if reference_node is None
                 else reference_labels(reference_node, volume_node, slice_))
    write_segmentation_file(segmentation_node, seg_path, overwrite)
    case = write_case(volume, slice_, labels, case_id, out_dir, height_m=height_m,
                      reference=reference, overwrite=overwrite, localization=localization,
                      cohort_csv=cohort_csv, extra_outputs={"segmentation": seg_path.name},
                      **_provenance(segmentation_node))
    return ExportedCase(case, seg_path, csv_path, None if cohort_csv is None else Path(cohort_csv))


def write_segmentation_file(segmentation_node, path: str | Path, overwrite: bool = False
                            ) -> Path:
    """Save the segmentation as ``.seg.nrrd`` with Slicer's storage node, atomically."""
    from L3MuscleSegLib.export import atomic_path

    with atomic_path(path, overwrite) as temp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(temp))
        if not storage.WriteData(segmentation_node):
            raise L3MuscleSegError(f"Could not write the segmentation to '{path}'.")
    return Path(path)


def _provenance(segmentation_node) -> dict:
    """write_case's ``inference`` and ``qc`` sections from the stored worker result."""
    result = stored_result(segmentation_node)
    if result is None:
        return {"inference": None, "qc": None}
    inference = {**(result.get("model") or {}),
                 **{k: result.get(k) for k in ("device", "tta", "folds", "timings_s")},
                 "edited_after_inference": has_manual_edits(segmentation_node)}
    return {"inference": inference, "qc": result.get("qc")}


# ---------------------------------------------------------------- background inference


@dataclass(frozen=True)
class JobEvent:
    kind: str  # "progress" (done/total set) or "log"
    text: str
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class InferenceOutput:
    labels: np.ndarray  # uint8 [rows, cols], canonical
    probabilities: np.ndarray | None  # float32 [4, rows, cols]
    summary: dict  # the worker's result JSON: model, qc, device, tta, folds, timings_s


def python_interpreter() -> str:
    """Slicer's Python (PythonSlicer) when on PATH, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def worker_command(input_path: str | Path, output_path: str | Path, model: str | Path, *,
                   folds: str = "all", device: str = "auto", tta: bool = True,
                   python: str | None = None) -> list[str]:
    argv = [python or python_interpreter(), "-m", "L3MuscleSegLib.worker",
            "--input", str(input_path), "--output", str(output_path), "--model", str(model),
            "--folds", str(folds), "--device", device]
    return argv if tta else [*argv, "--no-tta"]


def worker_environment() -> dict[str, str]:
    """PYTHONPATH for the child so it imports this very L3MuscleSegLib (installed beside
    the module inside Slicer, not in site-packages)."""
    package_parent = str(Path(L3MuscleSegLib.__file__).resolve().parents[1])
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([package_parent, *existing])}


class CommandJob:
    """A command in a child process, driven from a worker thread; no MRML is touched there.

    The GUI calls :meth:`start`, then :meth:`poll` from a timer for progress and log lines,
    and reads :attr:`error` once :attr:`is_done`. :meth:`cancel` kills the child and all
    its descendants. Output lines ``L3PROGRESS <done> <total> <message>`` are progress.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 runner=None):
        self.argv = list(argv)
        self.error: L3MuscleSegError | None = None
        self._env = env
        self._runner = runner
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="L3MuscleSegJob", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, CancelledError)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (headless use); True when it has."""
        return self._done.wait(timeout)

    def poll(self) -> list[JobEvent]:
        """Progress and log events since the last call, oldest first."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _on_line(self, line: str) -> None:
        from L3MuscleSegLib.worker import parse_progress

        progress = parse_progress(line)
        if progress is None:
            self._events.put(JobEvent("log", line))
        else:
            self._events.put(JobEvent("progress", progress[2], progress[0], progress[1]))

    def _run(self) -> None:
        try:
            from L3MuscleSegLib.jobs import SubprocessRunner, run_checked

            run_checked(self._runner or SubprocessRunner(), self.argv, env=self._env,
                        on_line=self._on_line, cancel=self._cancel)
            self._finish()
        except L3MuscleSegError as err:
            self.error = err
        except Exception as err:  # noqa: BLE001 - a thread must report, not die silently
            log.exception("Background job failed")
            self.error = L3MuscleSegError(f"The background job failed unexpectedly: {err}")
        finally:
            self._cleanup()
            self._done.set()

    def _finish(self) -> None:
        """Collect the child's results (in the worker thread, after a clean exit)."""

    def _cleanup(self) -> None:
        """Remove temporary files, whatever the outcome."""


class SegmentationJob(CommandJob):
    """Inference by ``L3MuscleSegLib.worker`` in a child; :attr:`result` once done."""

    def __init__(self, argv: Sequence[str], output_path: str | Path, *,
                 expected_shape: tuple[int, int] | None = None,
                 env: dict[str, str] | None = None, runner=None,
                 workdir: tempfile.TemporaryDirectory | None = None):
        super().__init__(argv, env=env, runner=runner)
        self.output_path = Path(output_path)
        self.result: InferenceOutput | None = None
        self._expected_shape = expected_shape
        self._workdir = workdir

    @classmethod
    def for_slice(cls, axial_slice: AxialSlice, model: str | Path, *, folds: str = "all",
                  device: str = "auto", tta: bool = True, python: str | None = None,
                  runner=None) -> SegmentationJob:
        """A job running the worker on the slice's pixels, in its own temporary folder."""
        workdir = tempfile.TemporaryDirectory(prefix="L3MuscleSeg-")
        folder = Path(workdir.name)
        input_path, output_path = folder / "input.npz", folder / "output.npz"
        np.savez(input_path, pixels=axial_slice.pixels.astype(np.float32),
                 spacing_mm=np.asarray(axial_slice.spacing_mm, dtype=float))
        argv = worker_command(input_path, output_path, model, folds=folds, device=device,
                              tta=tta, python=python)
        return cls(argv, output_path, expected_shape=axial_slice.pixels.shape,
                   env=worker_environment(), runner=runner, workdir=workdir)

    def _finish(self) -> None:
        self.result = read_worker_output(self.output_path, self._expected_shape)

    def _cleanup(self) -> None:
        if self._workdir is not None:
            self._workdir.cleanup()


def read_worker_output(path: str | Path, expected_shape: tuple[int, int] | None = None
                       ) -> InferenceOutput:
    """The worker's OUT.npz, checked: labels of the slice's shape holding only 0–3."""
    path = Path(path)
    if not path.is_file():
        raise L3MuscleSegError(
            f"The inference worker ended without writing its result '{path}'; see the log."
        )
    with np.load(path, allow_pickle=False) as data:
        labels = check_labels(data["labels"], expected_shape, "The worker's labels")
        probabilities = data.get("probabilities")
        summary = json.loads(data["result_json"].item()) if "result_json" in data else {}
    return InferenceOutput(labels, probabilities, summary)


# ---------------------------------------------------------------- the logic class


class L3MuscleSegMRMLLogic:
    """The module logic without Qt; ``L3MuscleSegLogic`` in the Slicer module inherits it.

    Stateless: what must persist (our last write, the slice, the worker result) is stored
    as attributes on the segmentation node, so it survives saving the scene.
    """

    volume_from_node = staticmethod(volume_from_node)
    axial_slice_count = staticmethod(axial_slice_count)
    slice_index_to_z_ras = staticmethod(slice_index_to_z_ras)
    z_ras_to_slice_index = staticmethod(z_ras_to_slice_index)
    pick_slice = staticmethod(pick_slice)
    patient_height_m = staticmethod(patient_height_m)
    apply_result = staticmethod(apply_result)
    place_beside = staticmethod(place_beside)
    has_manual_edits = staticmethod(has_manual_edits)
    stored_result = staticmethod(stored_result)
    qc_message = staticmethod(qc_message)
    slice_of_segmentation = staticmethod(slice_of_segmentation)
    labels_from_segmentation = staticmethod(labels_from_segmentation)
    reference_labels = staticmethod(reference_labels)
    update_metrics_table = staticmethod(update_metrics_table)
    recompute_metrics = staticmethod(recompute_metrics)
    export_case = staticmethod(export_case)
    segmentation_job = staticmethod(SegmentationJob.for_slice)
