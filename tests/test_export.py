"""Exports: source geometry round trips (SimpleITK and nibabel), atomic writes, CSV, JSON, PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.export import (
    atomic_path,
    write_full_volume_label,
    write_json,
    write_metrics_csv,
    write_overlay_png,
    write_pair,
)
from L3MuscleSegLib.geometry import Geometry, Volume, pick_slice, slice_from_array
from L3MuscleSegLib.metrics import compute_slice_metrics

SPACING = (0.7, 0.9, 2.5)  # (i, j, k) mm
ORIGIN = (10.0, -20.0, 30.0)
# Direction columns are the LPS directions of the i, j, k axes.
DIRECTIONS = {
    "lps_identity": np.eye(3),
    "ras_like": np.diag([-1.0, -1.0, 1.0]),
    "reversed_slices": np.diag([1.0, 1.0, -1.0]),
    "sagittal_storage": np.array([[0.0, 1.0, 0.0],   # i → S, j → L, k → P
                                  [0.0, 0.0, 1.0],
                                  [1.0, 0.0, 0.0]]),
}
SLICE_INDEX = 1  # off-centre, so a flipped slice axis picks a different slice


def _volume(direction: np.ndarray) -> Volume:
    """6 × 7 × 5 voxels (i, j, k) of distinct integral HU: any misplaced voxel shows."""
    values = np.random.default_rng(3).permutation(np.arange(5 * 7 * 6) * 9 - 1000)
    array = values.reshape(5, 7, 6).astype(np.float32)
    return Volume(array, Geometry(SPACING, ORIGIN, tuple(direction.ravel())))


def _labels(shape: tuple[int, int]) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) * 7 % 4).astype(np.uint8)


def _source_slab(volume: Volume, index: int) -> np.ndarray:
    return np.take(volume.array, [index], axis=volume.slice_axis)


def _source_slice_origin(volume: Volume, index: int) -> np.ndarray:
    ijk = [0, 0, 0]
    ijk[2 - volume.slice_axis] = index  # array axis 0, 1, 2 is ITK axis k, j, i
    return volume.geometry.index_to_point(ijk)


def _canonical_points(slice_):
    """(row, col, LPS point) of every canonical pixel."""
    rows, cols = slice_.pixels.shape
    for r in range(rows):
        for c in range(cols):
            yield r, c, slice_.geometry.canonical.index_to_point((c, r, 0))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_pair_has_the_source_slice_geometry(tmp_path, name):
    volume = _volume(DIRECTIONS[name])
    slice_ = pick_slice(volume, index=SLICE_INDEX)
    labels = _labels(slice_.pixels.shape)
    image_path, label_path = write_pair(tmp_path, "case1", slice_, labels)
    assert (image_path.name, label_path.name) == ("case1-image.nii.gz", "case1-label.nii.gz")

    source = _source_slab(volume, SLICE_INDEX)
    origin = _source_slice_origin(volume, SLICE_INDEX)
    for path, dtype in ((image_path, np.int16), (label_path, np.uint8)):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        assert array.dtype == dtype and array.shape == source.shape
        np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), volume.geometry.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))),
                                  source)

    # nibabel: RAS affine and [i, j, k] data order, read independently of ITK.
    expected_affine = Geometry(SPACING, tuple(origin), volume.geometry.direction).ijk_to_ras()
    image_nib, label_nib = nib.load(image_path), nib.load(label_path)
    np.testing.assert_allclose(image_nib.affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(label_nib.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image_nib.dataobj).T, source)

    # Every label sits at the physical point of its canonical pixel, over the same CT voxel.
    label_image, source_image = sitk.ReadImage(str(label_path)), volume.to_sitk()
    ras_to_ijk = np.linalg.inv(label_nib.affine)
    label_data = np.asarray(label_nib.dataobj)
    for r, c, point in _canonical_points(slice_):
        point = tuple(float(v) for v in point)
        assert label_image[label_image.TransformPhysicalPointToIndex(point)] == labels[r, c]
        assert source_image[source_image.TransformPhysicalPointToIndex(point)] == \
            slice_.pixels[r, c]
        ijk = np.rint(ras_to_ijk @ [-point[0], -point[1], point[2], 1.0])[:3].astype(int)
        assert label_data[tuple(ijk)] == labels[r, c]


@pytest.mark.parametrize("name", DIRECTIONS)
def test_full_volume_label_lands_on_the_slice(tmp_path, name):
    volume = _volume(DIRECTIONS[name])
    slice_ = pick_slice(volume, index=SLICE_INDEX)
    labels = _labels(slice_.pixels.shape)
    path = write_full_volume_label(tmp_path / "volume-label.nii.gz", volume, slice_, labels)

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == np.uint8 and array.shape == volume.array.shape
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), volume.geometry.direction, atol=1e-6)
    assert not np.delete(array, SLICE_INDEX, axis=volume.slice_axis).any()
    for r, c, point in _canonical_points(slice_):
        assert image[image.TransformPhysicalPointToIndex(tuple(map(float, point)))] == \
            labels[r, c]


def test_full_volume_label_refuses_a_slice_of_another_volume(tmp_path):
    volume = _volume(np.eye(3))
    elsewhere = slice_from_array(np.zeros((7, 6)), (0.9, 0.7), z_mm=500.0)
    with pytest.raises(InputError, match="does not lie inside"):
        write_full_volume_label(tmp_path / "v.nii.gz", volume, elsewhere,
                                np.ones((7, 6), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_non_integral_hu_is_stored_as_float32(tmp_path):
    slice_ = slice_from_array(np.array([[-1000.5, 0.0], [40.25, 400.0]]), (0.8, 0.8))
    image_path, _ = write_pair(tmp_path, "f", slice_, np.zeros((2, 2), np.uint8))
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array[0], slice_.pixels)


@pytest.mark.parametrize("case_id", ["", "  ", "a/b", "..", "a\\b"])
def test_bad_case_id_is_named(tmp_path, case_id):
    slice_ = slice_from_array(np.zeros((2, 2)), (1.0, 1.0))
    with pytest.raises(InputError, match="Case id"):
        write_pair(tmp_path, case_id, slice_, np.zeros((2, 2), np.uint8))


def test_pair_refuses_to_overwrite_and_writes_neither_file(tmp_path):
    slice_ = slice_from_array(np.zeros((2, 2)), (1.0, 1.0))
    labels = np.zeros((2, 2), np.uint8)
    (tmp_path / "c-label.nii.gz").write_text("keep me")
    with pytest.raises(InputError, match=r"c-label\.nii\.gz' already exists.*overwrite=True"):
        write_pair(tmp_path, "c", slice_, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-label.nii.gz"]
    assert (tmp_path / "c-label.nii.gz").read_text() == "keep me"
    write_pair(tmp_path, "c", slice_, labels, overwrite=True)
    assert nib.load(tmp_path / "c-label.nii.gz").shape == (2, 2, 1)


def test_atomic_path_keeps_the_nii_gz_suffix_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.nii.gz"
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path and temp.name.endswith(".nii.gz")
        sitk.WriteImage(sitk.Image(3, 2, sitk.sitkUInt8), str(temp))
    assert isinstance(nib.load(target), nib.Nifti1Image)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]

    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), \
            atomic_path(target, overwrite=True) as temp:
        temp.write_bytes(b"half a file")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    assert target.read_bytes() == before


def test_atomic_path_needs_an_existing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"), atomic_path(tmp_path / "no" / "x"):
        pass


def test_json_converts_numpy_nan_and_paths(tmp_path):
    slice_ = slice_from_array(np.zeros((2, 2)), (1.0, 1.0))
    metrics = compute_slice_metrics(slice_, np.zeros((2, 2), np.uint8))
    obj = {"n": np.int64(3), "x": np.float32(0.5), "nan": float("nan"), "inf": np.inf,
           "a": np.arange(3), "p": Path("a/b"), 4: (1, 2), "m": metrics}
    path = write_json(tmp_path / "r.json", obj)
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back["n"] == 3 and back["x"] == 0.5 and back["nan"] is None and back["inf"] is None
    assert back["a"] == [0, 1, 2] and back["p"] == "a/b" and back["4"] == [1, 2]
    assert back["m"]["total"]["pixels"] == 0 and back["m"]["total"]["mean_hu"] is None
    with pytest.raises(InputError, match="overwrite=True"):
        write_json(path, {})


def test_json_failing_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(tmp_path / "r.json", {"first": list(range(1000)), "bad": object()})
    assert list(tmp_path.iterdir()) == []


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_csv_append_with_matching_columns(tmp_path):
    path = tmp_path / "m.csv"
    write_metrics_csv(path, [{"case_id": "a", "area_cm2": 12.5, "dice": None}])
    write_metrics_csv(path, [{"dice": np.float64(0.9), "case_id": "b", "area_cm2": math.nan},
                             {"case_id": "c", "area_cm2": np.int64(3), "dice": 1.0}],
                      append=True)
    assert _read_csv(path) == [["case_id", "area_cm2", "dice"], ["a", "12.5", ""],
                               ["b", "", "0.9"], ["c", "3", "1.0"]]


def test_csv_append_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    write_metrics_csv(path, [{"case_id": "a", "area_cm2": 1.0}])
    with pytest.raises(InputError, match=r"missing in the new rows: \['area_cm2'\].*"
                                         r"not in the file: \['psoas_area_cm2'\]"):
        write_metrics_csv(path, [{"case_id": "b", "psoas_area_cm2": 2.0}], append=True)
    assert _read_csv(path) == [["case_id", "area_cm2"], ["a", "1.0"]]
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]


def test_csv_without_append_refuses_an_existing_file(tmp_path):
    path = tmp_path / "m.csv"
    write_metrics_csv(path, [{"case_id": "a"}])
    with pytest.raises(InputError, match="append=True.*overwrite=True"):
        write_metrics_csv(path, [{"case_id": "b"}])
    write_metrics_csv(path, [{"case_id": "b"}], overwrite=True)
    assert _read_csv(path) == [["case_id"], ["b"]]
    with pytest.raises(InputError, match="same columns"):
        write_metrics_csv(tmp_path / "n.csv", [{"a": 1}, {"b": 2}])


def _phantom_slice(spacing):
    rows, cols = 60, 80
    y, x = np.mgrid[:rows, :cols]
    body = ((y - 30) / 25) ** 2 + ((x - 40) / 35) ** 2 < 1
    pixels = np.where(body, 40.0, -1000.0)
    labels = np.zeros((rows, cols), np.uint8)
    labels[35:45, 25:35], labels[45:55, 35:45], labels[10:15, 20:60] = 1, 2, 3
    return slice_from_array(pixels, spacing), labels


def test_overlay_png_is_a_valid_image_shaped_by_spacing(tmp_path):
    square, labels = _phantom_slice((0.8, 0.8))
    metrics = compute_slice_metrics(square, labels)
    path = write_overlay_png(tmp_path / "o.png", square, labels, "case 1", metrics)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = matplotlib.image.imread(path)
    assert picture.shape[1] == 600 and 300 < picture.shape[0] < 800
    assert picture[..., :3].std() > 0.1  # not blank
    tall, _ = _phantom_slice((1.6, 0.8))  # rows twice as long: the picture gets taller
    tall_picture = matplotlib.image.imread(write_overlay_png(tmp_path / "t.png", tall, labels,
                                                             "tall"))
    assert tall_picture.shape[0] > 1.5 * picture.shape[0]
    with pytest.raises(InputError, match="already exists"):
        write_overlay_png(path, square, labels, "again")
