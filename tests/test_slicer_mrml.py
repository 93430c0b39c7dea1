"""The headless MRML logic on a real MRML scene (slicer-core wheel): no mocks of MRML.

The CT is a seeded phantom volume stored in several axis orders (flipped, reversed slice
order, permuted axes), so every test also checks that the same anatomical slice is used and
that segments overlay the CT voxel for voxel whatever the storage order.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_harness import PendingCalls, add_volume, new_mrml_app, slicer
from slicer_harness import mrml_logic as logic

from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.geometry import Geometry, Volume
from L3MuscleSegLib.labels import MUSCLE_CLASSES
from L3MuscleSegLib.metrics import TABLE_COLUMNS, compute_metrics
from L3MuscleSegLib.phantom import make_phantom_volume
from L3MuscleSegLib.pipeline import write_case

N_SLICES = 5
MIDDLE = N_SLICES // 2
# DICOM orientation codes of the stored axis order; the phantom itself is LPS.
ORIENTATIONS = ("LPS", "RAS", "LPI", "RAI", "PLS")


@pytest.fixture(scope="module")
def phantom():
    """(LPS volume with anisotropic pixels, its labels): the middle slice is the L3 slice."""
    volume, labels = make_phantom_volume(7, n_slices=N_SLICES, size=48)
    grid = Geometry((0.8, 0.7, 3.0), volume.geometry.origin, volume.geometry.direction)
    return Volume(volume.array, grid, source="phantom"), labels


@pytest.fixture
def mrml():
    return new_mrml_app()


def stored_as(phantom, code: str) -> tuple[sitk.Image, sitk.Image]:
    """The phantom CT and labels stored in the axis order ``code`` (same physical content)."""
    volume, labels = phantom
    ct = sitk.DICOMOrient(volume.to_sitk(), code)
    label = sitk.DICOMOrient(volume.geometry.apply_to(sitk.GetImageFromArray(labels)), code)
    return ct, label


def node_from_image(image: sitk.Image, name: str = "CT", label_map: bool = False):
    return add_volume(sitk.GetArrayFromImage(image), Geometry.of(image).ijk_to_ras(), name,
                      label_map)


def middle_index(image: sitk.Image) -> int:
    """Index of the phantom's middle slice along the stored S–I axis."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))
    return MIDDLE if direction[2, axis] > 0 else N_SLICES - 1 - MIDDLE


def only_middle_slice(label: sitk.Image) -> np.ndarray:
    """The stored label array [k, j, i], zeroed outside the phantom's middle slice."""
    stored = sitk.GetArrayFromImage(label)
    slab = [slice(None)] * 3
    slab[2 - int(np.argmax(np.abs(np.reshape(label.GetDirection(), (3, 3))[2])))] = (
        middle_index(label))
    kept = np.zeros_like(stored)
    kept[tuple(slab)] = stored[tuple(slab)]
    return kept


def ct_and_slice(phantom, code: str):
    ct, label = stored_as(phantom, code)
    node = node_from_image(ct)
    return node, logic.pick_slice(node, middle_index(ct)), ct, label


# ---------------------------------------------------------------- volume node → library


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_volume_from_node_keeps_array_and_geometry(mrml, phantom, code):
    ct, _ = stored_as(phantom, code)
    volume = logic.volume_from_node(node_from_image(ct))
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(ct))
    expected = Geometry.of(ct)
    np.testing.assert_allclose(volume.geometry.spacing, expected.spacing)
    np.testing.assert_allclose(volume.geometry.origin, expected.origin, atol=1e-9)
    np.testing.assert_allclose(volume.geometry.direction, expected.direction, atol=1e-12)


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_pick_slice_gives_the_same_anatomical_slice(mrml, phantom, code):
    volume, _ = phantom
    node, slice_, ct, _ = ct_and_slice(phantom, code)
    np.testing.assert_array_equal(slice_.pixels, volume.array[MIDDLE])  # LPS is canonical
    assert slice_.spacing_mm == pytest.approx((0.7, 0.8))
    assert slice_.z_mm == pytest.approx(volume.geometry.index_to_point((0, 0, MIDDLE))[2])
    assert logic.axial_slice_count(node) == N_SLICES
    index = middle_index(ct)
    assert slice_.index == index
    assert logic.slice_index_to_z_ras(node, index) == pytest.approx(slice_.z_mm)
    assert logic.z_ras_to_slice_index(node, slice_.z_mm + 1.0) == index  # nearest
    assert logic.z_ras_to_slice_index(node, 1e6) in (0, N_SLICES - 1)  # clamped


