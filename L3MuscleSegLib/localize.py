"""Automatic L3 localisation by counting vertebrae: no learned weights, honest confidence.

The method, on the CT resampled to a coarse LPS grid (every parameter in mm and HU):

1. **Column.** A global path through the axial slices (Viterbi) follows the vertebral
   bodies: the likelihood is a Gaussian-weighted fraction of bone-dense tissue, minus a
   penalty for straying from the body's midline, and the path may move a few mm per
   slice, so scoliosis, lordosis and the sacral curve do not break it.
2. **Discs.** Along the smoothed centreline, the mean HU of a disc-shaped patch
   perpendicular to the column gives a profile whose dips are disc candidates, scored by
   their depth and by the endplates either side. Dynamic programming picks the chain of
   discs that best fits a spacing prior (20–50 mm apart, neighbours of similar height).
3. **Anchors.** *Sacrum*: slices where bone runs unbroken from the column to the ilium
   (the sacral alae across the sacroiliac joints); the disc at the top of that zone is
   L5/S1. *T12*: the lowest vertebra with a rib whose medial end reaches the costovertebral
   region beside it; ribs whose medial end lies far out (hanging tips) do not count.
4. **Labels and confidence.** L3 is counted up from L5/S1 and down from T12. *High*:
   both anchors agree and the lumbar spacing fits the prior. *Medium*: one anchor only, or
   the spacing is irregular. *Low*: the anchors disagree (transitional vertebra, 4 or 6
   lumbar vertebrae) or nothing reliable was found; a low answer must be reviewed.

The L3 slice is the mid-vertebral one: midway, along the centreline, between the L3/L4
and L2/L3 disc centres. Positions are LPS z in mm plus the slice index along the source
volume's superior–inferior array axis (``None`` for oblique volumes: use z).
TotalSegmentator, when installed, can give a second opinion (:func:`run_totalsegmentator`,
:func:`l3_z_from_totalseg`, :func:`with_second_opinion`); disagreement lowers confidence.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import tempfile
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage
from scipy.signal import find_peaks

from . import geometry
from .errors import InputError, ModelError
from .export import atomic_path
from .geometry import Volume

log = logging.getLogger(__name__)

HIGH, MEDIUM, LOW = "high", "medium", "low"
_LOWER = {HIGH: MEDIUM, MEDIUM: LOW, LOW: LOW}

GRID_MM = 2.0  # working grid
TRACK_MM = 4.0  # grid of the column tracker
MIN_COLUMN_MM = 80.0  # shortest column worth counting
# Column likelihood: fraction of tissue denser than soft tissue, Gaussian-weighted.
_DENSE_HU = (40.0, 100.0)  # 0 at the first value, 1 from the second
_TRACK_SIGMA_MM = (6.0, 7.0, 8.0)  # z, y, x
_TRACK_STEP_MM = 8.0  # most the column moves between tracker slices
_TRACK_BEND_COST = 0.05  # per (tracker voxel)² of movement
_MIDLINE_FREE_MM, _MIDLINE_COST = 40.0, 0.5  # penalty per 25 mm beyond the free band
_COLUMN_MIN_LIKELIHOOD = 0.5
_CENTRELINE_SIGMA_MM = 8.0
# Disc profile.
_PATCH_RADIUS_MM = 10.0
_PROFILE_HU = (-200.0, 800.0)
_DIP_WINDOW_MM = 25  # endplate search either side of a dip
_BASELINE_MM = 20  # half-window of the local median the dip depth is measured from
# Disc chain (dynamic programming).
DISC_GAP_MM = (20.0, 50.0)  # hard limits between neighbouring discs
LUMBAR_GAP_MM = (25.0, 45.0)  # what a lumbar vertebra plus disc spans
_GAP_PRIOR_MM, _GAP_PRIOR_SD = 34.0, 14.0
_GAP_RATIO_COST = 8.0  # × (log of the ratio of neighbouring gaps)²
_LUMBAR_RATIO = (0.75, 1.33)
_DISC_BIAS = 0.35  # a candidate is worth keeping when its strength exceeds this
_FREE_END_MM, _END_COST_PER_MM = 45.0, 1.0 / 35.0
# Sacral anchor.
_BRIDGE_HU = 100.0
_BRIDGE_REACH_MM = 70.0  # bone continuous this far out on both sides = alae + ilia
_BRIDGE_MIN_RUN_MM = 10.0
_L5S1_BELOW_ZONE_TOP_MM, _L5S1_ABOVE_ZONE_TOP_MM = 20.0, 25.0
# Rib anchor.
_RIB_HU = 200.0
_RIB_MEDIAL_MM = 24.0  # lateral distance that clears vertebral body and arch
_RIB_NECK_MM = 36.0  # a rib's medial end lies this close: it articulates here
_RIB_NECK_AP_MM = (10.0, 40.0)  # rib necks run behind the body, at the transverse processes
_RIB_BAND_AP_MM = (-10.0, 70.0)  # only the posterior half of the trunk is searched
_RIB_REACH_MM = 62.0  # lateral reach that tells a rib from a transverse process
_RIB_MAX_HEIGHT_MM = 100.0  # taller components are pelvis
_RIB_ABOVE_SACRUM_MM = 40.0
# Second opinion.
TOTALSEG_L3_LABEL = 29  # "vertebrae_L3" in TotalSegmentator's "total" task
AGREE_MM = 15.0  # about half a vertebra


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Level:
    """One vertebra found along the column. z in LPS mm, index along the source S–I axis."""

    name: str  # "L3", "T12", "S1"
    z_min_mm: float  # centre of the disc below, or where the visible part ends
    z_max_mm: float
    mid_z_mm: float  # mid-vertebral, on the centreline
    mid_point_lps: tuple[float, float, float]  # on the centreline: where to put a label
    mid_index: int | None  # None for oblique volumes
    complete: bool  # both bounding discs seen


@dataclass(frozen=True)
class Disc:
    name: str  # "L2/L3"; "" where the count does not reach
    z_mm: float
    point_lps: tuple[float, float, float]
    index: int | None
    strength: float  # 1 ≈ a typical disc of this scan; low values were bridged by the prior


@dataclass(frozen=True)
class Anchor:
    name: str  # "sacrum" or "rib"
    found: bool
    z_mm: float | None  # top of the sacroiliac zone / lowest costovertebral joint
    l3_z_mm: float | None  # L3 when counting from this anchor alone
    detail: str


@dataclass(frozen=True)
class SecondOpinion:
    source: str
    l3_z_mm: float | None
    difference_mm: float | None  # ours minus theirs
    agrees: bool


@dataclass(frozen=True)
class ManualOverride:
    index: int | None
    z_mm: float
    offset_mm: float | None  # from the automatic L3
    level: str  # the level the chosen slice falls in, "" if none


@dataclass(frozen=True)
class Localization:
    """Where L3 is, how sure we are and why; JSON-ready through :meth:`to_dict`."""

    l3_index: int | None  # mid-vertebral L3 along the source S–I array axis
    l3_z_mm: float | None
    confidence: str  # "high" | "medium" | "low"
    reason: str
    levels: tuple[Level, ...] = ()
    discs: tuple[Disc, ...] = ()
    anchors: tuple[Anchor, ...] = ()
    n_lumbar: int | None = None  # vertebrae between T12 and the sacrum, when both seen
    centreline_lps: tuple[tuple[float, float, float], ...] = ()  # for previews
    second_opinion: SecondOpinion | None = None
    override: ManualOverride | None = None
    source: str = ""

    @property
    def found(self) -> bool:
        return self.l3_z_mm is not None

    @property
    def needs_review(self) -> bool:
        return self.confidence == LOW or not self.found

    @property
    def chosen_index(self) -> int | None:
        return self.override.index if self.override else self.l3_index

    @property
    def chosen_z_mm(self) -> float | None:
        return self.override.z_mm if self.override else self.l3_z_mm

    def level(self, name: str) -> Level | None:
        return next((lv for lv in self.levels if lv.name == name), None)

    def to_dict(self) -> dict:
        """Everything but the centreline, floats rounded to 0.1 mm, for the JSON report."""
        data = asdict(self)
        data.pop("centreline_lps")
        data["method"] = "vertebra counting along the column (no learned weights)"
        data["needs_review"] = self.needs_review
        return _rounded(data)


# ---------------------------------------------------------------- entry points


def localize_l3(volume: Volume) -> Localization:
    """Find the mid-vertebral L3 slice of a CT by counting vertebrae; see the module doc."""
    grid = _Grid.of(volume)
    height = (grid.hu.shape[0] - 1) * grid.step
    if height < MIN_COLUMN_MM:
        return _nothing(volume, f"The field of view spans only {height:.0f} mm from head to "
                        f"foot; counting vertebrae needs at least {MIN_COLUMN_MM:.0f} mm.")
    column = _track_column(grid)
    if column is None:
        return _nothing(volume, "No vertebral column found: no bone-dense structure runs "
                        f"at least {MIN_COLUMN_MM:.0f} mm through the field of view.")
    discs = _choose_discs(grid, column, _sacral_zone(grid, column))
    if len(discs.arcs) < 2:
        return _nothing(volume, "The vertebral column was found but fewer than two discs "
                        "could be told apart along it.", column)
    ribs = _lowest_rib_joint(grid, column, discs.zone_top_arc)
    log.debug("discs at z %s mm; sacroiliac zone top at arc %s; lowest rib joint at z %s",
              [round(column.z_at(a), 1) for a in discs.arcs], discs.zone_top_arc, ribs)
    return _label(volume, column, discs, ribs)


def l3_z_from_totalseg(labels: Volume, label: int = TOTALSEG_L3_LABEL) -> float | None:
    """L3 mid-height (LPS z of the label's centroid) from a TotalSegmentator "total" map."""
    kji = np.argwhere(labels.array == label)
    if kji.size == 0:
        return None
    g = labels.geometry
    ijk = kji[:, ::-1].astype(float) * np.asarray(g.spacing)
    z = g.origin[2] + ijk @ g.matrix[2]
    return float(np.mean(z))


def with_second_opinion(loc: Localization, l3_z_mm: float | None,
                        source: str = "TotalSegmentator") -> Localization:
    """Record another method's L3 z; lower the confidence one step when it disagrees."""
    if l3_z_mm is None or loc.l3_z_mm is None:
        opinion = SecondOpinion(source, l3_z_mm, None, False)
        note = f"{source} found no L3." if l3_z_mm is None else (
            f"{source} places L3 at z = {l3_z_mm:.1f} mm.")
        return replace(loc, second_opinion=opinion, reason=f"{loc.reason} {note}")
    difference = loc.l3_z_mm - l3_z_mm
    agrees = abs(difference) <= AGREE_MM
    opinion = SecondOpinion(source, l3_z_mm, difference, agrees)
    if agrees:
        return replace(loc, second_opinion=opinion, reason=(
            f"{loc.reason} {source} agrees (within {abs(difference):.0f} mm)."))
    return replace(loc, second_opinion=opinion, confidence=_LOWER[loc.confidence], reason=(
        f"{loc.reason} {source} disagrees: its L3 is {difference:+.0f} mm away "
        f"(z = {l3_z_mm:.1f} mm)."))


def totalsegmentator_available() -> bool:
    return importlib.util.find_spec("totalsegmentator") is not None


def run_totalsegmentator(volume: Volume, device: str = "cpu") -> Volume:
    """TotalSegmentator's "total" task, fast mode, L3 only; its label map as a Volume."""
    if not totalsegmentator_available():
        raise ModelError("The TotalSegmentator second opinion needs the 'TotalSegmentator' "
                         "package and its weights; install it or leave the option off.")
    from totalsegmentator.python_api import totalsegmentator

    with tempfile.TemporaryDirectory() as tmp:
        ct, seg = Path(tmp) / "ct.nii.gz", Path(tmp) / "total.nii.gz"
        sitk.WriteImage(volume.to_sitk(), str(ct))
        totalsegmentator(str(ct), str(seg), ml=True, fast=True, task="total",
                         roi_subset=["vertebrae_L3"], quiet=True, device=device)
        return Volume.from_sitk(sitk.ReadImage(str(seg)), source="TotalSegmentator total")


def with_override(loc: Localization, volume: Volume, *, index: int | None = None,
                  z_mm: float | None = None) -> Localization:
    """Record the slice a person chose instead (by source index or LPS z)."""
    if (index is None) == (z_mm is None):
        raise InputError("Give the chosen slice by exactly one of index or z_mm.")
    if index is not None:
        z_mm = _source_z(volume, index)
    else:
        index = _source_index(volume, z_mm)
    offset = None if loc.l3_z_mm is None else z_mm - loc.l3_z_mm
    level = next((lv.name for lv in loc.levels if lv.z_min_mm <= z_mm <= lv.z_max_mm), "")
    return replace(loc, override=ManualOverride(index, z_mm, offset, level))


def format_report(loc: Localization) -> str:
    """The level table, the L3 slice and the confidence with its reason, as plain text."""
    lines = [f"{'level':<6}{'z from (mm)':>12}{'z to (mm)':>11}{'mid z (mm)':>12}{'slice':>7}"
             ] if loc.levels else []
    for lv in reversed(loc.levels):
        cut = "" if lv.complete else "  (one bounding disc seen)"
        index = "-" if lv.mid_index is None else str(lv.mid_index)
        lines.append(f"{lv.name:<6}{lv.z_min_mm:>12.1f}{lv.z_max_mm:>11.1f}"
                     f"{lv.mid_z_mm:>12.1f}{index:>7}{cut}")
    if loc.found:
        index = "-" if loc.l3_index is None else loc.l3_index
        lines.append(f"L3 mid-vertebral slice: {index} (z = {loc.l3_z_mm:.1f} mm)")
    else:
        lines.append("L3 not found.")
    if loc.override:
        lines.append(f"Chosen by hand instead: slice {loc.override.index} "
                     f"(z = {loc.override.z_mm:.1f} mm, {loc.override.level or 'no level'})")
    lines.append(f"Confidence: {loc.confidence.upper()}. {loc.reason}")
    return "\n".join(lines)


_CONFIDENCE_COLOURS = {HIGH: "lime", MEDIUM: "orange", LOW: "red"}
_COUNTED_FROM = {"sacrum": "L3 counted up from the sacrum", "rib": "L3 counted down from T12"}
_BONE_WINDOW = (-250.0, 1000.0)


def write_preview(volume: Volume, loc: Localization, path: str | Path,
                  overwrite: bool = False) -> Path:
    """PNG: sagittal and coronal planes curved along the column, levels and L3 marked."""
    image = geometry.to_canonical(volume)
    hu = sitk.GetArrayFromImage(image)  # [z, y, x], LPS
    origin, spacing = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    z = origin[2] + spacing[2] * np.arange(hu.shape[0])
    x_mm, y_mm = _preview_centre(loc, z, origin, spacing, hu.shape)
    ix = np.clip(np.round((x_mm - origin[0]) / spacing[0]).astype(int), 0, hu.shape[2] - 1)
    iy = np.clip(np.round((y_mm - origin[1]) / spacing[1]).astype(int), 0, hu.shape[1] - 1)
    rows = np.arange(hu.shape[0])
    planes = {"sagittal": (hu[rows, :, ix], 1, "anterior ← y (mm) → posterior"),
              "coronal": (hu[rows, iy, :], 0, "patient right ← x (mm) → left")}
    figure = Figure(figsize=(13, 8), dpi=100, layout="constrained")
    for n, (name, (plane, axis, label)) in enumerate(planes.items()):
        ax = figure.add_subplot(1, 2, n + 1)
        extent = (origin[axis] - spacing[axis] / 2,
                  origin[axis] + spacing[axis] * (plane.shape[1] - 0.5),
                  z[0] - spacing[2] / 2, z[-1] + spacing[2] / 2)
        ax.imshow(plane, cmap="gray", vmin=_BONE_WINDOW[0], vmax=_BONE_WINDOW[1],
                  origin="lower", extent=extent, aspect="equal", interpolation="nearest")
        _mark_levels(ax, loc, axis)
        ax.set_xlabel(label)
        ax.set_ylabel("z (mm, LPS)")
        ax.set_title(f"{name}, curved along the column", fontsize=9)
    figure.suptitle(_preview_title(loc), fontsize=10,
                    color=_CONFIDENCE_COLOURS[loc.confidence])
    with atomic_path(path, overwrite) as temp:
        FigureCanvasAgg(figure).print_png(temp)
    return Path(path)


def _preview_centre(loc, z, origin, spacing, shape) -> tuple[np.ndarray, np.ndarray]:
    if not loc.centreline_lps:
        middle = origin + spacing * (np.asarray(shape[::-1]) - 1) / 2
        return np.full(z.shape, middle[0]), np.full(z.shape, middle[1])
    line = np.asarray(loc.centreline_lps)
    return np.interp(z, line[:, 2], line[:, 0]), np.interp(z, line[:, 2], line[:, 1])


def _mark_levels(ax, loc: Localization, axis: int) -> None:
    """Disc ticks across the column, level names beside it, the chosen slice(s) across."""
    for disc in loc.discs:
        centre = disc.point_lps[axis]
        ax.plot([centre - 25, centre + 25], [disc.z_mm] * 2, color="cyan", lw=1)
    beside = -60.0 if axis == 1 else 45.0  # in front of the bodies / left of the column
    for level in loc.levels:
        ax.text(level.mid_point_lps[axis] + beside, level.mid_z_mm, level.name,
                color="yellow", fontsize=9, va="center", ha="center",
                fontweight="bold" if level.name == "L3" else None)
    if loc.found:
        ax.axhline(loc.l3_z_mm, color=_CONFIDENCE_COLOURS[loc.confidence], lw=1.2)
    for other in loc.anchors:  # where the other anchor's count would put L3
        if other.l3_z_mm is not None and loc.found and abs(other.l3_z_mm - loc.l3_z_mm) > 1:
            ax.axhline(other.l3_z_mm, color="red", lw=1, ls=":")
            ax.text(0.01, other.l3_z_mm, _COUNTED_FROM[other.name], color="red", fontsize=8,
                    va="bottom", transform=ax.get_yaxis_transform())
    if loc.override:
        ax.axhline(loc.override.z_mm, color="magenta", lw=1.2, ls="--")


def _preview_title(loc: Localization) -> str:
    where = "L3 not found" if not loc.found else (
        f"L3 slice {'-' if loc.l3_index is None else loc.l3_index} "
        f"(z = {loc.l3_z_mm:.1f} mm)")
    text = f"{where}; confidence {loc.confidence.upper()}: {loc.reason}"
    if loc.override:
        text += f" Chosen by hand (dashed): z = {loc.override.z_mm:.1f} mm."
    return textwrap.fill(text, 130)


# ---------------------------------------------------------------- the coarse grid


@dataclass(frozen=True)
class _Grid:
    """The CT on an LPS grid of GRID_MM voxels, array [z, y, x]."""

    hu: np.ndarray
    origin: np.ndarray  # LPS of voxel [0, 0, 0], (x, y, z)
    step: float

    @classmethod
    def of(cls, volume: Volume, step: float = GRID_MM) -> _Grid:
        image = sitk.Cast(geometry.to_canonical(_binned(volume, step)), sitk.sitkFloat32)
        extent = np.asarray(image.GetSpacing()) * (np.asarray(image.GetSize()) - 1)
        size = [int(e // step) + 1 for e in extent]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear,
                              image.GetOrigin(), [step] * 3, np.eye(3).ravel().tolist(),
                              -1000.0, sitk.sitkFloat32)
        return cls(sitk.GetArrayFromImage(image), np.asarray(image.GetOrigin()), step)

    def z(self, k) -> np.ndarray:
        return self.origin[2] + self.step * np.asarray(k, dtype=float)

    def axis(self, n: int) -> np.ndarray:
        """LPS coordinates along array axis n (0 = z, 1 = y, 2 = x)."""
        return self.origin[2 - n] + self.step * np.arange(self.hu.shape[n])

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Linear interpolation at LPS points (..., 3); air outside."""
        idx = (points - self.origin) / self.step
        coords = [idx[..., 2].ravel(), idx[..., 1].ravel(), idx[..., 0].ravel()]
        values = ndimage.map_coordinates(self.hu, coords, order=1, cval=-1000.0)
        return values.reshape(points.shape[:-1])


# ---------------------------------------------------------------- 1. the column


@dataclass(frozen=True)
class _Column:
    """Centreline of the vertebral bodies, resampled every 1 mm of arc, bottom to top."""

    arc: np.ndarray  # mm from the lowest point
    points: np.ndarray  # (n, 3) LPS
    tangent: np.ndarray  # (n, 3) unit, pointing up

    def z_at(self, arc: float) -> float:
        return float(np.interp(arc, self.arc, self.points[:, 2]))

    def point_at(self, arc: float) -> tuple[float, float, float]:
        return tuple(float(np.interp(arc, self.arc, self.points[:, c])) for c in range(3))

    def arc_at_z(self, z: float) -> float:
        return float(np.interp(z, self.points[:, 2], self.arc))

    def centre_at_z(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(z, dtype=float)
        return (np.interp(z, self.points[:, 2], self.points[:, 0]),
                np.interp(z, self.points[:, 2], self.points[:, 1]))


def _track_column(grid: _Grid) -> _Column | None:
    f = round(TRACK_MM / grid.step)
    coarse, step = _block_mean(grid.hu, (f, f, f)), grid.step * f
    origin = grid.origin + 0.5 * (step - grid.step)
    dense = np.clip((coarse - _DENSE_HU[0]) / (_DENSE_HU[1] - _DENSE_HU[0]), 0, 1)
    likelihood = ndimage.gaussian_filter(dense, np.asarray(_TRACK_SIGMA_MM) / step)
    likelihood -= _midline_penalty(coarse, step)[:, None, :]
    path = _viterbi(likelihood, reach=round(_TRACK_STEP_MM / step), cost=_TRACK_BEND_COST)
    on_path = likelihood[np.arange(len(path)), path[:, 0], path[:, 1]]
    run = _longest_run(ndimage.binary_closing(on_path >= _COLUMN_MIN_LIKELIHOOD,
                                              np.ones(3), border_value=1))
    if run is None or (run.stop - run.start - 1) * step < MIN_COLUMN_MM:
        return None
    ks = np.arange(run.start, run.stop)
    sigma = _CENTRELINE_SIGMA_MM / step
    x = ndimage.gaussian_filter1d(origin[0] + step * path[ks, 1], sigma, mode="nearest")
    y = ndimage.gaussian_filter1d(origin[1] + step * path[ks, 0], sigma, mode="nearest")
    z = origin[2] + step * ks
    return _resample_by_arc(np.stack([x, y, z], axis=1))


def _block_mean(a: np.ndarray, factors) -> np.ndarray:
    """Mean over blocks of factors[axis] voxels (a trailing partial block is dropped)."""
    out = a.astype(np.float32, copy=False)
    for axis, f in enumerate(factors):
        if f > 1:
            n = out.shape[axis] // f
            head = (slice(None),) * axis
            total = out[head + (slice(0, n * f, f),)].copy()
            for o in range(1, f):
                total += out[head + (slice(o, n * f, f),)]
            out = total / f
    return out


def _binned(volume: Volume, step: float) -> Volume:
    """The volume averaged over whole blocks of voxels no larger than ``step`` mm."""
    g = volume.geometry
    factors_ijk = [max(1, int(step / s)) for s in g.spacing]
    if max(factors_ijk) == 1:
        return volume
    centre = [(f - 1) / 2 for f in factors_ijk]
    binned = geometry.Geometry(
        tuple(s * f for s, f in zip(g.spacing, factors_ijk, strict=True)),
        tuple(float(c) for c in g.index_to_point(centre)), g.direction)
    return Volume(_block_mean(volume.array, factors_ijk[::-1]), binned, volume.source)


def _midline_penalty(hu: np.ndarray, step: float) -> np.ndarray:
    """[z, x] cost of a column this far from the body's left–right centre."""
    body_columns = (hu > -300).sum(axis=1).astype(float)  # [z, x]
    x = np.arange(hu.shape[2])
    weight = body_columns.sum(axis=1)
    centre = (body_columns * x).sum(axis=1) / np.maximum(weight, 1)
    centre = ndimage.gaussian_filter1d(centre, 10.0 / step, mode="nearest")
    off = np.abs(x[None, :] - centre[:, None]) * step
    return _MIDLINE_COST * np.maximum(0.0, off - _MIDLINE_FREE_MM) / 25.0


def _viterbi(score: np.ndarray, reach: int, cost: float) -> np.ndarray:
    """Best (y, x) per slice maximising summed score minus cost × squared moves."""
    n = score.shape[0]
    acc = score[0].copy()
    moves = np.zeros((n, 2) + score.shape[1:], np.int8)
    for k in range(1, n):
        along_x, moves[k, 1] = _shifted_max(acc, 1, reach, cost)
        acc, moves[k, 0] = _shifted_max(along_x, 0, reach, cost)
        acc += score[k]
    y, x = np.unravel_index(np.argmax(acc), acc.shape)
    path = np.empty((n, 2), int)
    path[-1] = y, x
    for k in range(n - 1, 0, -1):
        y += moves[k, 0, y, x]
        x += moves[k, 1, y, x]
        path[k - 1] = y, x
    return path


def _shifted_max(a: np.ndarray, axis: int, reach: int, cost: float):
    """max over d in [-reach, reach] of a[... + d ...] - cost d², and the best d."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (reach, reach)
    padded = np.pad(a, pad, constant_values=-np.inf)
    best = np.full_like(a, -np.inf)
    arg = np.zeros(a.shape, np.int8)
    for d in range(-reach, reach + 1):
        shifted = np.take(padded, np.arange(reach + d, reach + d + a.shape[axis]), axis=axis)
        candidate = shifted - cost * d * d
        better = candidate > best
        best[better] = candidate[better]
        arg[better] = d
    return best, arg


def _longest_run(mask: np.ndarray) -> slice | None:
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return ndimage.find_objects(labels)[int(np.argmax(sizes))][0]


def _resample_by_arc(points: np.ndarray, step: float = 1.0) -> _Column:
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    s = np.arange(0.0, arc[-1] + 1e-9, step)
    resampled = np.stack([np.interp(s, arc, points[:, c]) for c in range(3)], axis=1)
    tangent = ndimage.gaussian_filter1d(np.gradient(resampled, axis=0),
                                        _CENTRELINE_SIGMA_MM / step, axis=0, mode="nearest")
    return _Column(s, resampled, tangent / np.linalg.norm(tangent, axis=1, keepdims=True))


# ---------------------------------------------------------------- 2. discs


@dataclass(frozen=True)
class _Discs:
    arcs: np.ndarray  # chosen disc centres, arc mm, ascending
    strengths: np.ndarray  # relative to this scan's typical disc
    zone_top_arc: float | None  # top of the sacroiliac zone, if found


def _profile(grid: _Grid, column: _Column) -> np.ndarray:
    """Mean HU of a disc-shaped patch perpendicular to the column, every 1 mm of arc."""
    t = column.tangent
    e1 = np.array([1.0, 0.0, 0.0]) - t[:, :1] * t
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(t, e1)
    g = np.arange(-_PATCH_RADIUS_MM, _PATCH_RADIUS_MM + 1e-9, grid.step)
    u, v = (a.ravel() for a in np.meshgrid(g, g))
    keep = u**2 + v**2 <= _PATCH_RADIUS_MM**2
    u, v = u[keep], v[keep]
    patch = (column.points[:, None, :] + u[None, :, None] * e1[:, None, :]
             + v[None, :, None] * e2[:, None, :])
    return np.clip(grid.sample(patch), *_PROFILE_HU).mean(axis=1)


def _disc_candidates(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dips of the profile: (arc index, strength in HU) = endplate prominence + depth."""
    dips, props = find_peaks(-profile, prominence=0, wlen=2 * _DIP_WINDOW_MM + 1)
    baseline = ndimage.median_filter(profile, size=2 * _BASELINE_MM + 1, mode="nearest")
    depth = np.maximum(baseline[dips] - profile[dips], 0.0)
    return dips, props["prominences"] + depth


def _choose_discs(grid: _Grid, column: _Column, zone_top_arc: float | None) -> _Discs:
    dips, strength = _disc_candidates(_profile(grid, column))
    lo = 0.0 if zone_top_arc is None else zone_top_arc - _L5S1_BELOW_ZONE_TOP_MM
    hi = float(column.arc[-1])
    keep = column.arc[dips] >= lo
    arcs, strength = column.arc[dips][keep], strength[keep]
    if arcs.size == 0:
        return _Discs(arcs, strength, zone_top_arc)
    n_expected = max(1, round((hi - lo) / _GAP_PRIOR_MM))
    typical = float(np.mean(np.sort(strength)[-n_expected:]))
    relative = strength / max(typical, 1e-6)
    chain = _best_chain(arcs, relative, lo, hi)
    return _Discs(arcs[chain], relative[chain], zone_top_arc)


def _best_chain(arcs: np.ndarray, weight: np.ndarray, lo: float, hi: float) -> list[int]:
    """Dynamic programming over (previous, current) disc pairs; returns candidate indices."""
    n = len(arcs)
    gain = weight - _DISC_BIAS
    start = gain - _END_COST_PER_MM * np.maximum(0.0, arcs - lo - _FREE_END_MM)
    end = -_END_COST_PER_MM * np.maximum(0.0, hi - arcs - _FREE_END_MM)
    best: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], tuple[int, int] | None] = {}
    for j in range(n):
        for i in range(j):
            gap = arcs[j] - arcs[i]
            if not DISC_GAP_MM[0] <= gap <= DISC_GAP_MM[1]:
                continue
            options = [(start[i], None)] + [
                (best[(h, i)] - _GAP_RATIO_COST * math.log(gap / (arcs[i] - arcs[h])) ** 2,
                 (h, i)) for h in range(i) if (h, i) in best
            ]
            score, prev = max(options, key=lambda o: o[0])
            best[(i, j)] = score + gain[j] - ((gap - _GAP_PRIOR_MM) / _GAP_PRIOR_SD) ** 2 / 2
            back[(i, j)] = prev
    finals = [(start[j] + end[j], (None, j)) for j in range(n)]
    finals += [(score + end[j], (i, j)) for (i, j), score in best.items()]
    _, pair = max(finals, key=lambda o: o[0])
    chain = [pair[1]]
    while pair[0] is not None:
        chain.append(pair[0])
        pair = back.get(pair) or (None, pair[0])
    return chain[::-1]


