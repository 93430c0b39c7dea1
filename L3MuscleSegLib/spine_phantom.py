"""Seeded synthetic CT of the lower spine with known vertebral levels, for the L3 localiser.

The column is built along a curved centreline parametrised by arc length: the sacrum
(S4–S1, fused, with alae), the lumbar vertebrae, T12 and the thoracic vertebrae above it.
Every vertebra has a body (cancellous bone in a cortical shell with endplates), a spinal
canal, pedicles, laminae, a spinous process and transverse processes; discs sit between
bodies, perpendicular to the centreline, so lordosis tilts them in axial slices (L5/S1 by
about 30°). Ribs articulate with T12 and every vertebra above it and run laterally,
backwards and then forwards round the body wall, sloping down, so the tips of the lower
ribs hang below their own vertebra. The iliac wings meet the sacral alae at the
sacroiliac joints (a 3.5 mm gap) and rise, clear of the column, to the crest at the mid
height of the second-lowest lumbar vertebra (L4). A contrast-filled aorta, enhancing
kidneys and bowel gas are the distractors. HU are realistic; noise is Gaussian.

The truth can be checked by hand: heights come from the tables below (:data:`_LUMBAR`,
lowest row first), so in the default spine the L3/L4 and L2/L3 disc centres lie
``10 / 2 + 28 + 10 / 2 = 38`` mm of arc apart, and the centreline is placed with the L3
body centre at z = 0. The seed only moves the bowel gas and the noise.

Geometry: LPS millimetres, axial slices, identity direction; reorient the returned
:class:`~L3MuscleSegLib.geometry.Volume` with SimpleITK to test other axis orders. Each
slice averages sub-slices at most 1.5 mm apart, as a CT slice integrates over its thickness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Geometry, Volume

# Lumbar vertebrae from the lowest up: (body half-width, half-depth, body height, height of
# the disc below, transverse-process reach from the centreline), mm.
_LUMBAR = (
    (25.0, 17.0, 27.0, 11.0, 50.0),
    (24.0, 17.0, 28.0, 11.0, 48.0),
    (23.0, 16.0, 28.0, 10.0, 52.0),
    (22.0, 16.0, 27.0, 10.0, 45.0),
    (21.0, 15.0, 26.0, 9.0, 40.0),
    (21.0, 15.0, 26.0, 9.0, 38.0),
)
# T12 upwards: (half-width, half-depth, body height, height of the disc below, rib length).
_THORACIC = (
    (19.0, 15.0, 24.0, 8.0, 120.0),
    (18.0, 14.0, 23.0, 7.0, 180.0),
    (18.0, 14.0, 22.0, 6.0, 230.0),
    (17.0, 14.0, 21.0, 6.0, 270.0),
    (17.0, 13.0, 20.0, 6.0, 300.0),
)
# S4 upwards: (half-width, half-depth, segment height).
_SACRUM = ((11.0, 8.0, 18.0), (14.0, 10.0, 22.0), (18.0, 13.0, 26.0), (24.0, 17.0, 30.0))
# Sagittal tilt of the centreline from vertical (positive: rising forwards), by level.
_TILT_DEG = (("S4", 55.0), ("S1", 38.0), ("lowest", 18.0), ("L3", 0.0), ("L1", -10.0),
             ("T12", -12.0), ("T8", -8.0))

HU_AIR, HU_FAT, HU_SOFT, HU_CSF = -1000.0, -100.0, 40.0, 15.0
HU_DISC, HU_CANCELLOUS, HU_CORTEX, HU_ARCH = 85.0, 170.0, 550.0, 480.0
HU_SACRUM, HU_REMNANT, HU_ILIUM, HU_RIB = 230.0, 150.0, 420.0, 450.0
HU_AORTA, HU_KIDNEY, HU_GAS = 180.0, 160.0, -900.0

_BODY, _DISC, _SACRAL, _FUSED = 0, 1, 2, 3
_ALA_HALF_WIDTH, _SI_GAP, _ILIUM_HALF_THICKNESS = 52.0, 3.5, 4.0
_RIB_RADIUS, _RIB_SLOPE = 4.5, 0.45  # mm; drop per mm along the shaft
_OUTLINE = (170.0, 140.0, 10.0)  # body semi-axes x, y and centre y, mm
_FAT_MM = 15.0
_CHUNK = 32  # sub-slices drawn at a time


@dataclass(frozen=True)
class SpinePhantomSpec:
    """What to draw. The field of view ends at the mid-heights of the two named levels."""

    n_lumbar: int = 5
    sacralised: bool = False  # lowest lumbar fused to the sacrum: no disc, winged
    scoliosis_mm: float = 0.0  # peak lateral shift of the column, at L3
    slice_mm: float = 3.0
    pixel_mm: float = 2.5
    fov_bottom: str = "S3"
    fov_top: str = "T10"
    noise_hu: float = 15.0
    seed: int = 0


@dataclass(frozen=True)
class SpinePhantom:
    """A phantom CT and its truth; every z is LPS mm on the centreline."""

    volume: Volume
    spec: SpinePhantomSpec
    discs: dict  # "L2/L3" -> z of the disc centre (a fused L5/S1 too)
    levels: dict  # "L3" -> (z of the disc centre below, z of the disc centre above)
    l3_z_mm: float  # midway, in arc length, between the L3/L4 and L2/L3 disc centres


@dataclass(frozen=True)
class _Segment:
    name: str
    kind: int
    lo: float  # arc length of the lower boundary, mm
    hi: float
    half_width: float
    half_depth: float
    reach: float = 0.0  # lumbar transverse processes
    rib_length: float = 0.0
    wings: tuple[float, float] = (0.0, -1.0)  # height fractions carrying sacral alae

    @property
    def mid(self) -> float:
        return 0.5 * (self.lo + self.hi)


def spine_phantom(spec: SpinePhantomSpec = SpinePhantomSpec()) -> SpinePhantom:
    """Draw the phantom that ``spec`` describes."""
    rng = np.random.default_rng(spec.seed)
    segments = _segments(spec)
    line = _Centreline(segments, spec)
    z_first = line.z_at(_find(segments, spec.fov_bottom).mid)
    z_last = line.z_at(_find(segments, spec.fov_top).mid)
    n_slices = int((z_last - z_first) // spec.slice_mm) + 1
    n_sub = int(np.ceil(spec.slice_mm / 1.5))
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * spec.slice_mm
    z_fine = (z_first + spec.slice_mm * np.arange(n_slices)[:, None] + offsets).ravel()
    x = np.arange(-180.0, 180.0 + 1e-6, spec.pixel_mm)
    y = np.arange(-135.0, 160.0 + 1e-6, spec.pixel_mm)
    fine = _Scene(segments, line, spec, rng).draw(z_fine, y, x)
    image = fine.reshape(n_slices, n_sub, y.size, x.size).mean(axis=1)
    image += rng.normal(0.0, spec.noise_hu, image.shape).astype(np.float32)
    geometry = Geometry((spec.pixel_mm, spec.pixel_mm, spec.slice_mm),
                        (float(x[0]), float(y[0]), float(z_first)),
                        tuple(float(v) for v in np.eye(3).ravel()))
    discs, levels, l3 = _truth(segments, line)
    return SpinePhantom(Volume(image, geometry, source=f"spine phantom {spec}"), spec,
                        discs, levels, l3)


# ---------------------------------------------------------------- the level table


def _segments(spec: SpinePhantomSpec) -> list[_Segment]:
    """Sacral segments, discs and vertebrae from S4 up, with their arc-length ranges."""
    if not 4 <= spec.n_lumbar <= 6:
        raise ValueError(f"n_lumbar={spec.n_lumbar}: draw 4, 5 or 6 lumbar vertebrae.")
    wings = {"S2": (0.5, 1.0), "S1": (0.0, 1.0)}
    rows = [dict(name=f"S{4 - i}", kind=_SACRAL, h=h, hw=hw, hd=hd,
                 wings=wings.get(f"S{4 - i}", (0.0, -1.0)))
            for i, (hw, hd, h) in enumerate(_SACRUM)]
    below = "S1"
    for i, (hw, hd, h, disc_h, reach) in enumerate(_LUMBAR[: spec.n_lumbar]):
        name = f"L{spec.n_lumbar - i}"
        fused = spec.sacralised and i == 0
        rows.append(dict(name=f"{name}/{below}", kind=_FUSED if fused else _DISC, h=disc_h,
                         hw=hw, hd=hd, wings=(0.0, 1.0) if fused else (0.0, -1.0)))
        rows.append(dict(name=name, kind=_BODY, h=h, hw=hw, hd=hd, reach=reach,
                         wings=(0.0, 0.7) if fused else (0.0, -1.0)))
        below = name
    for i, (hw, hd, h, disc_h, rib) in enumerate(_THORACIC):
        name = f"T{12 - i}"
        rows.append(dict(name=f"{name}/{below}", kind=_DISC, h=disc_h, hw=hw, hd=hd))
        rows.append(dict(name=name, kind=_BODY, h=h, hw=hw, hd=hd, rib_length=rib))
        below = name
    segments, lo = [], 0.0
    for row in rows:
        h = row.pop("h")
        segments.append(_Segment(row.pop("name"), row.pop("kind"), lo, lo + h,
                                 row.pop("hw"), row.pop("hd"), **row))
        lo += h
    return segments


def _find(segments: list[_Segment], name: str) -> _Segment:
    for seg in segments:
        if seg.name == name:
            return seg
    raise ValueError(f"No level {name!r} in this phantom; use one of "
                     f"{[s.name for s in segments if s.kind in (_BODY, _SACRAL)]}.")


def _lumbar(segments: list[_Segment], from_bottom: int) -> _Segment:
    return [s for s in segments if s.kind == _BODY and s.name.startswith("L")][from_bottom]


def _truth(segments: list[_Segment], line: _Centreline) -> tuple[dict, dict, float]:
    boundaries = [s for s in segments if s.kind in (_DISC, _FUSED)]
    discs = {s.name: line.z_at(s.mid) for s in boundaries}
    levels = {}
    for below, above in zip(boundaries, boundaries[1:], strict=False):
        levels[above.name.split("/")[1]] = (discs[below.name], discs[above.name])
    l3_arc = 0.5 * (_find(segments, "L3/L4").mid + _find(segments, "L2/L3").mid)
    return discs, levels, line.z_at(l3_arc)


# ---------------------------------------------------------------- the centreline


class _Centreline:
    """Arc length → LPS point, with lordosis, sacral tilt and an optional scoliotic shift."""

    def __init__(self, segments: list[_Segment], spec: SpinePhantomSpec):
        lowest = _lumbar(segments, 0).mid
        arcs = [lowest if name == "lowest" else _find(segments, name).mid
                for name, _ in _TILT_DEG]
        self.a = np.arange(0.0, segments[-1].hi + 0.5, 0.5)
        tilt = np.radians(np.interp(self.a, arcs, [deg for _, deg in _TILT_DEG]))
        y = np.concatenate([[0.0], np.cumsum(-np.sin(tilt[:-1]) * 0.5)])
        z = np.concatenate([[0.0], np.cumsum(np.cos(tilt[:-1]) * 0.5)])
        l3 = _find(segments, "L3").mid
        x = spec.scoliosis_mm * np.exp(-(((self.a - l3) / 80.0) ** 2))
        i3 = int(np.searchsorted(self.a, l3))
        self.xyz = np.stack([x, y - y[i3] + 30.0, z - z[i3]], axis=1)
        tangent = np.gradient(self.xyz, axis=0)
        self.tangent = tangent / np.linalg.norm(tangent, axis=1, keepdims=True)

    def z_at(self, arc: float) -> float:
        return float(np.interp(arc, self.a, self.xyz[:, 2]))

    def point_at(self, arc: float) -> np.ndarray:
        return np.array([np.interp(arc, self.a, self.xyz[:, c]) for c in range(3)])

    def at_z(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arc length, centre point and unit tangent where the centreline crosses each z."""
        arc = np.interp(z, self.xyz[:, 2], self.a)
        centre = np.stack([np.interp(arc, self.a, self.xyz[:, c]) for c in range(3)], 1)
        tangent = np.stack([np.interp(arc, self.a, self.tangent[:, c]) for c in range(3)], 1)
        return arc, centre, tangent / np.linalg.norm(tangent, axis=1, keepdims=True)


