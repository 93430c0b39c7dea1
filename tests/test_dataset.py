"""``l3muscleseg dataset build``: validation of every error kind, layout, LPS reorientation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from L3MuscleSegLib import cli, dataset
from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.phantom import make_phantom_slice

SIZE, SPACING = 48, 8.0  # a coarse phantom: fast to write and read
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def phantom_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    p = make_phantom_slice(seed, size=SIZE, spacing_mm=SPACING)
    return p.image[None].astype(np.int16), p.labels[None]  # [k, j, i], canonical (LPS)


def lps_image(array: np.ndarray, origin=(-100.0, -120.0, -300.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((SPACING, SPACING, 3.0))
    image.SetOrigin(origin)
    return image


def write_pair(folder: Path, case_id: str, image: sitk.Image, label: sitk.Image) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{case_id}-image.nii.gz"))
    sitk.WriteImage(label, str(folder / f"{case_id}-label.nii.gz"))


def write_phantom_pair(folder: Path, case_id: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = phantom_arrays(seed)
    write_pair(folder, case_id, lps_image(image), lps_image(label))
    return image, label


def kinds(issues) -> dict[str, str]:
    return {i.case_id: i.kind for i in issues}


# ---------------------------------------------------------------- a good dataset


def test_build_writes_nnunet_layout_and_dataset_json(tmp_path):
    pairs = tmp_path / "pairs"
    arrays = {f"case{n}": write_phantom_pair(pairs, f"case{n}", n) for n in range(3)}
    report = dataset.build_dataset([pairs], 711, "L3SM", tmp_path / "raw")

    root = tmp_path / "raw" / "Dataset711_L3SM"
    assert report.ok and report.output == str(root)
    assert json.loads((root / "dataset.json").read_text()) == {
        "name": "Dataset711_L3SM",
        "description": "Axial L3 CT slices, canonical LPS grid; labels from L3MuscleSeg.",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "psoas": 1, "paraspinal": 2, "abdominal_wall": 3},
        "numTraining": 3,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
    }
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        "case0_0000.nii.gz", "case1_0000.nii.gz", "case2_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [
        "case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    for case_id, (image, label) in arrays.items():
        written = sitk.ReadImage(str(root / "labelsTr" / f"{case_id}.nii.gz"))
        assert written.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(written), label)
        assert np.array_equal(sitk.GetArrayFromImage(
            sitk.ReadImage(str(root / "imagesTr" / f"{case_id}_0000.nii.gz"))), image)
    counts = {c.case_id: c.label_pixels for c in report.cases}
    assert counts["case1"]["psoas"] == int(np.count_nonzero(arrays["case1"][1] == 1))
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset711_L3SM"]  # no temp


def flipped_to_ras(array: np.ndarray, origin) -> sitk.Image:
    """The same physical image stored with i → right and j → anterior (RAS order)."""
    k, j, i = array.shape
    image = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1, ::-1]))
    image.SetSpacing((SPACING, SPACING, 3.0))
    # The RAS file's first voxel is the LPS file's last column and last row.
    image.SetOrigin((origin[0] + (i - 1) * SPACING, origin[1] + (j - 1) * SPACING, origin[2]))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def transposed(array: np.ndarray, origin) -> sitk.Image:
    """The same physical image stored with i → posterior and j → left (axes swapped)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.swapaxes(array, 1, 2)))
    image.SetSpacing((SPACING, SPACING, 3.0))
    image.SetOrigin(origin)
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.mark.parametrize("store", [flipped_to_ras, transposed])
def test_pairs_in_any_axis_order_are_written_canonical_lps(tmp_path, store):
    image, label = phantom_arrays(4)
    origin = (-100.0, -120.0, -300.0)
    write_pair(tmp_path / "pairs", "turned", store(image, origin), store(label, origin))
    report = dataset.build_dataset([tmp_path / "pairs"], 12, "Turned", tmp_path / "raw")

    assert report.ok
    assert report.cases[0].source_orientation in ("RAS", "PLS")
    root = tmp_path / "raw" / "Dataset012_Turned"
    for path, expected in ((root / "imagesTr" / "turned_0000.nii.gz", image),
                           (root / "labelsTr" / "turned.nii.gz", label)):
        written = sitk.ReadImage(str(path))
        assert written.GetDirection() == IDENTITY
        assert np.allclose(written.GetOrigin(), origin)
        assert np.array_equal(sitk.GetArrayFromImage(written), expected)