# ---------------------------------------------------------------- 3. anchors


def _column_slices(grid: _Grid, column: _Column) -> np.ndarray:
    z = grid.z(np.arange(grid.hu.shape[0]))
    return np.nonzero((z >= column.points[0, 2]) & (z <= column.points[-1, 2]))[0]


def _sacral_zone(grid: _Grid, column: _Column) -> float | None:
    """Arc length at the top of the longest run of slices where bone bridges column to ilia."""
    ks = _column_slices(grid, column)
    z = grid.z(ks)
    cx, cy = column.centre_at_z(z)
    ix = np.round((cx - grid.origin[0]) / grid.step).astype(int)
    iy = np.round((cy - grid.origin[1]) / grid.step).astype(int)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True
    bone = ndimage.gaussian_filter(grid.hu[ks], (0, 1, 1)) > _BRIDGE_HU
    bone = ndimage.binary_closing(bone, in_plane)
    labels, _ = ndimage.label(bone, in_plane)
    boxes = ndimage.find_objects(labels)
    bridged = np.zeros(len(ks), bool)
    for n in range(len(ks)):
        near = labels[n, max(iy[n] - 2, 0) : iy[n] + 3, max(ix[n] - 2, 0) : ix[n] + 3]
        cols = [boxes[lab - 1][2] for lab in np.unique(near[near > 0])]
        if cols:
            left = (max(c.stop for c in cols) - 1 - ix[n]) * grid.step
            right = (ix[n] - min(c.start for c in cols)) * grid.step
            bridged[n] = min(left, right) >= _BRIDGE_REACH_MM
    run = _longest_run(bridged)
    if run is None or (run.stop - run.start) * grid.step < _BRIDGE_MIN_RUN_MM:
        return None
    return column.arc_at_z(float(z[run.stop - 1]))


