"""Seeded synthetic axial CT slices at L3 ("phantoms") for tests, the demo model and docs.

Every phantom is drawn from ``np.random.default_rng(seed)`` only, so a seed always gives
the same slice. Slices are in the canonical orientation of :mod:`.geometry`: rows run
anterior → posterior, columns patient right → left.

What is drawn, from the outside in: air (-1000 HU), skin, subcutaneous fat, the abdominal
wall muscle band (rectus either side of the linea alba, the three oblique layers with fat
planes between them; label 3), visceral fat with bowel loops, colon, an optional liver tip,
kidneys in perirenal fat, aorta and IVC, the psoas pair beside the vertebral body (label
1), erector spinae and quadratus lumborum behind and lateral to the posterior elements
(label 2), the vertebra (cortex, cancellous bone, pedicles and lamina, spinal canal,
spinous and transverse processes) and the CT table. Muscles carry thin intermuscular fat
streaks that stay inside their label, so IMAT can be measured within it. Kidneys, collapsed
bowel, vessels and ascites have muscle-like HU and label 0: the hard negatives.

Shapes are ellipses and superellipses whose radii wobble with a few low-frequency
harmonics. Shape, size, position and rotation of everything, the body habitus, muscle HU
and image noise (10–20 HU, slightly correlated as in CT) vary with the seed.

Pixel spacing: 512 × 512 slices get 0.6–1.0 mm (field of view 307–512 mm) as in clinical
CT. Other sizes get a field of view of 350–450 mm, i.e. spacing = fov / size (about
1.4–1.8 mm for the default 256). Bodies too wide for the field of view are scaled down.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .geometry import Geometry, Volume
from .labels import ABDOMINAL_WALL, PARASPINAL, PSOAS

AIR_HU = -1000.0
_FAT_HU = (-110.0, -85.0)
_MUSCLE_HU = (38.0, 56.0)
_LUT_SIZE = 1440  # angular resolution of the body-layer radius functions


@dataclass(frozen=True)
class PhantomSlice:
    """A synthetic axial slice: HU image, reference labels (0..3), spacing (row, col) mm."""

    image: np.ndarray  # float32 [rows, cols]
    labels: np.ndarray  # uint8 [rows, cols]
    spacing_mm: tuple[float, float]


@dataclass(frozen=True)
class _Blob:
    """One (super)ellipse painted in body-frame mm (x → patient left, y → posterior)."""

    cx: float
    cy: float
    a: float  # half-axis along the blob's own x
    b: float
    hu: float
    label: int = 0
    angle: float = 0.0  # radians
    power: float = 2.0  # 2: ellipse; larger: boxier
    wobble: tuple[tuple[int, float, float], ...] = ()  # (harmonic, amplitude, phase)
    halo_mm: float = 0.0  # fat rim painted first, so neighbours stay separable
    halo_hu: float = -100.0
    wall_mm: float = 0.0  # > 0: hollow; the inside gets lumen_hu (bowel, cortical bone)
    lumen_hu: float = 0.0
    streaks: tuple[tuple[float, float, float], ...] = ()  # (offset fraction, angle, mm)
    streak_hu: float = -70.0
    in_cavity: bool = False  # clip to the abdominal cavity (viscera)
    drift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # dx, dy, dscale per mm of z

    def at(self, dz_mm: float) -> _Blob:
        if dz_mm == 0:
            return self
        dx, dy, ds = self.drift
        grow = max(0.5, 1.0 + ds * dz_mm)
        return replace(self, cx=self.cx + dx * dz_mm, cy=self.cy + dy * dz_mm,
                       a=self.a * grow, b=self.b * grow)


@dataclass(frozen=True)
class _Body:
    """Body outline and the layers under the skin, as radius functions of the angle."""

    half_width: float
    half_depth_front: float
    half_depth_back: float
    power: float
    outline_wobble: tuple[tuple[int, float, float], ...]
    skin_mm: float
    skin_hu: float
    fat_front: float  # subcutaneous fat thickness, mm
    fat_side: float
    fat_back: float
    fat_wobble: tuple[tuple[int, float, float], ...]
    fat_hu: float
    visceral_fat_hu: float
    rectus_mm: float
    oblique_mm: float
    wall_end: float  # radians from anterior where the abdominal wall muscles end
    linea_alba_mm: float
    wall_hu: float
    ascites_mm: float  # 0: no ascites
    ascites_hu: float
    ascites_back: float = -np.inf  # fluid also fills the cavity in front of this y (mm)


@dataclass(frozen=True)
class _Anatomy:
    body: _Body
    blobs: tuple[_Blob, ...]
    offset_mm: tuple[float, float]  # body centre relative to the image centre
    rotation: float
    table_gap_mm: float
    noise_hu: float


# ---------------------------------------------------------------- public API


def make_phantom_slice(seed: int, size: int = 256, spacing_mm: float | None = None,
                       ascites: bool = False) -> PhantomSlice:
    """A synthetic axial L3 slice, ``size`` × ``size`` pixels, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng, ascites)
    spacing = _pick_spacing(rng, size) if spacing_mm is None else float(spacing_mm)
    return _render(anatomy, size, spacing, 0.0, rng)


