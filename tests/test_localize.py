"""Automatic L3 localisation: seeded spine phantoms with known levels, and the real CT sample.

Truth for the phantoms comes from their height tables (see spine_phantom's docstring), so
every expected value can be checked by hand. A wrong level is about 38 mm off; the
tolerance below is a fraction of one vertebral body.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib import cli, geometry
from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.geometry import Geometry, Volume
from L3MuscleSegLib.localize import (
    HIGH,
    LOW,
    MEDIUM,
    Localization,
    _best_chain,
    format_report,
    l3_z_from_totalseg,
    localize_l3,
    totalsegmentator_available,
    with_override,
    with_second_opinion,
    write_preview,
)
from L3MuscleSegLib.spine_phantom import (
    HU_CANCELLOUS,
    HU_DISC,
    SpinePhantom,
    SpinePhantomSpec,
    spine_phantom,
)

L3_TOLERANCE_MM = 4.0
DISC_TOLERANCE_MM = 6.0
ONE_LEVEL_MM = 30.0  # shorter than any lumbar vertebra plus disc of the phantom
TOTALSEG_NAMES = {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1", 32: "T12",
                  33: "T11"}


@lru_cache
def phantom(**spec) -> SpinePhantom:
    return spine_phantom(SpinePhantomSpec(**spec))


@lru_cache
def located(**spec) -> Localization:
    return localize_l3(phantom(**spec).volume)


def anchor(loc: Localization, name: str):
    return next(a for a in loc.anchors if a.name == name)


def voxel_mean(volume: Volume, x: float, y: float, z: float) -> float:
    """Mean HU of the 3 × 3 in-plane patch nearest an LPS point (phantoms are axial LPS)."""
    g = volume.geometry
    i, j, k = (int(round((p - o) / s)) for p, o, s in zip((x, y, z), g.origin, g.spacing,
                                                           strict=True))
    return float(volume.array[k, j - 1 : j + 2, i - 1 : i + 2].mean())


# ---------------------------------------------------------------- the phantom itself


def test_phantom_truth_follows_the_height_table():
    ph = phantom()
    assert list(ph.discs) == ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1",
                              "T11/T12", "T10/T11", "T9/T10", "T8/T9"]
    # L3 body 28 mm plus half of each 10 mm disc = 38 mm of arc; tilt near L3 is under 8°.
    span = ph.discs["L2/L3"] - ph.discs["L3/L4"]
    assert 38.0 * np.cos(np.radians(8)) <= span <= 38.0
    # The centreline is placed with the L3 body centre at z = 0; both discs are 10 mm.
    assert abs(ph.l3_z_mm) < 0.5
    assert ph.levels["L3"] == (ph.discs["L3/L4"], ph.discs["L2/L3"])


def test_phantom_draws_bone_and_disc_hu():
    volume = phantom(noise_hu=0.0).volume
    assert voxel_mean(volume, 0.0, 30.0, 0.0) == pytest.approx(HU_CANCELLOUS, abs=5)
    disc_z = phantom(noise_hu=0.0).discs["L3/L4"]
    assert voxel_mean(volume, 0.0, 30.0, disc_z) == pytest.approx(HU_DISC, abs=5)


def test_phantom_is_seeded():
    a, b = spine_phantom(SpinePhantomSpec(seed=1)), spine_phantom(SpinePhantomSpec(seed=1))
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert not np.array_equal(a.volume.array, phantom(seed=2).volume.array)


@pytest.mark.parametrize(("spec", "lowest_disc"), [
    ({"n_lumbar": 4}, "L4/S1"), ({"n_lumbar": 6}, "L6/S1"), ({"sacralised": True}, "L5/S1"),
])
def test_phantom_variants_change_the_level_table(spec, lowest_disc):
    discs = list(phantom(**spec).discs)
    assert discs[0] == lowest_disc
    assert discs.index("T12/L1") == spec.get("n_lumbar", 5)


# ---------------------------------------------------------------- the disc chain


def test_disc_chain_keeps_a_faint_disc_that_the_spacing_demands():
    # Discs every 35 mm; the one at 80 is faint, a mid-body dip at 62 is strong. A
    # threshold would keep 62 and drop 80; 45 → 62 is too short a vertebra.
    arcs = np.array([10.0, 45.0, 62.0, 80.0, 115.0])
    weights = np.array([1.0, 1.0, 0.9, 0.2, 1.0])
    assert _best_chain(arcs, weights, lo=0.0, hi=125.0) == [0, 1, 3, 4]


def test_disc_chain_prefers_neighbours_of_similar_height():
    # 92 is the stronger dip, but a 22 mm vertebra after three of 35 mm is implausible.
    arcs = np.array([0.0, 35.0, 70.0, 92.0, 105.0])
    weights = np.array([1.0, 1.0, 1.0, 1.0, 0.5])
    assert _best_chain(arcs, weights, lo=0.0, hi=110.0) == [0, 1, 2, 4]


# ---------------------------------------------------------------- localisation, phantoms


def test_normal_spine_is_found_with_high_confidence():
    ph, loc = phantom(), located()
    assert loc.confidence == HIGH and not loc.needs_review
    assert loc.l3_z_mm == pytest.approx(ph.l3_z_mm, abs=L3_TOLERANCE_MM)
    assert loc.n_lumbar == 5
    assert all(a.found for a in loc.anchors)
    named = {d.name: d.z_mm for d in loc.discs}
    for name in ("L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"):
        assert named[name] == pytest.approx(ph.discs[name], abs=DISC_TOLERANCE_MM)
    l3 = loc.level("L3")
    assert l3.complete and l3.z_min_mm < ph.l3_z_mm < l3.z_max_mm


@pytest.mark.parametrize("spec", [
    {"slice_mm": 1.0}, {"slice_mm": 5.0}, {"scoliosis_mm": 30.0},
    {"scoliosis_mm": -35.0, "slice_mm": 5.0}, {"noise_hu": 30.0, "seed": 3},
])
def test_variants_with_both_anchors_are_high(spec):
    loc = located(**spec)
    assert loc.confidence == HIGH
    assert loc.l3_z_mm == pytest.approx(phantom(**spec).l3_z_mm, abs=L3_TOLERANCE_MM)


@pytest.mark.parametrize(("spec", "missing"), [
    ({"fov_top": "L1"}, "rib"),  # cropped above T12: counted up from the sacrum
    ({"fov_bottom": "L5"}, "sacrum"),  # cropped below L5: counted down from T12
])
def test_one_anchor_in_view_is_medium(spec, missing):
    loc = located(**spec)
    assert loc.confidence == MEDIUM and not loc.needs_review
    assert not anchor(loc, missing).found
    assert loc.l3_z_mm == pytest.approx(phantom(**spec).l3_z_mm, abs=L3_TOLERANCE_MM)


def test_hanging_rib_tips_do_not_count():
    """Cropped at mid-L1: the T11 and T12 rib shafts hang into view, their heads do not."""
    ph = phantom(fov_top="L1")
    g = ph.volume.geometry
    top_slice = ph.volume.array[-1]
    lateral = np.abs(g.origin[0] + g.spacing[0] * np.arange(top_slice.shape[1])) > 90
    assert (top_slice[:, lateral] > 300).any()  # rib shafts far out in the top slice
    assert not anchor(located(fov_top="L1"), "rib").found


@pytest.mark.parametrize("spec", [{"n_lumbar": 4}, {"n_lumbar": 6}, {"sacralised": True}])
def test_transitional_anatomy_is_low_and_flagged(spec):
    ph, loc = phantom(**spec), located(**spec)
    assert loc.confidence == LOW and loc.needs_review
    assert "disagree" in loc.reason
    # Counting down from T12 finds the anatomical L3; counting up from the sacrum is a
    # level off, which is exactly why the answer must be reviewed.
    assert anchor(loc, "rib").l3_z_mm == pytest.approx(ph.l3_z_mm, abs=L3_TOLERANCE_MM)
    assert abs(anchor(loc, "sacrum").l3_z_mm - ph.l3_z_mm) > ONE_LEVEL_MM


def test_no_bone_means_no_answer():
    ph = phantom()
    soft = Volume(np.minimum(ph.volume.array, 30.0), ph.volume.geometry)
    soft.array[0, 0, 0] = 400.0  # keep it a plausible CT for other readers
    loc = localize_l3(soft)
    assert not loc.found and loc.confidence == LOW and loc.needs_review
    assert "No vertebral column" in loc.reason


def test_a_thin_slab_is_refused_politely():
    ph = phantom()
    slab = Volume(ph.volume.array[50:51].copy(), ph.volume.geometry)
    loc = localize_l3(slab)
    assert not loc.found and loc.needs_review and "field of view spans only" in loc.reason


@pytest.mark.parametrize("code", ["RAS", "LPI", "PIR", "SLA"])
def test_any_axis_order_gives_the_same_answer(code):
    reference = located()
    volume = Volume.from_sitk(sitk.DICOMOrient(phantom().volume.to_sitk(), code))
    loc = localize_l3(volume)
    assert loc.confidence == reference.confidence
    assert loc.l3_z_mm == pytest.approx(reference.l3_z_mm, abs=0.01)
    # The index is along the source S–I array axis: exactly what pick_slice takes.
    picked = geometry.pick_slice(volume, index=loc.l3_index)
    assert picked.z_mm == pytest.approx(loc.l3_z_mm, abs=volume.geometry.spacing[0])
    assert geometry.pick_slice(volume, z_mm=loc.l3_z_mm).index == loc.l3_index


# ---------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_real_ct_l3_matches_the_reference(sample_dir):
    loc = localize_l3(geometry.read_volume(sample_dir / "example_ct.nii.gz"))
    assert loc.confidence == HIGH
    assert abs(loc.l3_index - 73) <= 3
    spine = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_dir / "spine/totalseg.nii.gz")))
    for level in loc.levels:  # the array shares the CT's grid: index along k
        values, counts = np.unique(spine[level.mid_index][spine[level.mid_index] > 0],
                                   return_counts=True)
        assert TOTALSEG_NAMES[int(values[np.argmax(counts)])] == level.name


@pytest.mark.realdata
def test_real_ct_second_opinion_from_totalsegmentator_labels(sample_dir):
    loc = localize_l3(geometry.read_volume(sample_dir / "example_ct.nii.gz"))
    labels = Volume.from_sitk(sitk.ReadImage(str(sample_dir / "spine/totalseg.nii.gz")))
    agreed = with_second_opinion(loc, l3_z_from_totalseg(labels))
    assert agreed.second_opinion.agrees and agreed.confidence == HIGH
    # A backend that called L4 "L3" is one level lower: it must cost a confidence step.
    shifted = np.where(labels.array == 29, 0, np.where(labels.array == 28, 29, labels.array))
    wrong = with_second_opinion(loc, l3_z_from_totalseg(Volume(shifted, labels.geometry)))
    assert not wrong.second_opinion.agrees and wrong.confidence == MEDIUM
    assert wrong.second_opinion.difference_mm > ONE_LEVEL_MM
    assert "disagrees" in wrong.reason


# ---------------------------------------------------------------- interfaces


def test_l3_z_from_totalseg_is_the_label_centroid():
    labels = np.zeros((5, 4, 4), np.uint8)  # [k, j, i]
    labels[1, 2, 3] = labels[3, 0, 0] = 29
    labels[4, 1, 1] = 28
    flipped = Geometry((2.0, 2.0, 3.0), (10.0, 20.0, 30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert l3_z_from_totalseg(Volume(labels, flipped)) == pytest.approx(30 + 3 * (1 + 3) / 2)
    assert l3_z_from_totalseg(Volume(np.zeros_like(labels), flipped)) is None


def test_second_opinion_lowers_confidence_one_step_only_on_disagreement():
    base = Localization(40, 100.0, MEDIUM, "Counted up from the sacrum only.")
    assert with_second_opinion(base, 108.0).confidence == MEDIUM
    assert with_second_opinion(base, 65.0).confidence == LOW
    assert with_second_opinion(replace_confidence(base, LOW), 65.0).confidence == LOW
    missing = with_second_opinion(base, None)
    assert missing.confidence == MEDIUM and "found no L3" in missing.reason


def replace_confidence(loc: Localization, confidence: str) -> Localization:
    return Localization(loc.l3_index, loc.l3_z_mm, confidence, loc.reason)


def test_manual_override_is_recorded():
    ph, loc = phantom(), located()
    volume = ph.volume
    l4_mid = loc.level("L4").mid_index
    chosen = with_override(loc, volume, index=l4_mid)
    assert chosen.chosen_index == l4_mid and chosen.override.level == "L4"
    assert chosen.override.offset_mm == pytest.approx(
        volume.geometry.origin[2] + l4_mid * volume.geometry.spacing[2] - loc.l3_z_mm)
    assert loc.override is None  # frozen: the automatic answer is untouched
    with pytest.raises(InputError, match="exactly one"):
        with_override(loc, volume)
    with pytest.raises(InputError, match="out of range"):
        with_override(loc, volume, index=volume.n_axial_slices)


def test_report_dict_is_json_ready():
    data = json.loads(json.dumps(located().to_dict()))
    assert data["confidence"] == HIGH and data["needs_review"] is False
    assert [lv["name"] for lv in data["levels"]][:6] == ["S1", "L5", "L4", "L3", "L2", "L1"]
    assert "centreline_lps" not in data
    assert {a["name"] for a in data["anchors"]} == {"sacrum", "rib"}


def test_text_report_lists_levels_and_confidence():
    text = format_report(located(n_lumbar=4))
    assert "L3 mid-vertebral slice" in text and "Confidence: LOW" in text
    assert text.splitlines()[0].startswith("level")


def test_preview_is_written_once(tmp_path):
    path = write_preview(phantom().volume, located(), tmp_path / "preview.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="already exists"):
        write_preview(phantom().volume, located(), path)


# ---------------------------------------------------------------- command line


def write_ct(tmp_path, **spec):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom(**spec).volume.to_sitk(), str(path))
    return path


def test_locate_command_prints_levels_and_writes_outputs(tmp_path, capsys):
    ct = write_ct(tmp_path)
    png, report = tmp_path / "p.png", tmp_path / "l3.json"
    assert cli.main(["locate", str(ct), "--preview", str(png), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "L3 mid-vertebral slice" in out and "Confidence: HIGH" in out
    assert png.exists() and json.loads(report.read_text())["confidence"] == HIGH


def test_locate_command_fails_on_a_low_answer(tmp_path, capsys):
    ct = write_ct(tmp_path, sacralised=True)
    assert cli.main(["locate", str(ct), "--no-preview"]) == 1
    assert "REVIEW" in capsys.readouterr().err


@pytest.mark.skipif(totalsegmentator_available(), reason="TotalSegmentator is installed")
def test_locate_command_explains_a_missing_totalsegmentator(tmp_path, capsys):
    ct = write_ct(tmp_path)
    assert cli.main(["locate", str(ct), "--no-preview", "--totalsegmentator"]) == 1
    assert "TotalSegmentator" in capsys.readouterr().err