def _lowest_rib_joint(grid: _Grid, column: _Column, zone_top_arc: float | None
                      ) -> float | None:
    """LPS z of the lowest rib whose medial end reaches the costovertebral region."""
    ks = _column_slices(grid, column)
    z = grid.z(ks)
    cx, cy = column.centre_at_z(z)
    lat = np.abs(grid.axis(2)[None, None, :] - cx[:, None, None])
    ap = grid.axis(1)[None, :, None] - cy[:, None, None]
    band = (lat >= _RIB_MEDIAL_MM) & (ap >= _RIB_BAND_AP_MM[0]) & (ap <= _RIB_BAND_AP_MM[1])
    labels, n = ndimage.label((grid.hu[ks] > _RIB_HU) & band)
    floor = -np.inf if zone_top_arc is None else (
        column.z_at(zone_top_arc) + _RIB_ABOVE_SACRUM_MM)
    joints = []
    for box, lab in zip(ndimage.find_objects(labels), range(1, n + 1), strict=True):
        k, j, i = np.nonzero(labels[box] == lab)
        k, j, i = k + box[0].start, j + box[1].start, i + box[2].start
        side = np.abs(grid.axis(2)[i] - cx[k])
        depth = grid.axis(1)[j] - cy[k]
        neck = (side <= _RIB_NECK_MM) & (depth >= _RIB_NECK_AP_MM[0]) & (
            depth <= _RIB_NECK_AP_MM[1])
        height = (k.max() - k.min()) * grid.step
        if side.max() >= _RIB_REACH_MM and neck.any() and height <= _RIB_MAX_HEIGHT_MM:
            joint = float(np.mean(z[k[neck]]))
            if joint > floor:
                joints.append(joint)
    return min(joints) if joints else None