def make_phantom_volume(seed: int, n_slices: int = 5, size: int = 256, slice_mm: float = 3.0
                        ) -> tuple[Volume, np.ndarray]:
    """A small CT volume [k, j, i] whose middle slice is ``make_phantom_slice(seed, size)``.

    Neighbouring slices show the same anatomy slightly changed (muscles grow or shrink,
    bowel moves) with their own noise. The grid is LPS with identity direction, so array
    index k runs inferior → superior, j anterior → posterior and i right → left. Returns
    the volume and its label array of the same shape.
    """
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng, False)
    spacing = _pick_spacing(rng, size)
    middle = n_slices // 2
    slices = [
        _render(anatomy, size, spacing, 0.0, rng) if k == middle
        else _render(anatomy, size, spacing, (k - middle) * slice_mm,
                     np.random.default_rng([seed, k]))
        for k in range(n_slices)
    ]
    half_fov = spacing * (size - 1) / 2
    geometry = Geometry(
        (spacing, spacing, float(slice_mm)),
        (-half_fov, -half_fov, -300.0 - middle * slice_mm),  # L3 sits ~30 cm below the heart
        tuple(float(v) for v in np.eye(3).ravel()),
    )
    image = np.stack([s.image for s in slices])
    labels = np.stack([s.labels for s in slices])
    return Volume(image, geometry, source=f"phantom seed {seed}"), labels


# ---------------------------------------------------------------- drawing the anatomy


def _pick_spacing(rng: np.random.Generator, size: int) -> float:
    if size == 512:
        return float(rng.uniform(0.6, 1.0))
    return float(rng.uniform(350.0, 450.0)) / size


def _wobble(rng, amplitude: float, harmonics=(2, 3, 4, 5)) -> tuple:
    return tuple((k, float(rng.normal(0, amplitude)), float(rng.uniform(0, 2 * np.pi)))
                 for k in harmonics)


def _streaks(rng, count_max: int) -> tuple:
    return tuple((float(rng.uniform(-0.6, 0.6)), float(rng.uniform(0, np.pi)),
                  float(rng.uniform(0.8, 1.6)))
                 for _ in range(int(rng.integers(0, count_max + 1))))


def _drift(rng, move: float = 0.05, grow: float = 0.004) -> tuple[float, float, float]:
    return (float(rng.normal(0, move)), float(rng.normal(0, move)), float(rng.normal(0, grow)))