def test_not_a_ct_is_refused(mrml, phantom):
    _, label = stored_as(phantom, "LPS")
    with pytest.raises(InputError, match="CT volume"):
        logic.volume_from_node(node_from_image(label, label_map=True))
    with pytest.raises(InputError, match="Hounsfield"):
        logic.volume_from_node(node_from_image(sitk.Cast(label, sitk.sitkInt16) * 80))


def test_patient_height_from_dicom_file(mrml, phantom, tmp_path):
    image = sitk.Image([4, 4], sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image.SetMetaData("0010|1020", "1.72")
    writer.SetFileName(str(tmp_path / "one.dcm"))
    writer.Execute(image)
    node, _, _, _ = ct_and_slice(phantom, "LPS")
    assert logic.patient_height_m(node) is None  # not from DICOM
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    files = {"1.2.3": str(tmp_path / "one.dcm")}
    assert logic.patient_height_m(node, files.get) == pytest.approx(1.72)
    assert logic.patient_height_m(node) is None  # no DICOM database headless


# ---------------------------------------------------------------- labels ↔ segmentation


def segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_labels_become_named_coloured_segments_that_overlay_the_ct(mrml, phantom, code):
    _, labels = phantom
    node, slice_, ct, label = ct_and_slice(phantom, code)
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    assert segmentation.GetScene() is mrml.scene
    assert segmentation.GetNodeReference("referenceImageGeometryRef") is node
    assert segment_ids(segmentation) == [m.key for m in MUSCLE_CLASSES]
    on_slice = only_middle_slice(label)  # the chosen slice of the stored labels
    for muscle in MUSCLE_CLASSES:
        segment = segmentation.GetSegmentation().GetSegment(muscle.key)
        assert segment.GetName() == muscle.name
        assert segment.GetColor() == pytest.approx(muscle.color)
        # voxel for voxel on the CT's grid
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, muscle.key, node)
        np.testing.assert_array_equal(mask.astype(bool), on_slice == muscle.value)
        assert mask.any()


def test_segments_carry_standard_terminology(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    for muscle in MUSCLE_CLASSES:
        text = segmentation.GetSegmentation().GetSegment(muscle.key).GetTerminology()
        assert text == (
            "Segmentation category and type - DICOM master list"
            "~SCT^123037004^Anatomical Structure"
            f"~{muscle.code_scheme}^{muscle.code_value}^{muscle.code_meaning}~^^"
            "~Anatomic codes - DICOM master list~^^~^^"
        )
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry)
        assert entry.GetTypeObject().GetCodeValue() == muscle.code_value
        assert entry.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure"


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_segmentation_back_to_labels_round_trip(mrml, phantom, code):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, code)
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    np.testing.assert_array_equal(
        logic.labels_from_segmentation(segmentation, node, slice_), labels[MIDDLE])


def test_labels_read_from_user_named_segments_and_label_maps(mrml, phantom):
    """A reference made by hand: other IDs, names in any case, separate layers."""
    _, labels = phantom
    node, slice_, _, label = ct_and_slice(phantom, "RAS")
    made = logic.apply_result(node, slice_, labels[MIDDLE])
    reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    reference.SetReferenceImageGeometryParameterFromVolumeNode(node)
    for muscle in MUSCLE_CLASSES:
        new_id = reference.GetSegmentation().AddEmptySegment("", muscle.name.upper())
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            slicer.util.arrayFromSegmentBinaryLabelmap(made, muscle.key, node), reference,
            new_id, node)
    np.testing.assert_array_equal(logic.reference_labels(reference, node, slice_),
                                  labels[MIDDLE])
    whole_label_volume = node_from_image(label, "labels", label_map=True)
    np.testing.assert_array_equal(logic.reference_labels(whole_label_volume, node, slice_),
                                  labels[MIDDLE])
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    other.GetSegmentation().AddEmptySegment("", "Liver")
    with pytest.raises(InputError, match="Liver"):
        logic.labels_from_segmentation(other, node, slice_)