# ---------------------------------------------------------------- 4. labels, confidence

_VERTEBRAE = ("S1", "L5", "L4", "L3", "L2", "L1") + tuple(f"T{n}" for n in range(12, 0, -1))
_L5S1_TO_T12L1 = 5  # discs from L5/S1 to T12/L1 in a spine with five lumbar vertebrae
_PARTIAL_LEVEL_MM = 35.0  # how far a level cut by the field of view is drawn


def _label(volume: Volume, column: _Column, discs: _Discs, rib_z: float | None
           ) -> Localization:
    arcs = discs.arcs
    zone = discs.zone_top_arc
    sacral = zone is not None and (
        zone - _L5S1_BELOW_ZONE_TOP_MM <= arcs[0] <= zone + _L5S1_ABOVE_ZONE_TOP_MM)
    t12 = None  # index of the T12/L1 disc
    if rib_z is not None:
        t12 = int(np.searchsorted(arcs, column.arc_at_z(rib_z))) - 1
        t12 = t12 if t12 >= 0 else None
    offsets = ([0] if sacral else []) + ([_L5S1_TO_T12L1 - t12] if t12 is not None else [])
    l3_by = [_l3_arc(arcs, offset) for offset in offsets]
    anchors = (_sacral_anchor(column, discs, sacral, l3_by[0] if sacral else None),
               _rib_anchor(column, rib_z, t12, l3_by[-1] if t12 is not None else None))
    if not offsets:
        return _result(volume, column, discs, None, None, LOW, (
            "Neither the sacrum nor a rib-bearing vertebra was found, so the discs cannot "
            "be numbered."), anchors)
    offset, l3_arc = offsets[0], l3_by[0]
    if l3_arc is None:
        return _result(volume, column, discs, offset, None, LOW, (
            "L3 and both of its discs are not all inside the field of view."), anchors)
    confidence, reason = _judge(arcs, discs.strengths, offsets, l3_by, column)
    return _result(volume, column, discs, offset, l3_arc, confidence, reason, anchors,
                   n_lumbar=t12 if (sacral and t12 is not None) else None)