def _draw_anatomy(rng: np.random.Generator, ascites: bool) -> _Anatomy:
    body = _draw_body(rng, ascites)
    muscle_hu = float(rng.uniform(*_MUSCLE_HU))
    spine, muscles = _draw_spine_and_muscles(rng, body, muscle_hu)
    viscera = _draw_viscera(rng, body, spine)
    if rng.random() < 0.5 and ascites:  # large ascites: bowel floats in fluid
        body = replace(body, ascites_back=spine.body_front - 5)
    return _Anatomy(
        body=body,
        blobs=viscera + muscles + spine.bones,
        offset_mm=(float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))),
        rotation=float(np.deg2rad(rng.uniform(-6, 6))),
        table_gap_mm=float(rng.uniform(5, 25)),
        noise_hu=float(rng.uniform(10, 20)),
    )


def _draw_body(rng, ascites: bool) -> _Body:
    front = float(rng.uniform(95, 130))
    return _Body(
        half_width=float(rng.uniform(125, 175)),
        half_depth_front=front,
        half_depth_back=float(rng.uniform(85, 110)),
        power=float(rng.uniform(2.1, 2.8)),
        outline_wobble=_wobble(rng, 0.015),
        skin_mm=float(rng.uniform(1.5, 2.5)),
        skin_hu=float(rng.uniform(10, 50)),
        fat_front=float(rng.uniform(8, 0.3 * front)),
        fat_side=float(rng.uniform(8, 35)),
        fat_back=float(rng.uniform(8, 30)),
        fat_wobble=_wobble(rng, 0.08),
        fat_hu=float(rng.uniform(*_FAT_HU)),
        visceral_fat_hu=float(rng.uniform(*_FAT_HU)),
        rectus_mm=float(rng.uniform(8, 14)),
        oblique_mm=float(rng.uniform(9, 16)),
        wall_end=float(np.deg2rad(rng.uniform(105, 125))),
        linea_alba_mm=float(rng.uniform(4, 12)),
        wall_hu=float(rng.uniform(*_MUSCLE_HU)),
        ascites_mm=float(rng.uniform(10, 35)) * ascites,  # drawn either way: same anatomy
        ascites_hu=float(rng.uniform(5, 18)),
    )


@dataclass(frozen=True)
class _Spine:
    bones: tuple[_Blob, ...]
    body_front: float  # y of the vertebral body's anterior edge
    canal_y: float
    psoas_outer_x: float  # |x| of the psoas' lateral edges