# ---------------------------------------------------------------- every error kind


def write_broken_pairs(folder: Path, other: Path) -> None:
    image, label = phantom_arrays(1)
    write_phantom_pair(folder, "good", 2)
    sitk.WriteImage(lps_image(image), str(folder / "lonely-image.nii.gz"))
    write_phantom_pair(folder, "twice", 3)
    write_phantom_pair(other, "twice", 3)
    write_pair(folder, "badvalue", lps_image(image), lps_image(np.where(label == 2, 7, label)))
    write_pair(folder, "fractional", lps_image(image),
               lps_image(label.astype(np.float32) * 0.5))
    write_pair(folder, "empty", lps_image(image), lps_image(np.zeros_like(label)))
    picture = ((image - image.min()) / np.ptp(image) * 255).astype(np.uint8)
    write_pair(folder, "picture", lps_image(picture), lps_image(label))
    write_pair(folder, "shape", lps_image(image), lps_image(label[:, :-1, :]))
    write_pair(folder, "shifted", lps_image(image),
               lps_image(label, origin=(-100.0, -110.0, -300.0)))
    write_pair(folder, "noisy", lps_image(image),
               lps_image(label, origin=(-100.0 + 2e-4, -120.0, -300.0)))
    (folder / "garbage-image.nii.gz").write_bytes(b"not an image")
    sitk.WriteImage(lps_image(label), str(folder / "garbage-label.nii.gz"))
    sitk.WriteImage(lps_image(image), str(folder / "bad name-image.nii.gz"))
    sitk.WriteImage(lps_image(label), str(folder / "bad name-label.nii.gz"))


def test_every_broken_pair_is_reported_and_nothing_written(tmp_path):
    write_broken_pairs(tmp_path / "a", tmp_path / "b")
    report = dataset.build_dataset([tmp_path / "a", tmp_path / "b"], 711, "L3SM",
                                   tmp_path / "raw")

    assert not report.ok and report.output is None
    assert kinds(report.errors) == {
        "lonely": dataset.INCOMPLETE, "twice": dataset.DUPLICATE,
        "badvalue": dataset.LABELS, "fractional": dataset.LABELS, "empty": dataset.EMPTY,
        "picture": dataset.NOT_CT, "shape": dataset.GEOMETRY, "shifted": dataset.GEOMETRY,
        "noisy": dataset.GEOMETRY, "garbage": dataset.UNREADABLE,
        "bad name": dataset.BAD_NAME,
    }
    messages = {i.case_id: i.message for i in report.errors}
    assert "[7]" in messages["badvalue"]
    assert "--fix-geometry" in messages["noisy"]
    assert "--fix-geometry" not in messages["shifted"]
    assert [c.case_id for c in report.cases] == ["good"]
    assert not (tmp_path / "raw").exists()
    text = report.format()
    assert "Nothing was written" in text and "[duplicate] twice" in text
    checked_only = dataset.validate_pairs([tmp_path / "a", tmp_path / "b"])
    assert kinds(checked_only.errors) == kinds(report.errors)


def test_fix_geometry_copies_the_image_grid_onto_the_label(tmp_path):
    image, label = phantom_arrays(5)
    write_pair(tmp_path / "pairs", "noisy", lps_image(image),
               lps_image(label, origin=(-100.0 + 2e-4, -120.0 - 3e-4, -300.0)))
    report = dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw",
                                   fix_geometry=True)

    assert report.ok
    assert kinds(report.warnings) == {"noisy": dataset.GEOMETRY_FIXED}
    root = tmp_path / "raw" / "Dataset711_L3SM"
    written = sitk.ReadImage(str(root / "labelsTr" / "noisy.nii.gz"))
    assert written.GetOrigin() == sitk.ReadImage(
        str(root / "imagesTr" / "noisy_0000.nii.gz")).GetOrigin()
    assert np.allclose(written.GetOrigin(), (-100.0, -120.0, -300.0))