def _l3_arc(arcs: np.ndarray, offset: int) -> float | None:
    """Mid-arc between the L3/L4 and L2/L3 discs when disc k is _VERTEBRAE[k + offset]/…"""
    below = _VERTEBRAE.index("L3") - 1 - offset  # index of the L3/L4 disc
    if below < 0 or below + 1 >= len(arcs):
        return None
    return 0.5 * (arcs[below] + arcs[below + 1])


def _judge(arcs, strengths, offsets, l3_by, column) -> tuple[str, str]:
    if len(offsets) == 2 and offsets[0] != offsets[1]:
        between = _L5S1_TO_T12L1 - offsets[1]  # vertebrae between T12 and the sacrum
        shift = abs(between - _L5S1_TO_T12L1)
        other = "" if l3_by[1] is None else (
            f" Counting down from T12 puts L3 at z = {column.z_at(l3_by[1]):.1f} mm.")
        return LOW, (
            f"Counting up from the sacrum and down from T12 disagree by {shift} "
            f"level{'s' if shift > 1 else ''}: {between} vertebrae lie between T12 and the "
            "sacrum (transitional vertebra, or 4 or 6 lumbar vertebrae). L3 is counted up "
            f"from the sacrum.{other} Review the sagittal preview.")
    irregular = _spacing_problems(arcs, strengths, offsets[0])
    if len(offsets) == 2:
        if irregular:
            return MEDIUM, f"Sacrum and T12 agree, but {irregular}."
        return HIGH, "Counting up from the sacrum and down from T12 agree; disc spacing fits."
    anchor = "up from the sacrum" if offsets[0] == 0 else "down from T12"
    missing = ("no rib-bearing vertebra (T12) was found" if offsets[0] == 0
               else "the sacrum was not found")
    if irregular:
        return LOW, f"Counted {anchor} only ({missing}), and {irregular}."
    return MEDIUM, f"Counted {anchor} only: {missing}, so the count could not be checked."


