"""Geometry: the same anatomical slice whatever the file's axis order, exact mapping back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.geometry import (
    Geometry,
    Volume,
    canonical_from_source_image,
    pick_slice,
    read_slice,
    read_volume,
    require_volume,
    slice_from_array,
    slice_to_source_image,
)

# Reference volume on an LPS grid: i → L, j → P, k → S. Values encode (i, j, k).
NI, NJ, NK = 6, 5, 4
SPACING = (0.8, 0.7, 3.0)
ORIGIN = (-10.0, 20.0, 100.0)


def _reference_array() -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(NK), np.arange(NJ), np.arange(NI), indexing="ij")
    return (-1000 + 500 * k + 10 * j + i).astype(np.float32)


def reference_volume() -> Volume:
    return Volume(_reference_array(), Geometry(SPACING, ORIGIN, tuple(np.eye(3).ravel())))


def reoriented(code: str) -> Volume:
    """The reference volume's voxels stored in another axis order (no resampling)."""
    image = sitk.DICOMOrient(reference_volume().to_sitk(), code)
    return Volume.from_sitk(image)


ORIENTATIONS = ["LPS", "RAS", "LPI", "RAI", "SLP", "PSR", "ALS"]


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_same_anatomical_slice_by_z_whatever_the_axis_order(code):
    z = ORIGIN[2] + 2 * SPACING[2]
    expected = _reference_array()[2]  # rows j (A→P), cols i (R→L) in the LPS reference
    got = pick_slice(reoriented(code), z_mm=z)
    np.testing.assert_array_equal(got.pixels, expected)
    assert got.spacing_mm == pytest.approx((SPACING[1], SPACING[0]))
    assert got.z_mm == pytest.approx(z)


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_index_counts_along_the_source_superior_inferior_axis(code):
    volume = reoriented(code)
    axis = volume.slice_axis
    runs_down = volume.geometry.matrix[2, 2 - axis] < 0
    for k in range(NK):
        source_index = NK - 1 - k if runs_down else k
        got = pick_slice(volume, index=source_index)
        np.testing.assert_array_equal(got.pixels, _reference_array()[k])
        assert got.index == source_index


def test_canonical_orientation_is_anterior_up_patient_right_on_screen_left():
    s = pick_slice(reoriented("RAS"), index=0)
    # Top-left pixel is the most anterior, most patient-right voxel: i = 0, j = 0.
    assert s.pixels[0, 0] == -1000
    assert s.pixels[0, -1] == -1000 + (NI - 1)  # patient left on screen right
    assert s.pixels[-1, 0] == -1000 + 10 * (NJ - 1)  # posterior at the bottom


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_slice_maps_back_onto_the_source_grid_exactly(code):
    volume = reoriented(code)
    source = volume.to_sitk()
    s = pick_slice(volume, z_mm=ORIGIN[2] + SPACING[2])
    back = slice_to_source_image(s, s.pixels)
    assert back.GetDirection() == pytest.approx(source.GetDirection())
    assert back.GetSpacing() == pytest.approx(source.GetSpacing())
    # Every voxel of the one-slice image sits where the same value sits in the source.
    back_array = sitk.GetArrayFromImage(back)
    for idx in np.ndindex(*back_array.shape):
        point = back.TransformIndexToPhysicalPoint(tuple(int(v) for v in idx[::-1]))
        source_index = source.TransformPhysicalPointToIndex(point)
        assert back_array[idx] == source[source_index]


def test_labels_resampled_by_physical_position_not_array_index():
    volume = reoriented("RAI")
    s = pick_slice(volume, index=1)
    marker = np.zeros_like(s.pixels, dtype=np.uint8)
    marker[1, 4] = 3
    label_on_source_grid = slice_to_source_image(s, marker)
    np.testing.assert_array_equal(canonical_from_source_image(s, label_on_source_grid), marker)


def test_oblique_volume_is_resampled_with_a_warning(caplog):
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    volume = Volume(_reference_array(), Geometry(SPACING, ORIGIN, tuple(rot.ravel())))
    assert volume.is_oblique
    s = pick_slice(volume, z_mm=ORIGIN[2] + SPACING[2])
    assert "oblique" in caplog.text
    assert s.geometry.source_orientation == "LPS"
    with pytest.raises(InputError, match="oblique"):
        pick_slice(volume, index=1)


def test_out_of_range_index_and_z_name_the_valid_range():
    volume = reference_volume()
    with pytest.raises(InputError, match=r"index 4 is out of range.*0\.\.3"):
        pick_slice(volume, index=4)
    with pytest.raises(InputError, match=r"z = 50\.0 mm is outside"):
        pick_slice(volume, z_mm=50.0)
    with pytest.raises(InputError, match="exactly one"):
        pick_slice(volume)


