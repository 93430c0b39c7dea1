"""Reading CT volumes and picking the axial L3 slice. All axis juggling lives here.

Conventions (decided once, here):

* Physical space is ITK/DICOM **LPS** in millimetres. Slicer's RAS is converted at the
  boundary (:meth:`Geometry.from_ijk_to_ras`).
* A :class:`Volume` array is indexed ``[k, j, i]`` as SimpleITK returns it, with the
  geometry of the file it came from.
* An :class:`AxialSlice` is in one **canonical display orientation**: rows run anterior →
  posterior (+y in LPS), columns run patient right → left (+x in LPS). That is anterior
  up, patient right on screen left: the radiological convention, whatever order the file
  stored its axes in. The model always sees this orientation.
* ``SliceGeometry`` maps the canonical slice back to the source grid exactly, so exports
  overlay the source CT in any viewer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

log = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPS"  # DICOMOrient code: i → L, j → P, k → S
_AXIS_TOLERANCE = 1e-4
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# Plausible CT range in HU. Air is -1000; padding values go lower, metal goes higher.
_CT_MIN_BELOW = -500.0
_CT_MAX_ABOVE = 300.0


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in LPS mm, ITK convention: point = origin + direction @ (index * spacing)."""

    spacing: tuple[float, float, float]  # (i, j, k)
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major; column c is the direction of axis c

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_point(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + self.matrix @ (ijk * np.asarray(self.spacing))

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK→RAS matrix as Slicer stores it on a volume node."""
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        m = np.eye(4)
        m[:3, :3] = lps_to_ras @ self.matrix @ np.diag(self.spacing)
        m[:3, 3] = lps_to_ras @ np.asarray(self.origin)
        return m

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras) -> Geometry:
        m = np.asarray(ijk_to_ras, dtype=float)
        ras_to_lps = np.diag([-1.0, -1.0, 1.0])
        scaled = ras_to_lps @ m[:3, :3]
        spacing = np.linalg.norm(scaled, axis=0)
        if np.any(spacing <= 0):
            raise InputError(f"IJK→RAS matrix has a zero-length axis: {m.tolist()}.")
        return cls(
            tuple(float(s) for s in spacing),
            tuple(float(v) for v in ras_to_lps @ m[:3, 3]),
            tuple(float(v) for v in (scaled / spacing).ravel()),
        )


@dataclass(frozen=True)
class Volume:
    """A CT volume in HU: array ``[k, j, i]`` plus the geometry of its source file."""

    array: np.ndarray
    geometry: Geometry
    source: str = ""
    metadata: dict = field(default_factory=dict, compare=False)  # e.g. DICOM PatientSize

    def __post_init__(self):
        if self.array.ndim != 3:
            raise InputError(
                f"A volume needs a 3D array [k, j, i]; got shape {self.array.shape}."
            )

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "", metadata=None) -> Volume:
        return cls(sitk.GetArrayFromImage(image), Geometry.of(image), source, metadata or {})

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(self.array))

    @property
    def is_oblique(self) -> bool:
        m = np.abs(self.geometry.matrix)
        return bool(np.any((m > _AXIS_TOLERANCE) & (m < 1 - _AXIS_TOLERANCE)))

    @property
    def slice_axis(self) -> int:
        """Array axis (0 = k, 1 = j, 2 = i) that runs superior–inferior."""
        itk_axis = int(np.argmax(np.abs(self.geometry.matrix[2, :])))
        return 2 - itk_axis

    @property
    def n_axial_slices(self) -> int:
        return self.array.shape[self.slice_axis]


@dataclass(frozen=True)
class SliceGeometry:
    """Where a canonical slice sits: enough to write it back onto the source grid."""

    canonical: Geometry  # 1-slice LPS grid of the canonical pixels
    source_orientation: str  # DICOMOrient code of the source, e.g. "RAS", "LPI"


@dataclass(frozen=True)
class AxialSlice:
    """One axial CT slice in canonical orientation (rows A→P, columns R→L), HU float32."""

    pixels: np.ndarray
    spacing_mm: tuple[float, float]  # (row, column)
    index: int  # index along the source volume's superior–inferior array axis
    z_mm: float  # LPS z of the slice centre
    geometry: SliceGeometry

    @property
    def pixel_area_mm2(self) -> float:
        return self.spacing_mm[0] * self.spacing_mm[1]


# ---------------------------------------------------------------- reading


def read_volume(path: str | Path) -> Volume:
    """Read a CT from NIfTI, NRRD, MHA, a DICOM series folder or a DICOM file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"CT not found: '{path}'. Check the path, or pass a DICOM folder.")
    if path.is_dir():
        image, metadata, reader = *_read_dicom_series(path), None
    else:
        image, metadata, reader = _read_file(path)
    _check_spacing(image, path, reader)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components per pixel "
            "(colour?). A CT has one; export the CT itself, not a screenshot."
        )
    volume = Volume.from_sitk(sitk.Cast(image, sitk.sitkFloat32), str(path), metadata)
    check_ct_intensities(volume.array, str(path))
    return volume


