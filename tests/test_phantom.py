"""The synthetic L3 phantom: deterministic, anatomically ordered, muscle HU where labelled."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from L3MuscleSegLib.geometry import pick_slice
from L3MuscleSegLib.labels import ABDOMINAL_WALL, PARASPINAL, PSOAS
from L3MuscleSegLib.phantom import make_phantom_slice, make_phantom_volume

SEEDS = (0, 1, 2, 3, 4, 5)


def _bone(phantom) -> np.ndarray:
    return ndimage.gaussian_filter(phantom.image, 1.0) > 300


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)  # (row, col)


def test_same_seed_same_slice_and_other_seed_differs():
    a, b, c = make_phantom_slice(7), make_phantom_slice(7), make_phantom_slice(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.spacing_mm == b.spacing_mm
    assert not np.array_equal(a.labels, c.labels)
    assert np.abs(a.image - c.image).mean() > 20


def test_types_shapes_and_default_spacing():
    p = make_phantom_slice(0)
    assert p.image.shape == p.labels.shape == (256, 256)
    assert p.image.dtype == np.float32 and p.labels.dtype == np.uint8
    assert p.spacing_mm[0] == p.spacing_mm[1]
    assert 350 / 256 <= p.spacing_mm[0] <= 450 / 256
    assert set(np.unique(p.labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", SEEDS)
def test_512_spacing_range_and_body_inside_the_image(seed):
    p = make_phantom_slice(seed, size=512)
    assert p.image.shape == (512, 512)
    assert 0.6 <= p.spacing_mm[0] <= 1.0
    parts, _ = ndimage.label(p.image > -500)
    body = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
    assert not (body[0].any() or body[-1].any() or body[:, 0].any() or body[:, -1].any())
    assert np.array_equal(body | (p.labels == 0), np.ones_like(body))  # labels in the body
    assert p.image.min() < -950 and p.image.max() > 700  # air and cortical bone


def test_explicit_spacing_is_used():
    assert make_phantom_slice(3, size=128, spacing_mm=3.0).spacing_mm == (3.0, 3.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_muscle_class_present_with_plausible_area(seed):
    p = make_phantom_slice(seed)
    area_cm2 = {v: np.count_nonzero(p.labels == v) * np.prod(p.spacing_mm) / 100
                for v in (1, 2, 3)}
    assert 5 < area_cm2[PSOAS.value] < 50
    assert 15 < area_cm2[PARASPINAL.value] < 90
    assert 15 < area_cm2[ABDOMINAL_WALL.value] < 120


@pytest.mark.parametrize("seed", SEEDS)
def test_psoas_pair_either_side_of_the_vertebral_body(seed):
    p = make_phantom_slice(seed)
    parts, n = ndimage.label(p.labels == PSOAS.value)
    assert n == 2
    (row_r, col_r), (row_l, col_l) = sorted(
        (_centroid(parts == k) for k in (1, 2)), key=lambda c: c[1])
    spine_col = _centroid(_bone(p))[1]
    assert col_r < spine_col < col_l
    row = int(round((row_r + row_l) / 2))
    between = _bone(p)[row - 3 : row + 4, int(col_r) : int(col_l)]
    assert between.any()  # the vertebral body lies between the two psoas


@pytest.mark.parametrize("seed", SEEDS)
def test_paraspinal_behind_and_abdominal_wall_in_front(seed):
    p = make_phantom_slice(seed)
    psoas_row = _centroid(p.labels == PSOAS.value)[0]
    paraspinal_row = _centroid(p.labels == PARASPINAL.value)[0]
    assert paraspinal_row - psoas_row > 15 / p.spacing_mm[0]  # ≥ 15 mm posterior
    wall_rows = np.argwhere(p.labels == ABDOMINAL_WALL.value)[:, 0]
    body_rows = np.argwhere(p.image > -500)[:, 0]
    assert wall_rows.min() - body_rows.min() < 50 / p.spacing_mm[0]  # under the front skin
    assert wall_rows.min() < np.argwhere(p.labels == PSOAS.value)[:, 0].min()
    # both sides of the paraspinal pair
    cols = np.argwhere(p.labels == PARASPINAL.value)[:, 1]
    spine_col = _centroid(_bone(p))[1]
    assert (cols < spine_col).any() and (cols > spine_col).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_hu_inside_muscle_labels_is_muscle(seed):
    p = make_phantom_slice(seed)
    for value in (1, 2, 3):
        hu = p.image[p.labels == value]
        assert 25 < np.median(hu) < 65
        assert np.mean((hu >= -29) & (hu <= 150)) > 0.85  # a little intermuscular fat


def test_muscles_contain_intermuscular_fat_streaks():
    fat = [np.count_nonzero(ndimage.median_filter(p.image, 3)[p.labels > 0] < -30)
           for p in (make_phantom_slice(s) for s in SEEDS)]
    assert max(fat) > 20


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_negatives_have_muscle_hu_and_label_zero(seed):
    p = make_phantom_slice(seed)
    smooth = ndimage.gaussian_filter(p.image, 1.5)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(p.image > -500, iterations=2))
    inner = ndimage.binary_erosion(body, iterations=int(8 / p.spacing_mm[0]))  # no skin
    muscle_like = inner & (smooth > 25) & (smooth < 65) & (p.labels == 0)
    blobs, n = ndimage.label(ndimage.binary_opening(muscle_like, iterations=2))
    sizes_mm2 = ndimage.sum(np.ones_like(blobs), blobs, range(1, n + 1)) * np.prod(p.spacing_mm)
    assert (sizes_mm2 > 300).sum() >= 2  # kidneys, collapsed bowel, colon, vessels


def test_ascites_adds_fluid():
    def fluid_area(phantom):
        smooth = ndimage.gaussian_filter(phantom.image, 1.5)
        return np.count_nonzero((smooth > 0) & (smooth < 22) & (phantom.labels == 0))

    for seed in SEEDS:
        dry, wet = make_phantom_slice(seed), make_phantom_slice(seed, ascites=True)
        assert np.array_equal(dry.labels, wet.labels)  # the same patient, plus fluid
        assert fluid_area(wet) > 1.3 * fluid_area(dry) + 200


def test_volume_middle_slice_is_the_phantom_and_neighbours_vary():
    volume, labels = make_phantom_volume(9, n_slices=5)
    middle = make_phantom_slice(9)
    assert volume.array.shape == labels.shape == (5, 256, 256)
    assert np.array_equal(volume.array[2], middle.image)
    assert np.array_equal(labels[2], middle.labels)
    assert not np.array_equal(labels[0], labels[2])
    assert np.mean(labels[0] == labels[2]) > 0.95  # same anatomy, slightly changed
    g = volume.geometry
    assert g.spacing == (middle.spacing_mm[1], middle.spacing_mm[0], 3.0)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    centre = g.index_to_point([127.5, 127.5, 2])
    assert np.allclose(centre[:2], 0.0)  # the image is centred on the scanner axis


def test_volume_middle_slice_reads_back_canonical_through_geometry():
    volume, _ = make_phantom_volume(10, n_slices=3, size=128)
    picked = pick_slice(volume, index=1)
    assert np.array_equal(picked.pixels, make_phantom_slice(10, size=128).image)
    assert picked.spacing_mm == make_phantom_slice(10, size=128).spacing_mm