def test_failed_apply_leaves_the_scene_unchanged(mrml, phantom):
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    before = mrml.scene.GetNumberOfNodes()
    bad = np.full(slice_.pixels.shape, 7, np.uint8)
    with pytest.raises(InputError, match="7"):
        logic.apply_result(node, slice_, bad)
    with pytest.raises(InputError, match="shape"):
        logic.apply_result(node, slice_, np.zeros((3, 3), np.uint8))
    assert mrml.scene.GetNumberOfNodes() == before



def test_oblique_ct_round_trip(mrml, phantom):
    """A tilted-gantry CT: the slice is resampled onto an axial grid, labels come back."""
    volume, _ = phantom
    tilt = np.radians(12)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)],
                         [0, np.sin(tilt), np.cos(tilt)]])
    tilted = Geometry(volume.geometry.spacing, volume.geometry.origin,
                      tuple(rotation.ravel()))
    node = node_from_image(Volume(volume.array, tilted).to_sitk())
    slice_ = logic.pick_slice(node, MIDDLE)
    assert abs(slice_.z_mm - logic.slice_index_to_z_ras(node, MIDDLE)) <= 1.5  # nearest
    labels = np.digitize(slice_.pixels, [-500, 0, 60]).astype(np.uint8)  # 0..3 by HU
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    segmentation = logic.apply_result(node, slice_, labels)
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  labels)


def test_result_follows_the_ct_into_transforms_and_its_study(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(),
                                                                  "patient"), "study")
    hierarchy.CreateItem(study, node)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    assert segmentation.GetTransformNodeID() == transform.GetID()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  labels[MIDDLE])
    segmentation.SetAndObserveTransformNodeID(None)
    with pytest.raises(InputError, match="different transforms"):
        logic.labels_from_segmentation(segmentation, node, slice_)


def test_result_and_slice_are_kept_on_the_node(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "RAS")
    summary = {"qc": {"score": 0.61234, "review_recommended": True}, "folds": [0, 1]}
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE], result=summary)
    assert logic.stored_result(segmentation) == summary
    assert logic.qc_message(summary) == "QC (fold agreement): 0.612 — review recommended"
    assert "review" not in logic.qc_message({"qc": {"score": 0.9,
                                                    "review_recommended": False}})
    assert "not available" in logic.qc_message(None)
    single = {"qc": {"score": None, "reason": "a single fold was used"}}
    assert logic.qc_message(single) == "QC: not available (a single fold was used)."
    again = logic.slice_of_segmentation(segmentation, node)
    np.testing.assert_array_equal(again.pixels, slice_.pixels)
    assert again.index == slice_.index

# ---------------------------------------------------------------- manual-edit protection


def erase_half(segmentation, segment_id: str, volume_node) -> np.ndarray:
    """A brush edit: clear the segment's voxels in the first half of the i axis."""
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume_node)
    mask[..., : mask.shape[2] // 2] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id,
                                                     volume_node)
    return mask


def test_rerun_protects_manual_edits(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPI")
    first = labels[MIDDLE]
    segmentation = logic.apply_result(node, slice_, first)
    assert not logic.has_manual_edits(segmentation)
    # a rerun (other model or slice) may replace an unedited result in place
    second = np.where(first == 2, 0, first).astype(np.uint8)
    assert logic.apply_result(node, slice_, second, segmentation) is segmentation
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  second)
    erase_half(segmentation, "psoas", node)
    edited = logic.labels_from_segmentation(segmentation, node, slice_)
    assert logic.has_manual_edits(segmentation)
    with pytest.raises(logic.ManualEditsError, match="manual edits"):
        logic.apply_result(node, slice_, first, segmentation)
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  edited)
    logic.apply_result(node, slice_, first, segmentation, overwrite_edits=True)
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  first)
    assert not logic.has_manual_edits(segmentation)