def read_slice(path: str | Path, *, index: int | None = None, z_mm: float | None = None
               ) -> tuple[Volume, AxialSlice]:
    """A one-slice CT file as is, or one axial slice of a volume picked by index or z."""
    volume = read_volume(path)
    if index is None and z_mm is None:
        if volume.n_axial_slices != 1:
            raise InputError(
                f"'{path}' is a volume with {volume.n_axial_slices} axial slices. Pick the "
                "L3 slice with --slice N or --z MM."
            )
        index = 0
    return volume, pick_slice(volume, index=index, z_mm=z_mm)


def require_volume(volume: Volume, min_slices: int = 2, purpose: str = "this step") -> None:
    """Refuse a single slice where a stack of axial slices is needed."""
    if volume.n_axial_slices < min_slices:
        raise InputError(
            f"{volume.source or 'The input'} has {volume.n_axial_slices} axial slice(s), but "
            f"{purpose} needs a CT volume of at least {min_slices}. Pass the whole series "
            "(a DICOM folder or a 3D NIfTI/NRRD), not a single slice."
        )


def _read_file(path: Path) -> tuple[sitk.Image, dict, sitk.ImageFileReader]:
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(
            f"'{path}' is not an image SimpleITK can read ({_first_line(err)}). "
            f"Use one of {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder."
        ) from None
    metadata = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys() if k == "0010|1020"}
    return image, _dicom_metadata(metadata), reader


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, dict]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(
            f"No DICOM series found in folder '{folder}'. Point to the folder that holds "
            "the .dcm files, or to a NIfTI/NRRD file."
        )
    if len(series) > 1:
        log.warning("'%s' holds %d DICOM series; reading the first, %s.", folder,
                    len(series), series[0])
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    tags = {"0010|1020": reader.GetMetaData(0, "0010|1020")} if reader.HasMetaDataKey(
        0, "0010|1020") else {}
    return image, _dicom_metadata(tags)


def _dicom_metadata(tags: dict) -> dict:
    size = tags.get("0010|1020", "").strip()
    try:
        return {"patient_height_m": float(size)} if size and float(size) > 0 else {}
    except ValueError:
        return {}


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def _check_spacing(image: sitk.Image, path: Path, reader: sitk.ImageFileReader | None) -> None:
    spacing = image.GetSpacing()
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(
            f"'{path}' has invalid pixel spacing {spacing}. Fix the header (e.g. set "
            "PixelSpacing in DICOM) before measuring areas."
        )
    reason = _missing_geometry_reason(path, reader) if reader is not None else None
    if reason:
        raise InputError(
            f"'{path}' {reason}, so areas in cm² and the overlay position would be guesses. "
            "Export the CT again as DICOM, NIfTI or NRRD with its spacing and orientation."
        )


def _missing_geometry_reason(path: Path, reader: sitk.ImageFileReader) -> str | None:
    name = path.name.lower()
    keys = set(reader.GetMetaDataKeys())
    if name.endswith(_PICTURE_SUFFIXES):
        return "is a picture file with no physical pixel spacing"
    if name.endswith((".nrrd", ".nhdr")) and not _nrrd_has_spacing(path):
        return "is a NRRD without 'space directions' or 'spacings'"
    if name.endswith((".nii", ".nii.gz")) and {"qform_code", "sform_code"} <= keys and (
        reader.GetMetaData("qform_code") == "0" and reader.GetMetaData("sform_code") == "0"
    ):
        return "is a NIfTI whose qform and sform codes are both 0 (no spacing/orientation)"
    if "0008|0060" in keys and "0028|0030" not in keys and "0018|1164" not in keys:
        return "is a DICOM file without PixelSpacing (0028,0030)"
    return None


def _nrrd_has_spacing(path: Path) -> bool:
    with open(path, "rb") as stream:
        header = stream.read(8192).split(b"\n\n", 1)[0]
    return b"space directions:" in header or b"spacings:" in header