def _spacing_problems(arcs, strengths, offset: int) -> str:
    """Lumbar disc gaps outside the prior or unlike their neighbours; faint L3 discs."""
    names = [_disc_name(k, offset) for k in range(len(arcs))]
    lumbar = [k for k, name in enumerate(names) if name in _LUMBAR_DISCS]
    gaps = np.diff(arcs[lumbar]) if len(lumbar) > 1 else np.array([])
    problems = []
    if np.any(gaps < LUMBAR_GAP_MM[0]) or np.any(gaps > LUMBAR_GAP_MM[1]):
        problems.append(f"lumbar disc gaps of {gaps.min():.0f}–{gaps.max():.0f} mm fall "
                        f"outside {LUMBAR_GAP_MM[0]:.0f}–{LUMBAR_GAP_MM[1]:.0f} mm")
    ratios = gaps[1:] / gaps[:-1] if gaps.size > 1 else np.array([])
    if np.any(ratios < _LUMBAR_RATIO[0]) or np.any(ratios > _LUMBAR_RATIO[1]):
        problems.append("neighbouring lumbar levels differ in height by more than a third")
    faint = [names[k] for k in range(len(arcs))
             if names[k] in ("L3/L4", "L2/L3") and strengths[k] < 2 * _DISC_BIAS]
    if faint:
        problems.append(f"disc{'s' if len(faint) > 1 else ''} {', '.join(faint)} "
                        "barely visible (placed by the spacing prior)")
    return "; ".join(problems)