def test_storage_layout_changes_are_not_edits(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    segmentation.GetSegmentation().SeparateSegmentLabelmap("paraspinal")
    assert not logic.has_manual_edits(segmentation)
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    assert not logic.has_manual_edits(segmentation)
    segmentation.GetSegmentation().RemoveSegment("paraspinal")
    assert logic.has_manual_edits(segmentation)


def test_a_one_voxel_edit_inside_a_segment_counts(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "abdominal_wall", node)
    voxels = np.argwhere(mask)
    inner = voxels[len(voxels) // 2]  # not on the segment's bounding box
    assert all((inner > voxels.min(axis=0))[1:]) and all((inner < voxels.max(axis=0))[1:])
    mask[tuple(inner)] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, "abdominal_wall", node)
    assert logic.has_manual_edits(segmentation)


def test_a_segmentation_we_did_not_write_is_protected(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    users = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's")
    users.GetSegmentation().AddEmptySegment("tumour")
    with pytest.raises(logic.ManualEditsError):
        logic.apply_result(node, slice_, labels[MIDDLE], users)
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert logic.apply_result(node, slice_, labels[MIDDLE], empty) is empty


# ---------------------------------------------------------------- metrics table


def table_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() if name == "Class" else
             table.GetValue(r, c).ToDouble() for c, name in enumerate(names)}
            for r in range(table.GetNumberOfRows())]


def assert_table_matches(table_node, expected) -> None:
    rows = table_rows(table_node)
    assert [row["Class"] for row in rows] == [m.name for m in (*expected.classes,
                                                               expected.total)]
    for row, metrics in zip(rows, (*expected.classes, expected.total), strict=True):
        for key, header in TABLE_COLUMNS[1:]:
            value = getattr(metrics, key)
            if value is None:
                assert header not in row
            elif math.isnan(value):
                assert math.isnan(row[header])
            else:
                assert row[header] == pytest.approx(value, rel=1e-12)


def test_table_holds_the_library_metrics(mrml, phantom):
    volume, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "RAI")
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    expected = compute_metrics(volume.array[MIDDLE], labels[MIDDLE], (0.7, 0.8))
    logic.update_metrics_table(table, expected)
    assert table.GetNumberOfColumns() == len(TABLE_COLUMNS) - 2  # no Dice/Jaccard
    assert_table_matches(table, expected)

    reference = np.where(labels[MIDDLE] == 1, 0, labels[MIDDLE])
    with_all = compute_metrics(volume.array[MIDDLE], labels[MIDDLE], (0.7, 0.8), reference,
                               height_m=1.6)
    logic.update_metrics_table(table, with_all)
    assert_table_matches(table, with_all)
    rows = table_rows(table)
    assert rows[0]["Dice"] == 0.0 and rows[1]["Dice"] == 1.0
    assert [math.isnan(r[logic.SMI_HEADER]) for r in rows] == [True, True, True, False]
    assert rows[-1][logic.SMI_HEADER] == pytest.approx(
        with_all.total.area_cm2 / 1.6**2)


def test_table_follows_edits_of_the_segmentation(mrml, phantom):
    volume, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "PLS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    scheduler = PendingCalls()
    follower = logic.MetricsFollower(
        segmentation, lambda: logic.recompute_metrics(node, segmentation, slice_, table,
                                                      height_m=1.7), scheduler)
    assert scheduler.flush() == 0  # nothing changed yet
    erase_half(segmentation, "abdominal_wall", node)
    assert scheduler.flush() == 1  # a burst of events: one recompute
    edited = logic.labels_from_segmentation(segmentation, node, slice_)
    assert 0 < (edited == 3).sum() < (labels[MIDDLE] == 3).sum()
    assert_table_matches(table, compute_metrics(volume.array[MIDDLE], edited, (0.7, 0.8),
                                                height_m=1.7))
    follower.refresh()  # e.g. the height changed: recompute without an edit
    assert scheduler.flush() == 1
    follower.stop()
    erase_half(segmentation, "psoas", node)
    assert scheduler.flush() == 0