def _draw_spine_and_muscles(rng, body: _Body, muscle_hu: float
                            ) -> tuple[_Spine, tuple[_Blob, ...]]:
    back = _fat_inner_radius(body, np.pi)  # posterior edge of the paraspinals
    es_a, es_b = rng.uniform(20, 28), rng.uniform(19, 26)
    canal_a, canal_b = rng.uniform(10, 13), rng.uniform(8, 10)
    canal_y = back - 2 * es_b + rng.uniform(2, 6)
    vb_a, vb_b = rng.uniform(21, 27), rng.uniform(15, 19)
    vb_y = canal_y - canal_b - vb_b - 1
    tp_len = rng.uniform(25, 35)
    ps_a, ps_b = rng.uniform(12, 19), rng.uniform(14, 21)
    ps_x = vb_a + 0.75 * ps_a
    cortex_hu = rng.uniform(700, 1000)
    bone_hu = rng.uniform(500, 800)

    def f(v) -> float:
        return float(v)

    bones = (
        _Blob(0.0, f(canal_y), f(canal_a + 6), f(canal_b + 6), f(bone_hu), power=2.3),
        _Blob(0.0, f(vb_y), f(vb_a), f(vb_b), f(cortex_hu), power=f(rng.uniform(2.2, 2.8)),
              wobble=_wobble(rng, 0.02), wall_mm=f(rng.uniform(1.8, 3.0)),
              lumen_hu=f(rng.uniform(150, 260)), drift=_drift(rng, 0.02, 0.002)),
        _Blob(0.0, f(canal_y), f(canal_a), f(canal_b), f(rng.uniform(5, 25))),
        _Blob(0.0, f((canal_y + canal_b + back - 4) / 2), f(rng.uniform(2.5, 4)),
              f((back - 4 - canal_y - canal_b) / 2 + 2), f(bone_hu), power=3.0),
    ) + tuple(
        _Blob(f(side * (canal_a + 4 + tp_len / 2)), f(canal_y - 2), f(tp_len / 2),
              f(rng.uniform(3, 5)), f(bone_hu), angle=f(side * np.deg2rad(rng.uniform(0, 15))),
              power=2.5)
        for side in (-1, 1)
    )
    muscles = []
    for side in (-1, 1):
        hu = muscle_hu + rng.normal(0, 3)
        muscles += [
            _Blob(f(side * ps_x), f(vb_y + rng.uniform(-4, 4)), f(ps_a * rng.uniform(0.9, 1.1)),
                  f(ps_b * rng.uniform(0.9, 1.1)), f(hu), PSOAS.value,
                  angle=f(side * np.deg2rad(rng.uniform(-20, 20))), wobble=_wobble(rng, 0.05),
                  halo_mm=f(rng.uniform(1.5, 3)), streaks=_streaks(rng, 2),
                  drift=_drift(rng)),
            _Blob(f(side * (canal_a + 4 + tp_len * 0.95)), f(canal_y + rng.uniform(0, 8)),
                  f(rng.uniform(10, 16)), f(rng.uniform(6, 10)), f(hu), PARASPINAL.value,
                  angle=f(side * np.deg2rad(rng.uniform(-35, 5))), wobble=_wobble(rng, 0.06),
                  halo_mm=f(rng.uniform(1.5, 3)), streaks=_streaks(rng, 1), drift=_drift(rng)),
            _Blob(f(side * (es_a + rng.uniform(3, 6))), f(back - es_b), f(es_a), f(es_b), f(hu),
                  PARASPINAL.value, angle=f(side * np.deg2rad(rng.uniform(-10, 10))),
                  power=f(rng.uniform(2.0, 2.6)), wobble=_wobble(rng, 0.04),
                  halo_mm=f(rng.uniform(1.5, 2.5)), streaks=_streaks(rng, 3), drift=_drift(rng)),
        ]
    spine = _Spine(bones, float(vb_y - vb_b), float(canal_y), float(ps_x + ps_a))
    return spine, tuple(muscles)


def _draw_viscera(rng, body: _Body, spine: _Spine) -> tuple[_Blob, ...]:
    inner_side = _fat_inner_radius(body, np.pi / 2) - body.oblique_mm
    inner_front = _fat_inner_radius(body, 0.0) - body.rectus_mm
    blobs = []
    if rng.random() < 0.4:  # liver tip, patient right (negative x)
        blobs.append(_Blob(float(-inner_side * 0.6), float(rng.uniform(-30, 10)),
                           float(rng.uniform(35, 55)), float(rng.uniform(25, 45)),
                           float(rng.uniform(50, 65)), wobble=_wobble(rng, 0.05),
                           halo_mm=2.0, in_cavity=True, drift=_drift(rng, 0.2, 0.01)))
    for side in (-1, 1):  # ascending / descending colon: gas and stool
        radius = rng.uniform(14, 24)
        blobs.append(_Blob(float(side * (inner_side - radius - 5)), float(rng.uniform(-20, 15)),
                           float(radius), float(radius * rng.uniform(0.8, 1.1)),
                           float(rng.uniform(30, 50)), wobble=_wobble(rng, 0.06),
                           wall_mm=float(rng.uniform(2, 3)),
                           lumen_hu=float(rng.choice([-900.0, -500.0, -100.0, 20.0])),
                           in_cavity=True, drift=_drift(rng, 0.3, 0.01)))
    for _ in range(int(rng.integers(12, 24))):
        blobs.append(_bowel_loop(rng, inner_side, inner_front, spine))
    for side in (-1, 1):
        if rng.random() < 0.8:
            a = rng.uniform(20, 28)
            x = min(spine.psoas_outer_x + a + rng.uniform(8, 18), inner_side - a - 4)
            blobs.append(_Blob(float(side * x), float(spine.canal_y - rng.uniform(0, 15)),
                               float(a), float(rng.uniform(26, 36)), float(rng.uniform(30, 45)),
                               angle=float(side * np.deg2rad(rng.uniform(-35, 5))),
                               wobble=_wobble(rng, 0.04), halo_mm=float(rng.uniform(3, 10)),
                               drift=_drift(rng, 0.1, 0.01)))
    vessel_hu = float(rng.uniform(35, 50) if rng.random() < 0.7 else rng.uniform(150, 300))
    aorta_r = rng.uniform(9, 13)
    blobs += [
        _Blob(float(rng.uniform(5, 15)), float(spine.body_front - aorta_r - 2), float(aorta_r),
              float(aorta_r), vessel_hu, halo_mm=1.5),
        _Blob(float(-rng.uniform(18, 28)), float(spine.body_front - rng.uniform(6, 10)),
              float(rng.uniform(10, 15)), float(rng.uniform(6, 9)), vessel_hu, halo_mm=1.5),
    ]
    return tuple(blobs)