def test_fix_geometry_does_not_hide_real_misalignment(tmp_path):
    image, label = phantom_arrays(5)
    write_pair(tmp_path / "pairs", "shifted", lps_image(image),
               lps_image(label, origin=(-100.0, -120.0 + 0.01, -300.0)))
    report = dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw",
                                   fix_geometry=True)
    assert kinds(report.errors) == {"shifted": dataset.GEOMETRY}


def test_warnings_for_missing_class_and_several_slices(tmp_path):
    image, label = phantom_arrays(6)
    write_pair(tmp_path / "pairs", "nopsoas", lps_image(image),
               lps_image(np.where(label == 1, 0, label).astype(np.uint8)))
    write_pair(tmp_path / "pairs", "stack", lps_image(np.concatenate([image, image])),
               lps_image(np.concatenate([label, label])))
    report = dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw")
    assert report.ok
    assert {(i.case_id, i.kind) for i in report.warnings} == {
        ("nopsoas", dataset.MISSING_CLASS), ("stack", dataset.MULTI_SLICE)}


# ---------------------------------------------------------------- atomic, no overwrite


def test_existing_dataset_is_kept_unless_force(tmp_path):
    write_phantom_pair(tmp_path / "pairs", "one", 1)
    dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw")
    root = tmp_path / "raw" / "Dataset711_L3SM"
    with pytest.raises(InputError, match="--force"):
        dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw")

    write_phantom_pair(tmp_path / "pairs", "two", 2)
    report = dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw",
                                   force=True)
    assert report.ok
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset711_L3SM"]


def test_failed_rebuild_leaves_the_old_dataset_untouched(tmp_path):
    write_phantom_pair(tmp_path / "pairs", "one", 1)
    dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw")
    root = tmp_path / "raw" / "Dataset711_L3SM"
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    image, label = phantom_arrays(2)
    write_pair(tmp_path / "pairs", "broken", lps_image(image), lps_image(label * 0))

    report = dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw",
                                   force=True)
    assert not report.ok
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_dataset_id_used_by_another_name_is_refused(tmp_path):
    (tmp_path / "raw" / "Dataset711_Other").mkdir(parents=True)
    write_phantom_pair(tmp_path / "pairs", "one", 1)
    with pytest.raises(InputError, match="Dataset711_Other"):
        dataset.build_dataset([tmp_path / "pairs"], 711, "L3SM", tmp_path / "raw")


@pytest.mark.parametrize("dataset_id, name", [(0, "L3SM"), (1000, "L3SM"), (5, "has space")])
def test_bad_dataset_id_or_name(dataset_id, name):
    with pytest.raises(InputError):
        dataset.dataset_folder_name(dataset_id, name)


# ---------------------------------------------------------------- command line


def test_cli_builds_prints_and_writes_the_report(tmp_path, capsys):
    write_phantom_pair(tmp_path / "pairs", "one", 1)
    code = cli.main(["dataset", "build", "--pairs", str(tmp_path / "pairs"), "--id", "711",
                     "--name", "L3SM", "--out", str(tmp_path / "raw")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Dataset711_L3SM: 1 valid case(s), 0 error(s)" in out
    report = json.loads((tmp_path / "raw" / "Dataset711_L3SM.report.json").read_text())
    assert report["ok"] and report["cases"][0]["case_id"] == "one"


def test_cli_exits_non_zero_on_errors(tmp_path, capsys):
    image, label = phantom_arrays(1)
    write_pair(tmp_path / "pairs", "empty", lps_image(image), lps_image(label * 0))
    report_path = tmp_path / "report.json"
    code = cli.main(["dataset", "build", "--pairs", str(tmp_path / "pairs"), "--id", "711",
                     "--name", "L3SM", "--out", str(tmp_path / "raw"), "--report",
                     str(report_path)])
    assert code == 1
    assert "[empty] empty" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert not report["ok"] and report["errors"][0]["kind"] == "empty"
    assert not (tmp_path / "raw" / "Dataset711_L3SM").exists()