def test_follower_reports_errors_instead_of_raising(mrml, phantom):
    _, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    errors = []
    logic.MetricsFollower(segmentation, lambda: logic.recompute_metrics(
        node, segmentation, slice_, table), on_error=errors.append)
    segmentation.GetSegmentation().RemoveAllSegments()
    assert errors and "no Psoas" in str(errors[-1])


# ---------------------------------------------------------------- export


def source_slice(ct: sitk.Image) -> sitk.Image:
    """The stored CT's one-slice sub-image holding the phantom's middle slice."""
    axis = int(np.argmax(np.abs(np.reshape(ct.GetDirection(), (3, 3))[2])))
    size, start = list(ct.GetSize()), [0, 0, 0]
    size[axis], start[axis] = 1, middle_index(ct)
    return sitk.RegionOfInterest(ct, size, start)


def assert_same_grid(image: sitk.Image, expected: sitk.Image) -> None:
    assert image.GetSize() == expected.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("code", ("LPS", "RAI", "PLS"))
def test_export_round_trip_overlays_the_source_slice(mrml, phantom, tmp_path, code):
    volume, labels = phantom
    node, slice_, ct, label_volume = ct_and_slice(phantom, code)
    result = {"qc": {"score": 0.9, "review_recommended": False}, "model": {"label": "test"},
              "device": "cpu", "tta": False, "folds": [0], "timings_s": {}}
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE], result=result)
    exported = logic.export_case(tmp_path, "case1", node, segmentation, slice_, height_m=1.7)
    source = source_slice(ct)
    pair = (exported.case.image_path, exported.case.label_path)
    for path in pair:  # one slice on the source grid
        assert_same_grid(sitk.ReadImage(str(path)), source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(pair[0]))),
                                  sitk.GetArrayFromImage(source))
    on_canonical = sitk.DICOMOrient(sitk.ReadImage(str(pair[1])), "LPS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_canonical)[0], labels[MIDDLE])
    # .seg.nrrd as Slicer saves it: the CT's whole grid, labels on the chosen slice only
    seg_file = sitk.ReadImage(str(exported.segmentation_path))
    assert_same_grid(seg_file, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_file),
                                  only_middle_slice(label_volume))
    report = json.loads(exported.case.report_path.read_text())
    assert report["status"] == "ok" and report["qc"]["score"] == 0.9
    assert report["inference"]["label"] == "test"
    assert report["inference"]["edited_after_inference"] is False
    expected = compute_metrics(volume.array[MIDDLE], labels[MIDDLE], (0.7, 0.8), height_m=1.7)
    assert report["metrics"]["total_area_cm2"] == pytest.approx(expected.total.area_cm2)
    assert report["metrics"]["smi_cm2_m2"] == pytest.approx(expected.smi_cm2_m2)
    with open(exported.metrics_csv, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["psoas_pixels"]) == expected.classes[0].pixels


def test_export_matches_the_library_and_appends_to_a_cohort(mrml, phantom, tmp_path):
    volume, labels = phantom
    node, slice_, _, _ = ct_and_slice(phantom, "LPS")
    segmentation = logic.apply_result(node, slice_, labels[MIDDLE])
    erase_half(segmentation, "psoas", node)
    edited = logic.labels_from_segmentation(segmentation, node, slice_)
    cohort = tmp_path / "cohort.csv"
    first = logic.export_case(tmp_path / "slicer", "a", node, segmentation, slice_,
                              cohort_csv=cohort)
    logic.export_case(tmp_path / "slicer", "b", node, segmentation, cohort_csv=cohort)
    library = write_case(logic.volume_from_node(node), slice_, edited, "a", tmp_path / "lib")
    for name in ("a-image.nii.gz", "a-label.nii.gz"):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "slicer" / name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lib" / name))))
    assert first.case.row == library.row
    assert (tmp_path / "slicer" / "a-overlay.png").is_file()
    with open(cohort, newline="") as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == ["a", "b"]
    with pytest.raises(InputError, match="already exists"):
        logic.export_case(tmp_path / "slicer", "a", node, segmentation, slice_)