_LUMBAR_DISCS = ("L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1")


def _disc_name(k: int, offset: int) -> str:
    below = k + offset
    if below < 0 or below + 1 >= len(_VERTEBRAE):
        return ""
    return f"{_VERTEBRAE[below + 1]}/{_VERTEBRAE[below]}"


def _sacral_anchor(column, discs: _Discs, ok: bool, l3_arc) -> Anchor:
    if discs.zone_top_arc is None:
        return Anchor("sacrum", False, None, None, (
            "No slice where bone runs from the column to both ilia: the sacrum is outside "
            "the field of view or was not recognised."))
    top = column.z_at(discs.zone_top_arc)
    if not ok:
        return Anchor("sacrum", False, top, None, (
            f"The sacroiliac zone ends at z = {top:.1f} mm but no disc lies at its top."))
    return Anchor("sacrum", True, top, _z_or_none(column, l3_arc), (
        f"Bone bridges column and ilia up to z = {top:.1f} mm; the disc there is L5/S1."))


def _rib_anchor(column, rib_z, t12, l3_arc) -> Anchor:
    if rib_z is None:
        return Anchor("rib", False, None, None, (
            "No rib reaches the costovertebral region: T12 is outside the field of view or "
            "its ribs were not recognised."))
    if t12 is None:
        return Anchor("rib", False, rib_z, None, (
            f"A rib joint at z = {rib_z:.1f} mm lies below every disc found."))
    return Anchor("rib", True, rib_z, _z_or_none(column, l3_arc), (
        f"The lowest rib joint, at z = {rib_z:.1f} mm, marks T12."))