def check_ct_intensities(array: np.ndarray, source: str = "input") -> None:
    """Refuse data that cannot be CT in HU: MR, 0–255 pictures, unrescaled raw values."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if lo > _CT_MIN_BELOW or hi < _CT_MAX_ABOVE:
        raise InputError(
            f"{source} has intensities {lo:.0f}..{hi:.0f}, which is not a CT in "
            "Hounsfield units (air ≈ -1000, bone ≥ 300). MR or 8-bit pictures cannot be "
            "measured; if this is CT, apply the DICOM rescale slope/intercept first."
        )


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# ---------------------------------------------------------------- orientation


def orientation_code(geometry: Geometry) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)


def to_canonical(volume: Volume) -> sitk.Image:
    """The volume on an LPS grid (axis permutation and flips only; oblique: resampled)."""
    image = volume.to_sitk()
    if volume.is_oblique:
        log.warning(
            "%s is oblique (direction %s); resampling it onto an axial grid. Areas stay "
            "correct, but exported slices are on the resampled grid.",
            volume.source or "The volume", np.round(volume.geometry.matrix, 3).tolist(),
        )
        image = _resample_axial(image)
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def _resample_axial(image: sitk.Image) -> sitk.Image:
    size = np.asarray(image.GetSize()) - 1
    corners = [
        image.TransformContinuousIndexToPhysicalPoint((np.asarray(corner) * size).tolist())
        for corner in np.ndindex(2, 2, 2)
    ]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    spacing = np.full(3, min(image.GetSpacing()))
    spacing[2] = max(image.GetSpacing())
    size = (np.ceil((hi - lo) / spacing).astype(int) + 1).tolist()
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, lo.tolist(),
                         spacing.tolist(), np.eye(3).ravel().tolist(), -1024.0)


# ---------------------------------------------------------------- slice picking


def pick_slice(volume: Volume, *, index: int | None = None, z_mm: float | None = None
               ) -> AxialSlice:
    """The axial slice at a source index (along the S–I array axis) or nearest to LPS z."""
    if (index is None) == (z_mm is None):
        raise InputError("Pick the slice by exactly one of index or z_mm.")
    canonical = to_canonical(volume)
    n = canonical.GetSize()[2]
    if z_mm is not None:
        k = _nearest_k(canonical, z_mm, volume.source)
    else:
        if volume.is_oblique:
            raise InputError(
                f"{volume.source or 'The volume'} is oblique, so a slice index is ambiguous. "
                "Pick the slice by z in mm instead."
            )
        if not 0 <= index < n:
            raise InputError(
                f"Slice index {index} is out of range: {volume.source or 'the volume'} has "
                f"{n} axial slices, so use 0..{n - 1}."
            )
        k = _source_to_canonical_index(volume, index, n)
    return _canonical_slice(canonical, k, volume, n)


def _nearest_k(canonical: sitk.Image, z_mm: float, source: str) -> int:
    n = canonical.GetSize()[2]
    z0 = canonical.GetOrigin()[2]
    dz = canonical.GetSpacing()[2]
    k = int(round((z_mm - z0) / dz))
    if not 0 <= k < n:
        raise InputError(
            f"z = {z_mm:.1f} mm is outside {source or 'the volume'}, which spans "
            f"z = {z0:.1f}..{z0 + dz * (n - 1):.1f} mm (LPS). Pick a z inside that range."
        )
    return k


def _source_to_canonical_index(volume: Volume, index: int, n: int) -> int:
    itk_axis = 2 - volume.slice_axis
    runs_superior = volume.geometry.matrix[2, itk_axis] > 0
    return index if runs_superior else n - 1 - index


def _canonical_slice(canonical: sitk.Image, k: int, volume: Volume, n: int) -> AxialSlice:
    one = canonical[:, :, k : k + 1]
    geometry = Geometry.of(one)
    source_index = k if volume.is_oblique else _source_to_canonical_index(volume, k, n)
    return AxialSlice(
        pixels=sitk.GetArrayFromImage(one)[0].astype(np.float32),
        spacing_mm=(geometry.spacing[1], geometry.spacing[0]),
        index=source_index,
        z_mm=float(geometry.origin[2]),
        geometry=SliceGeometry(geometry, _source_orientation(volume)),
    )


def _source_orientation(volume: Volume) -> str:
    return CANONICAL_ORIENTATION if volume.is_oblique else orientation_code(volume.geometry)


def slice_from_array(pixels: np.ndarray, spacing_mm: tuple[float, float],
                     z_mm: float = 0.0, origin_xy: tuple[float, float] = (0.0, 0.0)
                     ) -> AxialSlice:
    """An AxialSlice from canonical pixels (rows A→P, columns R→L), e.g. a phantom."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise InputError(f"A slice needs a 2D array [rows, cols]; got shape {pixels.shape}.")
    row, col = (float(s) for s in spacing_mm)
    if not (row > 0 and col > 0):
        raise InputError(f"Pixel spacing must be positive mm; got {spacing_mm}.")
    geometry = Geometry((col, row, 1.0), (origin_xy[0], origin_xy[1], z_mm),
                        tuple(np.eye(3).ravel()))
    return AxialSlice(pixels.astype(np.float32), (row, col), 0, float(z_mm),
                      SliceGeometry(geometry, CANONICAL_ORIENTATION))


# ---------------------------------------------------------------- back to the source grid


def slice_to_source_image(slice_: AxialSlice, canonical_2d: np.ndarray) -> sitk.Image:
    """A canonical 2D array as a one-slice image on the source grid (same direction)."""
    if canonical_2d.shape != slice_.pixels.shape:
        raise InputError(
            f"Array shape {canonical_2d.shape} does not match the slice {slice_.pixels.shape}."
        )
    image = slice_.geometry.canonical.apply_to(sitk.GetImageFromArray(canonical_2d[None]))
    return sitk.DICOMOrient(image, slice_.geometry.source_orientation)


def canonical_from_source_image(slice_: AxialSlice, image: sitk.Image) -> np.ndarray:
    """Resample any label image onto the slice's canonical grid, by physical position."""
    reference = slice_.geometry.canonical.apply_to(
        sitk.Image([slice_.pixels.shape[1], slice_.pixels.shape[0], 1], image.GetPixelID())
    )
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)[0]