# ---------------------------------------------------------------- drawing


class _Scene:
    def __init__(self, segments, line: _Centreline, spec: SpinePhantomSpec, rng):
        self.segments, self.line, self.spec = segments, line, spec
        self.table = {f: np.array([getattr(s, f) for s in segments], float)
                      for f in ("kind", "lo", "hi", "half_width", "half_depth", "reach")}
        self.table["wing_lo"] = np.array([s.wings[0] for s in segments])
        self.table["wing_hi"] = np.array([s.wings[1] for s in segments])
        self.bounds = np.array([s.lo for s in segments] + [segments[-1].hi])
        self.gas = [(rng.uniform(-100, 100), rng.uniform(-115, -40), rng.uniform(-120, 120),
                     rng.uniform(10, 22)) for _ in range(8)]

    def draw(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.empty((z.size, y.size, x.size), np.float32)
        out[:] = _outline(y, x)
        arc, centre, tangent = self.line.at_z(z)
        for start in range(0, z.size, _CHUNK):
            part = slice(start, start + _CHUNK)
            c = centre[part]
            rows = _index_range(y, c[:, 1].min() - 50, c[:, 1].max() + 85)
            cols = _index_range(x, c[:, 0].min() - 80, c[:, 0].max() + 80)
            self._column(out[part, rows, cols], arc[part], c, tangent[part],
                         y[rows, None], x[None, cols])
        self._pelvis(out, z, y, x)
        l1 = self.line.point_at(_find(self.segments, "L1").mid)
        for side in (-1, 1):
            _paint_ellipsoid(out, z, y, x, (side * 78.0, l1[1], l1[2]), (28, 20, 55),
                             HU_KIDNEY)
        for gx, gy, gz, r in self.gas:
            _paint_ellipsoid(out, z, y, x, (gx, gy, gz), (r, r, r), HU_GAS)
        self._ribs(out, z, y, x)
        return out

    def _column(self, img: np.ndarray, arc, centre, t, Y, X) -> None:
        """Vertebrae, discs, sacrum and the aorta in one window of sub-slices."""
        sh = (-1, 1, 1)
        rx, ry = X - centre[:, 0].reshape(sh), Y - centre[:, 1].reshape(sh)
        z_aorta = self.line.z_at(_lumbar(self.segments, 1).mid)
        aorta = ((rx - 20) ** 2 + (ry + 32) ** 2 <= 144) & (centre[:, 2] >= z_aorta).reshape(sh)
        img[aorta] = HU_AORTA
        tx, ty, tz = (t[:, c].reshape(sh) for c in range(3))
        A = arc.reshape(sh) + rx * tx + ry * ty  # arc length of the voxel's disc plane
        norm = np.sqrt(1 - tx**2)  # u, v: the voxel in its disc plane, left and back
        u = (rx * (1 - tx**2) - ry * tx * ty) / norm
        v = ry * tz / norm
        seg = np.clip(np.searchsorted(self.bounds, A, side="right") - 1, 0,
                      len(self.segments) - 1)
        inside = (A >= 0) & (self.bounds[-1] >= A)
        f = {k: col[seg] for k, col in self.table.items()}
        kind, hw, hd = f["kind"], f["half_width"], f["half_depth"]
        frac = (A - f["lo"]) / (f["hi"] - f["lo"])
        e = (u / hw) ** 2 + (v / hd) ** 2
        body, sacral = inside & (kind == _BODY), inside & ((kind == _SACRAL) | (kind == _FUSED))
        img[inside & (kind == _DISC) & (e <= 1.1)] = HU_DISC
        v0 = hd + 9.0  # canal centre
        ring = np.sqrt(u**2 + (v - v0) ** 2)
        img[inside & (ring <= 8) & ~sacral] = HU_CSF
        au = np.abs(u)
        arch = (
            ((au >= 8) & (au <= 14) & (v >= hd - 3) & (v <= v0) & (frac >= 0.35) & (frac <= 0.9))
            | ((ring > 8) & (ring <= 14) & (v >= v0) & (frac >= 0.15) & (frac <= 0.85))
            | ((au <= 3.5) & (v >= v0 + 12) & (v <= v0 + 45) & (frac >= 0.05) & (frac <= 0.6))
        )
        lumbar_tp = (f["reach"] > 0) & (au >= 12) & (au <= f["reach"]) & (
            np.abs(v - v0 + 2) <= 4.5) & (frac >= 0.45) & (frac <= 0.8)
        thoracic_tp = (f["reach"] == 0) & (au >= 12) & (au <= 30) & (
            np.abs(v - v0 - 4) <= 4.5) & (frac >= 0.55) & (frac <= 0.85)
        img[body & (arch | lumbar_tp | thoracic_tp)] = HU_ARCH
        in_body = body & (e <= 1)
        img[in_body] = HU_CANCELLOUS
        shell = (e > (1 - 2.0 / hd) ** 2) | (A - f["lo"] < 1.5) | (f["hi"] - A < 1.5)
        img[in_body & shell] = HU_CORTEX
        self._sacrum(img, sacral, body, u, v, e, A, f, frac)

    def _sacrum(self, img, sacral, body, u, v, e, A, f, frac) -> None:
        hd = f["half_depth"]
        plate = sacral & (np.abs(u) <= 24) & (v >= hd + 3) & (v <= hd + 19)
        img[plate] = HU_ARCH
        img[sacral & (u**2 + (v - hd - 9) ** 2 <= 36)] = HU_CSF
        ala = (np.abs(u) <= _ALA_HALF_WIDTH) & (v >= -6) & (v <= 22)
        ala &= (frac >= f["wing_lo"]) & (frac <= f["wing_hi"])
        img[(sacral | body) & ala] = HU_SACRUM
        img[sacral & (e <= 1)] = HU_SACRUM
        img[sacral & (e <= 1) & (A - f["lo"] < 1.5)] = HU_REMNANT

    def _pelvis(self, out: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        """Iliac wings: a plate from the sacroiliac joint forwards and outwards, per side."""
        top = max((s for s in self.segments if s.wings[1] > 0), key=lambda s: s.lo)
        z_top = self.line.z_at(top.lo + top.wings[1] * (top.hi - top.lo) - 2.0)
        z_low = self.line.z_at(_find(self.segments, "S2").mid)
        z_crest = self.line.z_at(_lumbar(self.segments, 1).mid)
        z_end = self.line.z_at(_find(self.segments, "S4").mid) - 10.0
        _, ref, _ = self.line.at_z(np.clip(z, z_low, z_top))
        _, centre, _ = self.line.at_z(z)
        medial = _ALA_HALF_WIDTH + _SI_GAP + _ILIUM_HALF_THICKNESS
        r = _ILIUM_HALF_THICKNESS
        for k in np.nonzero((z >= z_end) & (z <= z_crest))[0]:
            drift = 1.1 * max(0.0, z[k] - z_top) + 1.0 * max(0.0, z_low - z[k])
            for side in (-1, 1):
                m = (centre[k, 0] + side * (medial + drift), ref[k, 1] + 8.0)
                q = (centre[k, 0] + side * (125.0 + 0.2 * (z[k] - z_low)), ref[k, 1] - 70.0)
                rows = _index_range(y, min(m[1], q[1]) - r, max(m[1], q[1]) + r)
                cols = _index_range(x, min(m[0], q[0]) - r, max(m[0], q[0]) + r)
                near = _distance_to_segment(x[None, cols], y[rows, None], m, q) <= r
                out[k, rows, cols][near] = HU_ILIUM

    def _ribs(self, out: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        for seg in self.segments:
            if seg.rib_length <= 0:
                continue
            for side in (-1, 1):
                path = _rib_path(self.line, seg, side)
                for p, q in zip(path[:-1], path[1:], strict=True):
                    _paint_capsule(out, z, y, x, p, q, _RIB_RADIUS, HU_RIB)


def _rib_path(line: _Centreline, seg: _Segment, side: int) -> np.ndarray:
    """Points every ~4 mm from the rib head, through the tubercle, round the body wall."""
    head_arc = seg.lo + 0.7 * (seg.hi - seg.lo)
    c = line.point_at(head_arc)
    hd = seg.half_depth
    head = c + [side * (seg.half_width - 1.0), 0.4 * hd, 0.0]
    tubercle = c + [side * 32.0, hd + 13.0, -3.0]
    semi_y = hd + 78.0
    phi0 = np.arcsin(40.0 / 135.0)
    length = seg.rib_length - np.linalg.norm(tubercle - head)
    phis, points, walked = [phi0], [], 0.0
    while walked < length:
        phi = phis[-1]
        step = 4.0 / np.hypot(135 * np.cos(phi), semi_y * np.sin(phi))
        phis.append(phi + step)
        walked += 4.0
    for n, phi in enumerate(phis):
        points.append([c[0] + side * 135.0 * np.sin(phi), c[1] - 60.0 + semi_y * np.cos(phi),
                       tubercle[2] - _RIB_SLOPE * 4.0 * n])
    return np.vstack([head, tubercle, np.array(points)])


def _outline(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Air, subcutaneous fat and soft tissue of one axial slice."""
    a, b, yc = _OUTLINE
    X, Y = x[None, :], y[:, None] - yc
    outer = (X / a) ** 2 + (Y / b) ** 2 <= 1
    inner = (X / (a - _FAT_MM)) ** 2 + (Y / (b - _FAT_MM)) ** 2 <= 1
    return np.where(inner, HU_SOFT, np.where(outer, HU_FAT, HU_AIR)).astype(np.float32)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """The slice of a sorted coordinate axis that lies within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, "right")))


def _paint_ellipsoid(out, z, y, x, centre, semi, hu) -> None:
    box = [_index_range(axis, c - s, c + s) for axis, c, s in zip((z, y, x), centre[::-1],
                                                                   semi[::-1], strict=True)]
    Z, Y, X = z[box[0], None, None], y[None, box[1], None], x[None, None, box[2]]
    inside = (((X - centre[0]) / semi[0]) ** 2 + ((Y - centre[1]) / semi[1]) ** 2
              + ((Z - centre[2]) / semi[2]) ** 2) <= 1
    out[box[0], box[1], box[2]][inside] = hu


def _distance_to_segment(X, Y, p, q) -> np.ndarray:
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((X - p[0]) * dx + (Y - p[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(X - p[0] - t * dx, Y - p[1] - t * dy)


def _paint_capsule(out, z, y, x, p, q, radius, hu) -> None:
    """Set every voxel within ``radius`` of the segment p–q (LPS mm) to ``hu``."""
    lo, hi = np.minimum(p, q) - radius, np.maximum(p, q) + radius
    ks = np.nonzero((z >= lo[2]) & (z <= hi[2]))[0]
    js = np.nonzero((y >= lo[1]) & (y <= hi[1]))[0]
    is_ = np.nonzero((x >= lo[0]) & (x <= hi[0]))[0]
    if not (ks.size and js.size and is_.size):
        return
    Z, Y, X = np.meshgrid(z[ks], y[js], x[is_], indexing="ij")
    d = q - p
    t = np.clip(((X - p[0]) * d[0] + (Y - p[1]) * d[1] + (Z - p[2]) * d[2]) / (d @ d), 0, 1)
    dist2 = (X - p[0] - t * d[0]) ** 2 + (Y - p[1] - t * d[1]) ** 2 + (Z - p[2] - t * d[2]) ** 2
    block = out[ks[0] : ks[-1] + 1, js[0] : js[-1] + 1, is_[0] : is_[-1] + 1]
    block[dist2 <= radius * radius] = hu