def _z_or_none(column: _Column, arc: float | None) -> float | None:
    return None if arc is None else column.z_at(arc)


def _result(volume, column, discs, offset, l3_arc, confidence, reason, anchors,
            n_lumbar=None) -> Localization:
    found = [] if offset is None else list(range(len(discs.arcs)))
    disc_rows = tuple(
        Disc(_disc_name(k, offset), column.z_at(discs.arcs[k]), column.point_at(discs.arcs[k]),
             _source_index(volume, column.z_at(discs.arcs[k])), float(discs.strengths[k]))
        for k in found)
    l3_z = _z_or_none(column, l3_arc)
    return Localization(
        l3_index=None if l3_z is None else _source_index(volume, l3_z), l3_z_mm=l3_z,
        confidence=confidence, reason=reason,
        levels=() if offset is None else _levels(volume, column, discs.arcs, offset),
        discs=disc_rows, anchors=anchors, n_lumbar=n_lumbar,
        centreline_lps=_thin_centreline(column), source=volume.source)


def _levels(volume, column: _Column, arcs: np.ndarray, offset: int) -> tuple[Level, ...]:
    bounds = [(max(0.0, arcs[0] - _PARTIAL_LEVEL_MM), arcs[0], False)]
    bounds += [(lo, hi, True) for lo, hi in zip(arcs[:-1], arcs[1:], strict=True)]
    bounds.append((arcs[-1], min(float(column.arc[-1]), arcs[-1] + _PARTIAL_LEVEL_MM), False))
    levels = []
    for n, (lo, hi, complete) in enumerate(bounds):
        position = n + offset  # vertebra index into _VERTEBRAE
        if hi - lo < 10.0 or not 0 <= position < len(_VERTEBRAE):
            continue
        mid = column.z_at(0.5 * (lo + hi))
        levels.append(Level(_VERTEBRAE[position], column.z_at(lo), column.z_at(hi), mid,
                            column.point_at(0.5 * (lo + hi)), _source_index(volume, mid),
                            complete))
    return tuple(levels)


def _thin_centreline(column: _Column, every_mm: int = 5) -> tuple:
    return tuple(tuple(float(c) for c in p) for p in column.points[::every_mm])


def _nothing(volume: Volume, reason: str, column: _Column | None = None) -> Localization:
    return Localization(None, None, LOW, reason,
                        centreline_lps=() if column is None else _thin_centreline(column),
                        source=volume.source)


# ---------------------------------------------------------------- source slice indices


def _slice_axis_z(volume: Volume) -> tuple[float, float]:
    """LPS z of source slice 0 and the z step per slice along the S–I array axis."""
    unit = np.zeros(3)
    unit[2 - volume.slice_axis] = 1.0
    z0 = float(volume.geometry.index_to_point(np.zeros(3))[2])
    return z0, float(volume.geometry.index_to_point(unit)[2]) - z0


def _source_index(volume: Volume, z_mm: float) -> int | None:
    """Nearest source slice along the S–I array axis (what pick_slice(index=…) takes)."""
    if volume.is_oblique:
        return None
    z0, dz = _slice_axis_z(volume)
    return int(np.clip(round((z_mm - z0) / dz), 0, volume.n_axial_slices - 1))


def _source_z(volume: Volume, index: int) -> float:
    if volume.is_oblique:
        raise InputError(f"{volume.source or 'The volume'} is oblique, so a slice index is "
                         "ambiguous; give the chosen slice as z in mm.")
    if not 0 <= index < volume.n_axial_slices:
        raise InputError(f"Slice index {index} is out of range 0..{volume.n_axial_slices - 1}.")
    z0, dz = _slice_axis_z(volume)
    return z0 + index * dz


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value