def _bowel_loop(rng, inner_side: float, inner_front: float, spine: _Spine) -> _Blob:
    radius = rng.uniform(8, 22)
    x = rng.uniform(-0.8, 0.8) * (inner_side - radius)
    front, back = -inner_front + radius, spine.body_front - radius
    y = rng.uniform(front, max(front, back))
    kind = rng.choice(["collapsed", "gas", "fluid"], p=[0.5, 0.3, 0.2])
    lumen = {"collapsed": rng.uniform(30, 60), "gas": rng.uniform(-950, -700),
             "fluid": rng.uniform(5, 25)}[kind]
    return _Blob(float(x), float(y), float(radius), float(radius * rng.uniform(0.6, 1.0)),
                 float(rng.uniform(35, 60)), angle=float(rng.uniform(0, np.pi)),
                 wobble=_wobble(rng, 0.06), wall_mm=float(rng.uniform(1.5, 3)),
                 lumen_hu=float(lumen), in_cavity=True, drift=_drift(rng, 0.5, 0.02))


# ---------------------------------------------------------------- body-layer radii


def _harmonics(theta, wobble) -> np.ndarray:
    out = np.ones_like(theta)
    for k, amplitude, phase in wobble:
        out += amplitude * np.cos(k * theta + phase)
    return out


def _outline_radius(body: _Body, theta) -> np.ndarray:
    """Skin radius at angle ``theta`` from anterior (positive towards patient left)."""
    theta = np.asarray(theta, dtype=float)
    depth = np.where(np.cos(theta) > 0, body.half_depth_front, body.half_depth_back)
    p = body.power
    base = (np.abs(np.sin(theta) / body.half_width) ** p
            + np.abs(np.cos(theta) / depth) ** p) ** (-1 / p)
    return base * _harmonics(theta, body.outline_wobble)


def _fat_thickness(body: _Body, theta) -> np.ndarray:
    front, back = np.clip(np.cos(theta), 0, None) ** 2, np.clip(-np.cos(theta), 0, None) ** 2
    mean = body.fat_side + (body.fat_front - body.fat_side) * front + (
        body.fat_back - body.fat_side) * back
    return mean * _harmonics(theta, body.fat_wobble)


def _fat_inner_radius(body: _Body, theta) -> np.ndarray:
    return _outline_radius(body, theta) - _fat_thickness(body, theta)


def _wall_thickness(body: _Body, theta) -> np.ndarray:
    """Abdominal wall muscle thickness: rectus in front, obliques at the sides, then none."""
    off = np.abs(theta)
    rectus_share = 1.0 / (1.0 + np.exp((off - np.deg2rad(32)) / np.deg2rad(5)))
    thickness = body.rectus_mm * rectus_share + body.oblique_mm * (1 - rectus_share)
    taper = np.clip((body.wall_end - off) / np.deg2rad(15), 0, 1) ** 0.5
    return thickness * taper


