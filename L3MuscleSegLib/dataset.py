"""Turning ``<case>-image.nii.gz`` / ``<case>-label.nii.gz`` pairs into an nnU-Net v2 raw dataset.

Every pair is validated before anything is written: both files present, one grid (shape,
spacing, origin, direction), integer labels within the class table, a non-empty label, a
unique case ID and an image that is CT in HU. Images and labels are written **reoriented to
the canonical LPS grid** (``sitk.DICOMOrient``), so the network always sees rows
anterior → posterior and columns right → left whatever axis order the source file used;
nnU-Net itself does not reorient. The dataset is built in a hidden folder next to its
destination and renamed into place at the end, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .export import atomic_path
from .geometry import CANONICAL_ORIENTATION, Geometry, check_ct_intensities, orientation_code
from .labels import LABEL_VALUES, NNUNET_LABELS

log = logging.getLogger(__name__)

IMAGE_SUFFIX = "-image.nii.gz"
LABEL_SUFFIX = "-label.nii.gz"
FILE_ENDING = ".nii.gz"
# --fix-geometry copies the image grid onto the label only when the two differ by float noise.
FIX_TOLERANCE_MM = 1e-3
FIX_TOLERANCE_DIRECTION = 1e-4
_SAME_TOLERANCE = 1e-6  # closer than this counts as identical
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

# Issue kinds, as they appear in the report.
INCOMPLETE, DUPLICATE, BAD_NAME, UNREADABLE = "incomplete", "duplicate", "bad_name", "unreadable"
GEOMETRY, LABELS, EMPTY, NOT_CT = "geometry", "labels", "empty", "not_ct"
MISSING_CLASS, MULTI_SLICE, OBLIQUE, GEOMETRY_FIXED = (
    "missing_class", "multi_slice", "oblique", "geometry_fixed")


@dataclass(frozen=True)
class Issue:
    case_id: str
    kind: str
    message: str


@dataclass(frozen=True)
class CasePair:
    case_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class CaseSummary:
    case_id: str
    image: str
    label: str
    size: tuple[int, int, int]  # (i, j, k) on the canonical grid
    spacing_mm: tuple[float, float, float]
    source_orientation: str
    label_pixels: dict[str, int]  # per class key


@dataclass(frozen=True)
class DatasetReport:
    """What validation found and, if the build went ahead, where the dataset is."""

    dataset_name: str
    cases: tuple[CaseSummary, ...]
    errors: tuple[Issue, ...]
    warnings: tuple[Issue, ...]
    output: str | None = None  # the written dataset folder; None when nothing was written
    sources: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def format(self) -> str:
        """A readable multi-line report (the CLI prints it)."""
        lines = [f"{self.dataset_name}: {len(self.cases)} valid case(s), {len(self.errors)} "
                 f"error(s), {len(self.warnings)} warning(s)"]
        for title, issues in (("ERRORS", self.errors), ("Warnings", self.warnings)):
            if issues:
                lines.append(f"{title}:")
                lines += [f"  [{i.kind}] {i.case_id}: {i.message}" for i in issues]
        if self.output:
            lines.append(f"Written: {self.output}")
        elif self.errors:
            lines.append("Nothing was written. Fix the errors above and run again.")
        return "\n".join(lines)


# ---------------------------------------------------------------- finding pairs


def find_pairs(folders) -> tuple[list[CasePair], list[Issue]]:
    """All complete, uniquely named pairs in ``folders``, and issues for the rest."""
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"Pairs folder not found: '{folder}'. Pass folders that hold "
                             f"<case>{IMAGE_SUFFIX} and <case>{LABEL_SUFFIX} files.")
        for path in sorted(folder.iterdir()):
            for suffix, found in ((IMAGE_SUFFIX, images), (LABEL_SUFFIX, labels)):
                if path.name.endswith(suffix):
                    found.setdefault(path.name[: -len(suffix)], []).append(path)
    pairs, issues = [], []
    for case_id in sorted(images.keys() | labels.keys()):
        issue = _pair_issue(case_id, images.get(case_id, []), labels.get(case_id, []))
        if issue:
            issues.append(issue)
        else:
            pairs.append(CasePair(case_id, images[case_id][0], labels[case_id][0]))
    return pairs, issues


def _pair_issue(case_id: str, images: list[Path], labels: list[Path]) -> Issue | None:
    if len(images) > 1 or len(labels) > 1:
        where = ", ".join(str(p) for p in images + labels)
        return Issue(case_id, DUPLICATE, f"case ID appears more than once ({where}). "
                     "Case IDs must be unique across all folders: rename one of them.")
    if not images or not labels:
        have, missing = (images, LABEL_SUFFIX) if images else (labels, IMAGE_SUFFIX)
        return Issue(case_id, INCOMPLETE, f"'{have[0]}' has no partner "
                     f"'{case_id}{missing}' in the same folder. Add it or remove the file.")
    if not _CASE_ID.fullmatch(case_id):
        return Issue(case_id, BAD_NAME, f"case ID '{case_id}' has characters nnU-Net file "
                     "names cannot carry. Use letters, digits, '.', '_' and '-' only.")
    return None


# ---------------------------------------------------------------- checking one pair


@dataclass(frozen=True)
class _CheckedPair:
    summary: CaseSummary
    image: sitk.Image  # canonical LPS
    label: sitk.Image  # canonical LPS, uint8


def _check_pair(pair: CasePair, fix_geometry: bool = False
               ) -> tuple[_CheckedPair | None, list[Issue], list[Issue]]:
    """Validate one pair. Returns the canonical images (None on error), errors, warnings."""
    errors, warnings = [], []
    try:
        image, label = _read(pair.image), _read(pair.label)
    except InputError as err:
        return None, [Issue(pair.case_id, UNREADABLE, str(err))], []
    geometry_issue = _geometry_issue(image, label)
    if geometry_issue == "fixable" and fix_geometry:
        label = Geometry.of(image).apply_to(label)
        warnings.append(Issue(pair.case_id, GEOMETRY_FIXED, "label grid differed from the "
                              "image by float noise only; copied the image grid onto it."))
    elif geometry_issue == "fixable":
        errors.append(Issue(pair.case_id, GEOMETRY, "label grid differs from the image by "
                            f"float noise only ({_grid_difference(image, label)}). Rerun "
                            "with --fix-geometry to copy the image grid onto the label."))
    elif geometry_issue:
        errors.append(Issue(pair.case_id, GEOMETRY, geometry_issue))
    values = sitk.GetArrayViewFromImage(label)
    errors += _label_errors(pair.case_id, values)
    try:
        check_ct_intensities(sitk.GetArrayViewFromImage(image), f"'{pair.image.name}'")
    except InputError as err:
        errors.append(Issue(pair.case_id, NOT_CT, str(err)))
    if errors:
        return None, errors, warnings
    warnings += _label_warnings(pair.case_id, values, image)
    return _canonical(pair, image, label), errors, warnings


def _read(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"'{path}' cannot be read as an image ({str(err).strip()[-120:]}). "
                         "Re-export it as NIfTI.") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components "
                         "per pixel; export a single-channel image.")
    return sitk.JoinSeries(image) if image.GetDimension() == 2 else image


def _geometry_issue(image: sitk.Image, label: sitk.Image) -> str | None:
    """None if the grids match, "fixable" for float noise, else a message."""
    if image.GetSize() != label.GetSize():
        return (f"label size {label.GetSize()} differs from image size {image.GetSize()}. "
                "The label must be drawn on the image's own grid.")
    a, b = Geometry.of(image), Geometry.of(label)
    mm = max(_max_difference(a.spacing, b.spacing), _max_difference(a.origin, b.origin))
    direction = _max_difference(a.direction, b.direction)
    if mm <= _SAME_TOLERANCE and direction <= _SAME_TOLERANCE:
        return None
    if mm <= FIX_TOLERANCE_MM and direction <= FIX_TOLERANCE_DIRECTION:
        return "fixable"
    return (f"label grid does not match the image ({_grid_difference(image, label)}). "
            "Resample the label onto the image grid, or pair it with the right image.")


def _max_difference(a, b) -> float:
    return float(np.max(np.abs(np.subtract(a, b))))


def _grid_difference(image: sitk.Image, label: sitk.Image) -> str:
    a, b = Geometry.of(image), Geometry.of(label)
    return (f"spacing Δ {_max_difference(a.spacing, b.spacing):.2g} mm, origin Δ "
            f"{_max_difference(a.origin, b.origin):.2g} mm, direction Δ "
            f"{_max_difference(a.direction, b.direction):.2g}")


def _label_errors(case_id: str, values: np.ndarray) -> list[Issue]:
    if not np.all(np.isfinite(values)) or not np.all(np.mod(values, 1) == 0):
        return [Issue(case_id, LABELS, "label holds non-integer values. Save the label map "
                      "with integer values 0..3 (nearest-neighbour, never interpolated).")]
    present = set(np.unique(values).astype(int).tolist())
    unknown = sorted(present - set(LABEL_VALUES))
    if unknown:
        return [Issue(case_id, LABELS, f"label holds values {unknown}; only {list(LABEL_VALUES)} "
                      f"are allowed ({NNUNET_LABELS}). Relabel or remove the extra segments.")]
    if present <= {0}:
        return [Issue(case_id, EMPTY, "label is empty (all background). Segment the muscles "
                      "or leave this case out.")]
    return []


def _label_warnings(case_id: str, values: np.ndarray, image: sitk.Image) -> list[Issue]:
    warnings = []
    present = set(np.unique(values).astype(int).tolist())
    missing = [key for key, value in NNUNET_LABELS.items() if value and value not in present]
    if missing:
        warnings.append(Issue(case_id, MISSING_CLASS, f"no pixels of {missing}."))
    if _axial_slices(image) > 1:
        warnings.append(Issue(case_id, MULTI_SLICE, f"{_axial_slices(image)} axial slices: "
                              "nnU-Net 2d trains on every slice, unlabelled ones as background."))
    matrix = Geometry.of(image).matrix
    if np.any((np.abs(matrix) > 1e-4) & (np.abs(matrix) < 1 - 1e-4)):
        warnings.append(Issue(case_id, OBLIQUE, "oblique grid; axes are permuted to LPS but "
                              "not resampled."))
    return warnings


def _axial_slices(image: sitk.Image) -> int:
    matrix = Geometry.of(image).matrix
    return image.GetSize()[int(np.argmax(np.abs(matrix[2, :])))]


def _canonical(pair: CasePair, image: sitk.Image, label: sitk.Image) -> _CheckedPair:
    source = orientation_code(Geometry.of(image))
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    label = sitk.DICOMOrient(sitk.Cast(label, sitk.sitkUInt8), CANONICAL_ORIENTATION)
    counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=4)
    summary = CaseSummary(
        pair.case_id, str(pair.image), str(pair.label), tuple(image.GetSize()),
        tuple(float(s) for s in image.GetSpacing()), source,
        {key: int(counts[value]) for key, value in NNUNET_LABELS.items() if value},
    )
    return _CheckedPair(summary, image, label)


# ---------------------------------------------------------------- building the dataset


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise InputError(f"Dataset ID {dataset_id} is out of range: nnU-Net uses 1..999.")
    if not _DATASET_NAME.fullmatch(name):
        raise InputError(f"Dataset name '{name}' is not usable: use letters, digits, '_' and '-' "
                         "(no spaces), e.g. L3SM.")
    return f"Dataset{dataset_id:03d}_{name}"


def validate_pairs(folders, fix_geometry: bool = False) -> DatasetReport:
    """Check every pair without writing anything."""
    return _validate(folders, "", fix_geometry)[0]


def _validate(folders, dataset_name: str, fix_geometry: bool
              ) -> tuple[DatasetReport, list[_CheckedPair]]:
    """The report, and the canonical images of the valid cases."""
    pairs, errors = find_pairs(folders)
    warnings, checked = [], []
    for pair in pairs:
        result, pair_errors, pair_warnings = _check_pair(pair, fix_geometry)
        errors += pair_errors
        warnings += pair_warnings
        if result is not None:
            checked.append(result)
    if not pairs and not errors:
        errors.append(Issue("-", INCOMPLETE, "no <case>-image.nii.gz / <case>-label.nii.gz "
                            f"pairs in {[str(f) for f in folders]}."))
    report = DatasetReport(dataset_name, tuple(c.summary for c in checked), tuple(errors),
                           tuple(warnings), sources=tuple(str(f) for f in folders))
    return report, checked


def build_dataset(folders, dataset_id: int, name: str, out: str | Path, *,
                  fix_geometry: bool = False, force: bool = False) -> DatasetReport:
    """Validate all pairs, then write ``out/DatasetNNN_name`` atomically (only if all pass).

    Returns the report; ``report.output`` is None when validation failed and nothing was
    written. Refuses to replace an existing dataset unless ``force``.
    """
    folder_name = dataset_folder_name(dataset_id, name)
    out = Path(out)
    destination = out / folder_name
    _check_destination(out, destination, dataset_id, force)
    report, checked = _validate(folders, folder_name, fix_geometry)
    if not report.ok:
        return report
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=out))
    try:
        _write_dataset(staging, checked, folder_name)
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("Wrote %s with %d cases.", destination, len(checked))
    return replace(report, output=str(destination))


def _check_destination(out: Path, destination: Path, dataset_id: int, force: bool) -> None:
    if destination.exists() and not force:
        raise InputError(f"'{destination}' already exists. Pass --force to replace it, or "
                         "choose another --id/--name.")
    if out.is_dir():
        clashes = [p.name for p in out.glob(f"Dataset{dataset_id:03d}_*")
                   if p.is_dir() and p != destination]
        if clashes:
            raise InputError(f"Dataset ID {dataset_id} is already used by {clashes} in '{out}'; "
                             "nnU-Net needs unique IDs. Pick another --id or remove it.")


def _write_dataset(root: Path, checked: list[_CheckedPair], folder_name: str) -> None:
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    for case in checked:
        case_id = case.summary.case_id
        sitk.WriteImage(case.image, str(root / "imagesTr" / f"{case_id}_0000{FILE_ENDING}"),
                        useCompression=True)
        sitk.WriteImage(case.label, str(root / "labelsTr" / f"{case_id}{FILE_ENDING}"),
                        useCompression=True)
    (root / "dataset.json").write_text(json.dumps(dataset_json(folder_name, len(checked)),
                                                  indent=2) + "\n")


def dataset_json(folder_name: str, num_training: int) -> dict:
    return {
        "name": folder_name,
        "description": "Axial L3 CT slices, canonical LPS grid; labels from L3MuscleSeg.",
        "channel_names": {"0": "CT"},
        "labels": dict(NNUNET_LABELS),
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
    }


def _move_into_place(staging: Path, destination: Path) -> None:
    if not destination.exists():
        staging.rename(destination)
        return
    retired = staging.with_name(staging.name + ".old")
    destination.rename(retired)
    staging.rename(destination)
    shutil.rmtree(retired)


def write_report(report: DatasetReport, path: str | Path) -> Path:
    """The report as JSON, written atomically (replaces an older report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as temp:
        temp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path