def test_volume_needs_a_3d_array_and_slices_need_2d():
    with pytest.raises(InputError, match="3D array"):
        Volume(np.zeros((4, 4)), reference_volume().geometry)
    with pytest.raises(InputError, match="2D array"):
        slice_from_array(np.zeros((2, 3, 4)), (1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        slice_from_array(np.zeros((3, 4)), (0.0, 1.0))


def test_ijk_to_ras_round_trip_of_a_flipped_geometry():
    rot = np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    geometry = Geometry((0.7, 0.9, 2.5), (12.0, -3.0, 55.0), tuple(rot.ravel()))
    back = Geometry.from_ijk_to_ras(geometry.ijk_to_ras())
    assert back.spacing == pytest.approx(geometry.spacing)
    assert back.origin == pytest.approx(geometry.origin)
    assert back.direction == pytest.approx(geometry.direction)
    # RAS is LPS with x and y negated.
    point_lps = geometry.index_to_point([1, 2, 3])
    point_ras = geometry.ijk_to_ras() @ np.array([1, 2, 3, 1.0])
    assert point_ras[:3] == pytest.approx(point_lps * [-1, -1, 1])


# ---------------------------------------------------------------- files and bad input


def _write(volume: Volume, path) -> str:
    sitk.WriteImage(sitk.Cast(volume.to_sitk(), sitk.sitkInt16), str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_volume_formats_keep_geometry(tmp_path, suffix):
    volume = reoriented("RAS")
    read = read_volume(_write(volume, tmp_path / f"ct{suffix}"))
    np.testing.assert_array_equal(read.array, volume.array)
    assert read.geometry.direction == pytest.approx(volume.geometry.direction)
    assert read.geometry.origin == pytest.approx(volume.geometry.origin, abs=1e-4)


def test_read_slice_needs_a_choice_for_volumes(tmp_path):
    path = _write(reference_volume(), tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="4 axial slices.*--slice"):
        read_slice(path)
    _, s = read_slice(path, index=3)
    np.testing.assert_array_equal(s.pixels, _reference_array()[3])
    one_slice = _reference_array()[:1].copy()
    one_slice[0, 0, 0] = 700  # bone, so it reads as CT
    _write(Volume(one_slice, reference_volume().geometry), tmp_path / "one.nii.gz")
    _, s = read_slice(tmp_path / "one.nii.gz")
    np.testing.assert_array_equal(s.pixels, one_slice[0])


def test_require_volume_refuses_a_single_slice():
    one = Volume(_reference_array()[:1], reference_volume().geometry, "one.nii.gz")
    with pytest.raises(InputError, match="one.nii.gz has 1 axial slice"):
        require_volume(one, purpose="L3 localisation")


def test_missing_file_and_not_an_image(tmp_path):
    with pytest.raises(InputError, match="CT not found"):
        read_volume(tmp_path / "nope.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        read_volume(text)
    with pytest.raises(InputError, match="No DICOM series"):
        read_volume(tmp_path)


def test_non_ct_intensities_are_refused(tmp_path):
    mr = Volume(np.linspace(0, 1500, 80, dtype=np.float32).reshape(4, 4, 5),
                reference_volume().geometry)
    with pytest.raises(InputError, match=r"0\.\.1500.*not a CT"):
        read_volume(_write(mr, tmp_path / "mr.nii.gz"))


def test_picture_without_spacing_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8), 200, np.uint8)),
                    str(tmp_path / "shot.png"))
    with pytest.raises(InputError, match="picture file"):
        read_volume(tmp_path / "shot.png")


def test_nrrd_without_spacing_is_refused(tmp_path):
    data = np.full((2, 3, 4), -1000, np.int16)
    data[0, 0, 0] = 500
    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nencoding: raw\n" \
             b"endian: little\n\n"
    (tmp_path / "raw.nrrd").write_bytes(header + data.tobytes())
    with pytest.raises(InputError, match="without 'space directions'"):
        read_volume(tmp_path / "raw.nrrd")


# ---------------------------------------------------------------- real CT sample


@pytest.mark.realdata
def test_mid_l3_slice_of_the_real_ct(sample_dir):
    volume = read_volume(sample_dir / "example_ct.nii.gz")
    s = pick_slice(volume, index=72)
    seg = sitk.ReadImage(str(sample_dir / "spine" / "totalseg.nii.gz"))
    labels = canonical_from_source_image(s, seg)
    assert (labels == 29).sum() > 20  # the L3 vertebra is in this slice
    assert s.pixels.shape == (101, 122)
    # Canonical orientation: the vertebra is in the posterior (lower) half, centred.
    rows, cols = np.nonzero(labels == 29)
    assert rows.mean() > s.pixels.shape[0] / 2
    assert abs(cols.mean() - s.pixels.shape[1] / 2) < 15
    assert s.z_mm == pytest.approx(94.3017578125 + 72 * 3.0)


@pytest.mark.realdata
def test_dicom_series_and_its_nifti_labels_align_by_physical_space(sample_dir):
    volume = read_volume(sample_dir / "example_ct_dicom")
    assert volume.array.shape == (20, 512, 512)
    labels = sitk.ReadImage(str(sample_dir / "example_seg_dicom.nii.gz"))
    assert labels.GetDirection() != volume.to_sitk().GetDirection()  # other array order
    for index in (0, 10, 19):
        s = pick_slice(volume, index=index)
        aligned = canonical_from_source_image(s, labels)
        body = aligned > 0
        # Labels sit on tissue, not on air: aligned physically, not by array index.
        assert body.sum() > 1000
        assert np.median(s.pixels[body]) > -200
        assert np.median(s.pixels[~body & (s.pixels < -900)]) < -900
        # Pairing by array index instead would put the labels upside down.
        naive = sitk.GetArrayFromImage(labels)[index] > 0
        assert not np.array_equal(naive, body)


@pytest.mark.realdata
def test_single_dicom_file_is_the_same_slice_as_in_its_series(sample_dir):
    series = read_volume(sample_dir / "example_ct_dicom")
    one_file = sorted((sample_dir / "example_ct_dicom").iterdir())[7]
    volume, s = read_slice(one_file)
    assert volume.n_axial_slices == 1
    same = pick_slice(series, z_mm=s.z_mm)
    np.testing.assert_array_equal(s.pixels, same.pixels)
    assert s.z_mm == pytest.approx(same.z_mm)
    assert s.spacing_mm == pytest.approx(same.spacing_mm)
    assert s.geometry.canonical.origin == pytest.approx(same.geometry.canonical.origin)
    assert s.geometry.canonical.direction == pytest.approx(same.geometry.canonical.direction)