# ---------------------------------------------------------------- rendering


class _Canvas:
    """HU and label arrays plus the body-frame coordinates (mm) of every pixel."""

    def __init__(self, anatomy: _Anatomy, size: int, spacing: float):
        body = anatomy.body
        fov = spacing * size
        widest = max(body.half_width, body.half_depth_front, body.half_depth_back)
        self.scale = min(1.0, 0.46 * fov / widest)  # body-frame mm → image mm
        self.spacing = spacing
        self.pixel_mm = spacing / self.scale  # a pixel's size in body-frame mm
        self.size = size
        self.offset = np.asarray(anatomy.offset_mm) * self.scale
        self.rotation = anatomy.rotation
        axis = (np.arange(size) - (size - 1) / 2) * spacing
        self.x_img, self.y_img = np.meshgrid(axis, axis)  # image mm from the centre
        x_img, y_img = self.x_img - self.offset[0], self.y_img - self.offset[1]
        cos, sin = np.cos(self.rotation), np.sin(self.rotation)
        self.x = (cos * x_img + sin * y_img) / self.scale
        self.y = (-sin * x_img + cos * y_img) / self.scale
        self.hu = np.full((size, size), AIR_HU)
        self.labels = np.zeros((size, size), np.uint8)
        self.cavity = np.zeros((size, size), bool)

    def to_image(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Body-frame mm → image mm from the image centre."""
        cos, sin = np.cos(self.rotation), np.sin(self.rotation)
        return ((cos * x - sin * y) * self.scale + self.offset[0],
                (sin * x + cos * y) * self.scale + self.offset[1])

    def pixel_box(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        x_img, y_img = self.to_image(cx, cy)
        centre = (np.array([y_img, x_img]) / self.spacing) + (self.size - 1) / 2
        half = radius * self.scale / self.spacing + 2
        lo = np.clip(np.floor(centre - half), 0, self.size).astype(int)
        hi = np.clip(np.ceil(centre + half) + 1, 0, self.size).astype(int)
        return slice(lo[0], hi[0]), slice(lo[1], hi[1])

    def fill(self, box, mask: np.ndarray, hu, label: int) -> None:
        self.hu[box][mask] = hu
        self.labels[box][mask] = label

    def add_fat_line(self, where: np.ndarray, distance_mm: np.ndarray, width_mm: float,
                     fat_hu: float, box=(slice(None), slice(None))) -> None:
        """Blend a thin fat line in by the share of each pixel it covers (no aliasing)."""
        p = self.pixel_mm
        share = np.clip(((width_mm + p) / 2 - distance_mm) / p, 0, min(1.0, width_mm / p))
        hu = self.hu[box]
        hu[where] += share[where] * (fat_hu - hu[where])


def _render(anatomy: _Anatomy, size: int, spacing: float, dz_mm: float,
            noise_rng: np.random.Generator) -> PhantomSlice:
    canvas = _Canvas(anatomy, size, spacing)
    _paint_body(canvas, anatomy.body)
    _paint_table(canvas, anatomy)
    for blob in anatomy.blobs:
        _paint_blob(canvas, blob.at(dz_mm))
    image = ndimage.gaussian_filter(canvas.hu, 0.7 / spacing)  # scanner blur, ~0.7 mm
    noise = ndimage.gaussian_filter(noise_rng.standard_normal((size, size)), 0.5)
    image += noise * (anatomy.noise_hu / noise.std())
    return PhantomSlice(np.clip(image, -1024, 3071).astype(np.float32), canvas.labels,
                        (spacing, spacing))


def _paint_body(canvas: _Canvas, body: _Body) -> None:
    r = np.hypot(canvas.x, canvas.y)
    theta = np.arctan2(canvas.x, -canvas.y)  # 0 anterior, +90° patient left
    lut_theta = np.linspace(-np.pi, np.pi, _LUT_SIZE + 1)
    index = np.rint((theta + np.pi) / (2 * np.pi) * _LUT_SIZE).astype(int)
    outline = _outline_radius(body, lut_theta)[index]
    fat_inner = _fat_inner_radius(body, lut_theta)[index]
    wall = _wall_thickness(body, lut_theta)[index]
    everything = slice(None), slice(None)
    canvas.fill(everything, r <= outline, body.skin_hu, 0)
    canvas.fill(everything, r <= outline - body.skin_mm, body.fat_hu, 0)
    depth = fat_inner - r
    in_wall = (depth >= 0) & (depth < wall)
    canvas.fill(everything, in_wall, body.wall_hu, ABDOMINAL_WALL.value)
    oblique = in_wall & (np.abs(theta) > np.deg2rad(40))
    # the thin fat plane between the external and internal oblique
    canvas.add_fat_line(oblique, np.abs(depth - 0.4 * wall), 0.6, body.fat_hu)
    linea_alba = in_wall & (np.abs(theta) * r < body.linea_alba_mm / 2)
    canvas.fill(everything, linea_alba, body.fat_hu, 0)
    canvas.cavity = depth >= wall + 1.0
    canvas.fill(everything, depth >= wall, body.visceral_fat_hu, 0)
    if body.ascites_mm > 0:
        fluid = canvas.cavity & (np.abs(theta) < 2.1) & (
            (depth < wall + body.ascites_mm) | (canvas.y < body.ascites_back))
        canvas.fill(everything, fluid, body.ascites_hu, 0)


def _paint_table(canvas: _Canvas, anatomy: _Anatomy) -> None:
    """The CT couch: a horizontal slab in the scanner frame, just below the patient."""
    theta = np.linspace(-np.pi, np.pi, 361)
    radius = _outline_radius(anatomy.body, theta)
    lowest = canvas.to_image(radius * np.sin(theta), -radius * np.cos(theta))[1].max()
    top = lowest + anatomy.table_gap_mm
    slab = (canvas.y_img > top) & (canvas.y_img < top + 8) & (np.abs(canvas.x_img) < 220)
    canvas.fill((slice(None), slice(None)), slab, 60.0, 0)


def _paint_blob(canvas: _Canvas, blob: _Blob) -> None:
    reach = max(blob.a, blob.b) * (1 + sum(abs(w[1]) for w in blob.wobble)) + blob.halo_mm
    box = canvas.pixel_box(blob.cx, blob.cy, reach)
    u0, v0 = canvas.x[box] - blob.cx, canvas.y[box] - blob.cy
    cos, sin = np.cos(blob.angle), np.sin(blob.angle)
    u, v = cos * u0 + sin * v0, -sin * u0 + cos * v0
    allowed = canvas.cavity[box] if blob.in_cavity else np.ones(u.shape, bool)

    def inside(grow_mm: float) -> np.ndarray:
        p = blob.power
        rho = (np.abs(u / (blob.a + grow_mm)) ** p + np.abs(v / (blob.b + grow_mm)) ** p
               ) ** (1 / p)
        return (rho <= _harmonics(np.arctan2(v / blob.b, u / blob.a), blob.wobble)) & allowed

    if blob.halo_mm > 0:
        canvas.fill(box, inside(blob.halo_mm), blob.halo_hu, 0)
    shape = inside(0.0)
    canvas.fill(box, shape, blob.hu, blob.label)
    if blob.wall_mm > 0:
        canvas.fill(box, inside(-blob.wall_mm), blob.lumen_hu, blob.label)
    for offset, angle, width in blob.streaks:
        across = np.cos(angle) * u + np.sin(angle) * v - offset * min(blob.a, blob.b)
        canvas.add_fat_line(shape & inside(-2.0), np.abs(across), width, blob.streak_hu, box)
