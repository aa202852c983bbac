"""Drawing code for the synthetic phantoms: anatomy, lesions, acquisition effects.

Everything here is vectorized numpy/OpenCV on float32 images with intensities in
``[0, 1]``; :mod:`mwm.data.phantoms` turns the result into files.

Frames
------
Each modality is drawn in a *canonical frame*: a square ``size x size`` image whose
normalized coordinates are ``u`` (columns, ``-1`` at the left edge, ``+1`` at the right)
and ``v`` (rows, ``-1`` at the top, ``+1`` at the bottom), with anatomy in a fixed pose.
A random affine pose (rotation, anisotropic scale, shift) then maps the canonical frame
to the final image; lesion masks go through the same warp as the image, so they stay
exactly on the lesion.

Orientation is the radiological convention throughout: the patient's **left** is on
the **image right** (``u > 0``); anterior is at the top for the axial slices, cranial
at the top for the frontal chest radiograph.

Class independence
------------------
:func:`draw_anatomy` consumes only its own random generator, so the anatomy, pose,
bias field and noise of a sample never depend on its class. A lesion changes pixels
only inside its own mask (plus at most one pixel of interpolation at the mask edge).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

F32 = np.float32
_SHIFT = 4                 # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------- primitives


@dataclass(frozen=True)
class Grid:
    size: int
    u: np.ndarray          # normalized column coordinate, (S, S)
    v: np.ndarray          # normalized row coordinate, (S, S)
    rho: np.ndarray        # hypot(u, v)
    theta: np.ndarray      # atan2(v, u)
    cos: tuple[np.ndarray, ...]   # cos(k * theta), k = 0..4 (index k)
    sin: tuple[np.ndarray, ...]

    @property
    def half(self) -> float:
        return self.size / 2.0

    @property
    def center(self) -> float:
        return (self.size - 1) / 2.0

    def to_px(self, uv: np.ndarray) -> np.ndarray:
        """Normalized (u, v) -> pixel (x, y), floats."""
        return np.asarray(uv, dtype=np.float64) * self.half + self.center


@functools.lru_cache(maxsize=8)
def grid(size: int) -> Grid:
    """Coordinate grids for one image size (cached, read-only)."""
    c = (size - 1) / 2.0
    axis = ((np.arange(size, dtype=np.float64) - c) / (size / 2.0)).astype(F32)
    u = np.ascontiguousarray(np.broadcast_to(axis[None, :], (size, size)))
    v = np.ascontiguousarray(u.T)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    cos = tuple(np.cos(k * theta).astype(F32) for k in range(5))
    sin = tuple(np.sin(k * theta).astype(F32) for k in range(5))
    arrays = (u, v, rho, theta) + cos + sin
    for a in arrays:
        a.setflags(write=False)
    return Grid(size, u, v, rho, theta, cos, sin)


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean random field: ``cells x cells`` normals upsampled (bicubic)."""
    low = rng.standard_normal((cells, cells), dtype=F32)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)


def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REPLICATE)


def ellipse(g: Grid, cu: float, cv: float, au: float, av: float, angle: float = 0.0) -> np.ndarray:
    """Implicit rotated ellipse ``(x/au)^2 + (y/av)^2`` (< 1 inside); angle in radians."""
    du = g.u - F32(cu)
    dv = g.v - F32(cv)
    if angle:
        c, s = F32(math.cos(angle)), F32(math.sin(angle))
        du, dv = c * du + s * dv, c * dv - s * du
    return (du * F32(1.0 / au)) ** 2 + (dv * F32(1.0 / av)) ** 2


def inside(g: Grid, cu: float, cv: float, au: float, av: float, angle: float = 0.0) -> np.ndarray:
    """Boolean filled ellipse, evaluated only over its bounding box (fast for small shapes)."""
    reach = max(au, av) * g.half + 2.0
    x, y = g.to_px((cu, cv))
    x0, x1 = max(0, int(x - reach)), min(g.size, int(x + reach) + 2)
    y0, y1 = max(0, int(y - reach)), min(g.size, int(y + reach) + 2)
    out = np.zeros((g.size, g.size), bool)
    if x0 >= x1 or y0 >= y1:
        return out
    du = g.u[y0:y1, x0:x1] - F32(cu)
    dv = g.v[y0:y1, x0:x1] - F32(cv)
    if angle:
        c, s = F32(math.cos(angle)), F32(math.sin(angle))
        du, dv = c * du + s * dv, c * dv - s * du
    out[y0:y1, x0:x1] = (du * F32(1.0 / au)) ** 2 + (dv * F32(1.0 / av)) ** 2 < 1
    return out


def _fixed(g: Grid, pts_uv) -> list[np.ndarray]:
    """Curves in normalized coordinates -> cv2 fixed-point int32 point arrays."""
    if isinstance(pts_uv, np.ndarray):
        arr = np.round(g.to_px(pts_uv) * _ONE).astype(np.int32)
        return list(arr) if arr.ndim == 3 else [arr]
    return [np.round(g.to_px(c) * _ONE).astype(np.int32) for c in pts_uv]


def stroke(g: Grid, curves, thickness_px: float) -> np.ndarray:
    """Anti-aliased polylines (normalized coordinates; a list of (P, 2) arrays or one
    (N, P, 2) array) -> float32 layer in [0, 1]."""
    layer = np.zeros((g.size, g.size), np.uint8)
    if len(curves):
        cv2.polylines(layer, _fixed(g, curves), False, 255,
                      thickness=max(1, int(round(thickness_px))), lineType=cv2.LINE_AA,
                      shift=_SHIFT)
    return layer.astype(F32) * F32(1 / 255)


def dots(g: Grid, centers_uv: np.ndarray, radius_px: float) -> np.ndarray:
    """Anti-aliased filled discs -> float32 layer in [0, 1]."""
    layer = np.zeros((g.size, g.size), np.uint8)
    r = max(1, int(round(radius_px * _ONE)))
    for x, y in np.round(g.to_px(centers_uv) * _ONE).astype(np.int64):
        cv2.circle(layer, (int(x), int(y)), r, 255, -1, cv2.LINE_AA, _SHIFT)
    return layer.astype(F32) * F32(1 / 255)


def branches(rng: np.random.Generator, origin: tuple[float, float], n: int, *,
             angle_range: tuple[float, float], seg: float, steps: int,
             wiggle: float = 0.35) -> np.ndarray:
    """Random-walk vessel/airway branches fanning out from ``origin`` (normalized)."""
    ang = rng.uniform(*angle_range, size=n)
    turns = rng.normal(0.0, wiggle, size=(n, steps))
    lengths = seg * rng.uniform(0.7, 1.3, size=(n, steps))
    heading = ang[:, None] + np.cumsum(turns, axis=1) * 0.5
    du = np.cumsum(lengths * np.cos(heading), axis=1)
    dv = np.cumsum(lengths * np.sin(heading), axis=1)
    start = np.asarray(origin) + rng.normal(0.0, seg * 0.4, size=(n, 2))
    pts = np.empty((n, steps + 1, 2))
    pts[:, 0] = start
    pts[:, 1:, 0] = start[:, :1] + du
    pts[:, 1:, 1] = start[:, 1:] + dv
    return pts


def largest_component(mask: np.ndarray) -> np.ndarray:
    m8 = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m8, connectivity=8)
    if n <= 2:
        return mask
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def distance_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) from each inside pixel to the mask border."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)


def jitter(rng: np.random.Generator, mean: float, rel: float) -> float:
    return float(mean * (1.0 + rng.normal(0.0, rel)))


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """A canonical-frame drawing plus what lesion placement and the pose need."""

    image: np.ndarray                    # float32 (S, S), canonical frame
    organs: dict[str, np.ndarray]        # bool (S, S) masks, canonical frame
    linear: np.ndarray                   # 2x2: canonical -> final, normalized units
    shift: np.ndarray                    # (2,): final = linear @ canonical + shift
    border: int                          # cv2 border mode for the warp
    border_value: float
    info: dict = field(default_factory=dict)

    @property
    def det(self) -> float:
        return abs(float(np.linalg.det(self.linear)))

    def warp_matrix(self, size: int) -> np.ndarray:
        g = grid(size)
        m = self.linear
        c = np.array([g.center, g.center])
        t = c - m @ c + self.shift * g.half
        return np.hstack([m, t[:, None]]).astype(np.float64)

    def to_canonical(self, xy_px: np.ndarray, size: int) -> np.ndarray:
        """Final-image pixel (x, y) -> canonical normalized (u, v)."""
        g = grid(size)
        p = (np.asarray(xy_px, np.float64) - g.center) / g.half
        return np.linalg.solve(self.linear, p - self.shift)


def _pose(rng: np.random.Generator, rot_deg: float, sx: tuple[float, float],
          sy: tuple[float, float], shift: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(rng.uniform(-rot_deg, rot_deg))
    s = np.diag([rng.uniform(*sx), rng.uniform(*sy)])
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return r @ s, rng.uniform(-shift, shift, size=2)


def brain_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Axial T1-weighted (post-contrast look) brain slice at the level of the ventricles."""
    g = grid(size)
    k = size / 128.0
    coef = np.clip(rng.normal(0.0, 1.0, size=(3, 2)), -1.5, 1.5) * np.array([[0.025], [0.012], [0.008]])
    radius = 1.0 + sum(F32(coef[i, 0]) * g.cos[i + 2] + F32(coef[i, 1]) * g.sin[i + 2]
                       for i in range(3))
    r = g.rho / radius
    t_scalp = rng.uniform(0.04, 0.065)
    t_bone = rng.uniform(0.035, 0.05)
    t_csf = rng.uniform(0.012, 0.025)
    outer = 0.88
    bone_out = outer - t_scalp
    inner = bone_out - t_bone
    cortex = rng.uniform(0.055, 0.075)
    sulcus_depth = rng.uniform(0.08, 0.12)
    n_gyri = int(rng.integers(30, 40))
    f_surface = smooth_field(rng, size, 18)
    f_phase = smooth_field(rng, size, 7)
    f_depth = smooth_field(rng, size, 9)
    f_tex = smooth_field(rng, size, 7)
    surface = F32(inner - t_csf) - F32(0.01) * (1.0 + f_surface)

    scalp_v = jitter(rng, 0.78, 0.05)
    diploe_v = jitter(rng, 0.42, 0.10)
    bone_v = 0.06
    csf_v = jitter(rng, 0.09, 0.15)
    gm_v = jitter(rng, 0.36, 0.04)
    wm_v = jitter(rng, 0.62, 0.04)
    deep_v = jitter(rng, 0.47, 0.05)
    vent_v = jitter(rng, 0.07, 0.15)

    img = np.where(r < outer, F32(scalp_v) * (1.0 + 0.06 * f_tex), F32(0.0))
    img = np.where(r < bone_out, F32(bone_v), img)
    img = np.where(np.abs(r - F32(bone_out - t_bone / 2)) < F32(t_bone * 0.28), F32(diploe_v), img)
    intracranial = r < F32(inner)
    img = np.where(intracranial, F32(csf_v), img)
    brain = r < surface
    img = np.where(brain, F32(gm_v) * (1.0 + 0.05 * f_tex), img)
    # gyri: a folding pattern around the circumference, p = +1 at sulci, -1 at crowns
    p = np.cos(F32(n_gyri) * g.theta + F32(4.0) * f_phase + F32(1.5) * f_depth)
    below = surface - r                      # depth below the brain surface (> 0 inside)
    depth = F32(sulcus_depth) * np.clip(0.75 + 0.35 * f_depth, 0.3, 1.2)
    white = brain & (below > F32(cortex) + F32(0.5) * depth * (p + 1.0))
    img = np.where(white, F32(wm_v) * (1.0 + 0.025 * f_tex), img)
    sulci = np.clip((p - F32(0.6)) * F32(1 / 0.3), 0.0, 1.0) * (below < depth + F32(cortex * 0.3))
    img += (F32(csf_v) - img) * sulci * brain * F32(0.85)
    # deep gray nuclei (basal ganglia / thalami)
    bg_u = rng.uniform(0.17, 0.22)
    deep = (inside(g, -bg_u, 0.05, 0.065, 0.12, 0.25)) | (inside(g, bg_u, 0.05, 0.065, 0.12, -0.25))
    img = np.where(deep, F32(deep_v), img)
    # lateral ventricles: frontal horns diverging anteriorly, bodies, occipital horns
    vs = rng.uniform(0.8, 1.3)
    vc = rng.uniform(-0.12, -0.04)
    tilt = rng.uniform(0.25, 0.45)
    vent = ventricle_shape(g, vs, vc, tilt)
    img = np.where(vent, F32(vent_v), img)
    # interhemispheric fissure (falx) in front of and behind the ventricles
    fis_v = (g.v < F32(vc - 0.2 * vs)) | (g.v > F32(vc + 0.36 * vs))
    falx = np.exp(-(g.u * F32(1 / (0.011 + 0.004 / k))) ** 2) * (brain & fis_v)
    img += (F32(csf_v) - img) * falx * F32(0.7)
    img = blur(img, 0.55 * k)

    linear, shift = _pose(rng, 10.0, (0.8, 0.9), (0.94, 1.02), 0.03)
    skull = (r < bone_out) & ~intracranial          # outer and inner tables with the diploe
    organs = {"brain": brain, "intracranial": intracranial, "ventricles": vent, "skull": skull}
    return Anatomy(img, organs, linear, shift, cv2.BORDER_CONSTANT, 0.0,
                   {"coef": coef, "inner": inner, "surface": float(inner - t_csf),
                    "ventricles": {"vs": vs, "vc": vc, "tilt": tilt, "value": vent_v},
                    "blur_px": 0.55 * k})


def ventricle_shape(g: Grid, vs: float, vc: float, tilt: float,
                    wide: float = 1.0) -> np.ndarray:
    """Lateral ventricles (frontal horns diverging anteriorly, bodies, occipital horns) of
    scale ``vs`` centred at row ``vc``, their widths times ``wide``; bool (S, S),
    canonical frame."""
    d = 0.055 * vs ** 0.5
    w = vs * wide                     # == vs for the normal ventricles (x * 1.0 is exact)
    return ((inside(g, -d, vc - 0.07 * vs, 0.04 * w, 0.1 * vs, -tilt))
            | (inside(g, d, vc - 0.07 * vs, 0.04 * w, 0.1 * vs, tilt))
            | (inside(g, -d - 0.02, vc + 0.1 * vs, 0.032 * w, 0.11 * vs, 0.15))
            | (inside(g, d + 0.02, vc + 0.1 * vs, 0.032 * w, 0.11 * vs, -0.15))
            | (inside(g, -d - 0.07, vc + 0.27 * vs, 0.03 * w, 0.08 * vs, 0.5))
            | (inside(g, d + 0.07, vc + 0.27 * vs, 0.03 * w, 0.08 * vs, -0.5)))


def _lung_shape(g: Grid, side: int, cu: float, cv: float, au: float, av: float,
                wobble: np.ndarray) -> np.ndarray:
    return ellipse(g, side * cu, cv, au, av) + wobble


def chest_ct_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Axial contrast-enhanced chest CT slice below the carina, soft-tissue/lung window."""
    g = grid(size)
    k = size / 128.0
    u, v = g.u, g.v
    a_b = rng.uniform(0.86, 0.94)
    b_b = rng.uniform(0.6, 0.68)
    c_b = 0.03
    body_e = ellipse(g, 0.0, c_b, a_b, b_b)
    back = F32(c_b + 0.93 * b_b)
    body = (body_e < 1) & (v < back)
    fat_t = rng.uniform(0.05, 0.1)
    f_tex = smooth_field(rng, size, 10)
    f_lung = smooth_field(rng, size, 5)

    air_v = 0.015
    fat_v = jitter(rng, 0.3, 0.06)
    muscle_v = jitter(rng, 0.5, 0.03)
    lung_v = jitter(rng, 0.075, 0.12)
    bone_v = jitter(rng, 0.86, 0.04)
    blood_v = jitter(rng, 0.66, 0.04)
    heart_v = jitter(rng, 0.56, 0.04)

    img = np.full((size, size), F32(air_v))
    # CT table below the patient
    table = (np.abs(v - F32(back + 0.1)) < F32(0.018)) & (np.abs(u) < 0.85)
    img = np.where(table, F32(0.3), img)
    img = np.where(body, F32(fat_v) * (1.0 + 0.04 * f_tex), img)
    skin = body & ((body_e > F32((1 - 0.025) ** 2)) | (v > back - F32(0.02)))
    img = np.where(skin, F32(0.45), img)
    inner = (inside(g, 0.0, c_b, a_b - fat_t, b_b - fat_t)) & (v < back - F32(fat_t))
    img = np.where(inner, F32(muscle_v) * (1.0 + 0.03 * f_tex), img)
    # lungs: two kidney shapes, indented medially by the mediastinum and the spine
    ls = rng.uniform(0.9, 1.05)
    lu, lv = 0.39 * a_b / 0.9, 0.0
    au, av = 0.29 * ls * a_b / 0.9, 0.47 * ls * b_b / 0.64
    heart_u = rng.uniform(0.06, 0.12)
    heart_angle = rng.uniform(-0.7, -0.35)
    heart_e = ellipse(g, heart_u, -0.08, 0.25, 0.21, heart_angle)
    medi = ellipse(g, 0.0, -0.05, 0.16, 0.5)
    spine_c = F32(c_b + 0.93 * b_b - 0.27)
    spine_e = ellipse(g, 0.0, spine_c, 0.13, 0.13)
    lungs = {}
    for side, name in ((-1, "right_lung"), (1, "left_lung")):
        wob = F32(0.12) * f_lung
        shape = _lung_shape(g, side, lu, lv, au, av, wob)
        m = (shape < 1) & (heart_e > 1.15) & (medi > 1.0) & (spine_e > 1.5) & inner
        lungs[name] = m
    lung = lungs["right_lung"] | lungs["left_lung"]
    # parenchyma: slightly denser posteriorly (dependent), faint texture
    paren = F32(lung_v) * (1.0 + 0.25 * (v + 0.5)) * (1.0 + 0.08 * f_tex)
    img = np.where(lung, paren, img)
    # vessels: branches from the hila plus scattered dots
    curves = []
    for side in (-1, 1):
        hil = (side * 0.17, -0.05)
        ang = (-1.2, 1.2) if side > 0 else (math.pi - 1.2, math.pi + 1.2)
        curves.append(branches(rng, hil, 10, angle_range=ang, seg=0.05, steps=5, wiggle=0.6))
    curves = np.concatenate(curves)
    ves = stroke(g, curves, 1.2 * k)
    pts = rng.uniform(-1, 1, size=(60, 2)) * np.array([0.8, 0.6])
    ves = np.maximum(ves, dots(g, pts, 0.8 * k) * F32(0.8))
    img = np.where(lung, img + (F32(0.4) - img) * ves * F32(0.6), img)
    # airways: bronchi near the hila
    for side in (-1, 1):
        br = inside(g, side * rng.uniform(0.14, 0.18), rng.uniform(-0.15, -0.08), 0.03, 0.025)
        img = np.where(br, F32(air_v + 0.02), img)
    # mediastinum: heart with blood pool, pericardial fat, descending aorta, esophagus
    heart = (heart_e < 1) & inner
    img = np.where((heart_e < 1.25) & inner & ~lung, F32(fat_v * 1.05), img)
    img = np.where(heart, F32(heart_v) * (1.0 + 0.02 * f_tex), img)
    img = np.where(inside(g, heart_u + 0.02, -0.06, 0.15, 0.11, heart_angle), F32(blood_v), img)
    ao_u = rng.uniform(0.09, 0.14)
    img = np.where(inside(g, ao_u, spine_c - 0.17, 0.062, 0.062), F32(blood_v), img)
    img = np.where(inside(g, -0.01, spine_c - 0.17, 0.03, 0.025), F32(muscle_v * 0.85), img)
    # spine: vertebral body with cortical rim, canal, posterior elements
    vb = ellipse(g, 0.0, spine_c, 0.12, 0.11)
    img = np.where(vb < 1, F32(bone_v * 0.75) * (1.0 + 0.06 * f_tex), img)
    img = np.where((vb < 1) & (vb > 0.78), F32(bone_v), img)
    post = [np.array([[-0.09, spine_c + 0.12], [0.0, spine_c + 0.23], [0.09, spine_c + 0.12]]),
            np.array([[0.0, spine_c + 0.22], [0.0, spine_c + 0.33]]),
            np.array([[-0.09, spine_c + 0.1], [-0.2, spine_c + 0.05]]),
            np.array([[0.09, spine_c + 0.1], [0.2, spine_c + 0.05]])]
    pe = stroke(g, post, 2.4 * k)
    img = img + (F32(bone_v) - img) * pe
    img = np.where(inside(g, 0.0, spine_c + 0.16, 0.05, 0.045), F32(muscle_v * 0.75), img)
    # ribs in the chest wall and the sternum
    rib_curves = []
    ra, rb = a_b - fat_t - 0.035, b_b - fat_t - 0.035
    for t0 in np.linspace(0.0, 2 * math.pi, 16, endpoint=False) + rng.normal(0, 0.05, 16):
        if abs(math.cos(t0)) < 0.3:
            continue
        t = np.linspace(t0 - 0.1, t0 + 0.1, 5)
        rib_curves.append(np.stack([ra * np.cos(t), c_b + rb * np.sin(t)], axis=1))
    ribs = stroke(g, rib_curves, 1.8 * k) * (~lung)
    img = img + (F32(bone_v * 0.95) - img) * ribs
    img = np.where(inside(g, 0.0, c_b - b_b + fat_t + 0.05, 0.09, 0.035), F32(bone_v * 0.9), img)
    img = blur(img, 0.5 * k)

    linear, shift = _pose(rng, 5.0, (0.93, 1.02), (0.93, 1.02), 0.04)
    organs = dict(lungs, lung=lung)
    return Anatomy(img, organs, linear, shift, cv2.BORDER_CONSTANT, air_v,
                   {"lung_v": lung_v, "muscle_v": muscle_v})


def chest_xray_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Frontal (PA) chest radiograph: bright = dense, air black."""
    g = grid(size)
    k = size / 128.0
    u, v = g.u, g.v
    f_tex = smooth_field(rng, size, 8)
    f_lung = smooth_field(rng, size, 5)

    # torso outline: narrow neck widening into shoulders
    neck = rng.uniform(0.2, 0.26)
    width = rng.uniform(0.86, 0.95)
    shoulder_v = rng.uniform(-0.82, -0.72)
    half_w = F32(neck) + F32(width - neck) / (1.0 + np.exp(-(v - F32(shoulder_v)) * F32(14.0)))
    torso = np.abs(u) < half_w
    soft = F32(jitter(rng, 0.5, 0.05)) * (1.0 + 0.04 * f_tex)
    att = np.where(torso, soft, F32(0.04))
    # thicker soft tissue laterally (arms/shoulders) and in the abdomen
    att += torso * F32(0.08) * np.clip(np.abs(u) - 0.65, 0.0, 1.0) * 3.0

    # lungs: ellipse cut by the diaphragm dome and the mediastinum
    lscale = rng.uniform(0.93, 1.04)
    lu = 0.42
    lv = rng.uniform(-0.04, 0.03)
    au, av = 0.34 * lscale, 0.56 * lscale
    dome_r = lv + av * 0.8 + rng.uniform(-0.04, 0.02)
    dome_l = dome_r + rng.uniform(0.03, 0.08)
    heart_u = rng.uniform(0.12, 0.18)
    heart_v = dome_r - rng.uniform(0.2, 0.25)
    heart_a, heart_b = rng.uniform(0.33, 0.38), rng.uniform(0.24, 0.28)
    heart_e = ellipse(g, heart_u, heart_v, heart_a, heart_b, -0.3)
    medi_w = F32(0.09) + F32(0.02) * (v + 1.0)
    lungs = {}
    domes = {}
    for side, name, dome in ((-1, "right_lung", dome_r), (1, "left_lung", dome_l)):
        d = F32(dome) - F32(0.13) * (1.0 - ((u - F32(side * lu)) * F32(1 / 0.33)) ** 2)
        domes[name] = d
        dv = g.v - F32(lv)
        dv = dv * np.where(dv > 0, F32(1 / (av * 1.3)), F32(1 / av))
        e = ((u - F32(side * lu)) * F32(1 / au)) ** 2 + dv ** 2 + F32(0.08) * f_lung
        m = (e < 1) & (v < d) & (np.abs(u) > medi_w) & (heart_e > 1) & (u * side > 0)
        lungs[name] = m
    lung = lungs["right_lung"] | lungs["left_lung"]
    # lung air: darker laterally and at the apices' periphery; hila brighter
    lung_depth = F32(jitter(rng, 0.36, 0.06))
    hil_d = np.minimum(ellipse(g, -0.15, -0.02, 0.25, 0.3), ellipse(g, 0.15, -0.02, 0.25, 0.3))
    air = lung_depth * (1.0 - 0.25 * np.exp(-hil_d)) * (1.0 + 0.05 * f_tex)
    att -= np.where(lung, air, F32(0.0))
    # subdiaphragmatic abdomen brighter; gastric bubble under the left dome
    below = torso & (v > np.minimum(domes["right_lung"], domes["left_lung"]) + 0.01) & (v > dome_r - 0.2)
    abd = below & ~lung
    att += abd * F32(0.08)
    bubble = inside(g, lu + rng.uniform(-0.05, 0.05), dome_l + 0.09, 0.1, 0.055)
    att -= bubble * F32(0.14)
    # heart and mediastinum
    att += (heart_e < 1) * F32(0.13)
    medi = (np.abs(u) < medi_w + 0.02) & torso & (v < heart_v)
    att += medi * F32(0.1)
    att += (inside(g, 0.11, lv - av * 0.45, 0.07, 0.06)) * F32(0.06)     # aortic knob
    trachea = (np.abs(u) < 0.035) & (v < lv - av * 0.35)
    att -= trachea * F32(0.1)
    # spine: vertebral column with faint disc spaces
    spine = np.abs(u) < 0.07
    discs = 0.5 + 0.5 * np.cos((v - F32(rng.uniform(0, 0.1))) * F32(2 * math.pi / 0.11))
    att += spine * F32(0.06) * (1.0 - 0.4 * discs ** 8)
    # ribs: posterior arcs (bright) and anterior arcs (faint)
    v0 = lv - av - rng.uniform(0.12, 0.18)
    sp = av * rng.uniform(0.19, 0.21)
    t = np.linspace(0.0, 1.0, 12)[None, :]
    i = np.arange(10)[:, None]
    top = v0 + i * sp
    reach = 0.7 + 0.14 * np.minimum(i, 4) / 4
    post_v = top - 0.05 * np.sin(np.pi * t) + (0.22 + 0.02 * i) * t ** 2
    ant_v = top + 0.12 + 0.3 * t - 0.1 * t ** 2
    post, ant = [], []
    for side in (-1, 1):
        post.append(np.stack(np.broadcast_arrays(side * (0.06 + reach * t), post_v), axis=-1))
        ant.append(np.stack(np.broadcast_arrays(side * (0.84 - 0.6 * t) + 0 * i, ant_v), axis=-1))
    post, ant = np.concatenate(post), np.concatenate(ant)
    ribs = stroke(g, post, 2.2 * k) * F32(0.1) + stroke(g, ant, 1.6 * k) * F32(0.07)
    att += ribs * torso * (v < np.maximum(domes["right_lung"], domes["left_lung"]) + 0.05)
    # clavicles
    clav = []
    for side in (-1, 1):
        cy = rng.uniform(-0.72, -0.64)
        clav.append(np.array([[side * 0.08, cy + 0.03], [side * 0.3, cy - 0.02],
                              [side * 0.55, cy - 0.03], [side * 0.72, cy - 0.1]]))
    att += stroke(g, clav, 3.2 * k) * F32(0.16)
    # lung vascular markings from the hila
    curves = []
    for side in (-1, 1):
        ang = (-1.0, 1.4) if side > 0 else (math.pi - 1.4, math.pi + 1.0)
        curves.append(branches(rng, (side * 0.14, -0.02), 8, angle_range=ang, seg=0.08, steps=5))
    curves = np.concatenate(curves)
    att += stroke(g, curves, 1.3 * k) * lung * F32(0.06)
    att = blur(att, 0.7 * k)

    linear, shift = _pose(rng, 4.0, (0.95, 1.05), (0.95, 1.05), 0.03)
    organs = dict(lungs, lung=lung)
    return Anatomy(att, organs, linear, shift, cv2.BORDER_REPLICATE, 0.0,
                   {"lv": lv, "av": av})


ANATOMY = {
    "brain-mri": brain_anatomy,
    "chest-ct": chest_ct_anatomy,
    "chest-xray": chest_xray_anatomy,
}


# --------------------------------------------------------------------------- lesions


@dataclass
class Blob:
    """A star-shaped lobulated outline: radius(phi) = 1 + sum_k a_k cos(k phi) + b_k sin(k phi)."""

    coef: np.ndarray        # (K, 2) for harmonics k = 2 .. K+1
    aspect: float
    angle: float

    @classmethod
    def random(cls, rng: np.random.Generator, lobes: float, aspect: float = 0.0) -> "Blob":
        ks = np.arange(2, 8)
        coef = rng.normal(0.0, 1.0, size=(len(ks), 2)) * (lobes / ks)[:, None]
        asp = math.exp(rng.uniform(-aspect, aspect)) if aspect else 1.0
        return cls(coef, asp, rng.uniform(0, math.pi))

    @property
    def reach(self) -> float:
        """Upper bound of the outline's radius in units of ``r``."""
        return (1.0 + float(np.hypot(self.coef[:, 0], self.coef[:, 1]).sum())) \
            * math.sqrt(max(self.aspect, 1.0 / self.aspect))

    def q(self, g: Grid, cu: float, cv: float, r: float, box) -> np.ndarray:
        """Normalized radial coordinate (< 1 inside) over the pixels of ``box``."""
        du = g.u[box] - F32(cu)
        dv = g.v[box] - F32(cv)
        c, s = F32(math.cos(self.angle)), F32(math.sin(self.angle))
        sa = F32(math.sqrt(self.aspect))
        x = (c * du + s * dv) / sa
        y = (c * dv - s * du) * sa
        z = (x + 1j * y).astype(np.complex64)
        mag = np.abs(z)
        w = z / np.maximum(mag, F32(1e-12))          # e^{i phi}
        rad = np.ones(mag.shape, F32)
        wk = w * w
        for a, b in self.coef:                        # k = 2, 3, ...
            rad += F32(a) * wk.real + F32(b) * wk.imag
            wk = wk * w
        rad = np.maximum(rad, F32(0.45))
        return mag / (rad * F32(r))


@dataclass
class Lesion:
    mask: np.ndarray       # bool, canonical frame
    center: tuple[float, float]


def _box(g: Grid, center: tuple[float, float], reach: float) -> tuple[slice, slice]:
    x, y = g.to_px(center)
    rp = reach * g.half + 2.0
    x0, x1 = max(0, int(math.floor(x - rp))), min(g.size, int(math.ceil(x + rp)) + 1)
    y0, y1 = max(0, int(math.floor(y - rp))), min(g.size, int(math.ceil(y + rp)) + 1)
    return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


def _pick_center(rng: np.random.Generator, g: Grid, allowed: np.ndarray, need_px: float,
                 avoid: list[Lesion], avoid_px: float) -> tuple[float, float] | None:
    """A random pixel of ``allowed`` at least ``need_px`` from its border (relaxing if needed)."""
    dist = distance_inside(allowed)
    if avoid:
        far = np.ones_like(allowed)
        for les in avoid:
            far &= ~inside(g, les.center[0], les.center[1], avoid_px / g.half, avoid_px / g.half)
        dist = dist * far
    for factor in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        cand = np.flatnonzero(dist > need_px * factor)
        if cand.size:
            i = int(cand[rng.integers(cand.size)])
            y, x = divmod(i, g.size)
            return float(g.u[y, x]), float(g.v[y, x])
    return None


@dataclass
class Footprint:
    mask: np.ndarray        # bool (S, S)
    box: tuple[slice, slice]
    q: np.ndarray           # radial coordinate over box
    sub: np.ndarray         # mask[box]


def _fit_blob(g: Grid, blob: Blob, center: tuple[float, float], area_px: float,
              region: np.ndarray, extra: np.ndarray | None = None,
              extra_reach: float = 0.0) -> Footprint:
    """Scale ``blob`` so that its footprint within ``region`` has about ``area_px`` pixels."""
    r = math.sqrt(area_px / math.pi) / g.half
    for _ in range(6):
        box = _box(g, center, r * max(blob.reach, extra_reach))
        q = blob.q(g, center[0], center[1], r, box)
        inside = q < 1
        if extra is not None:
            inside |= extra[box]
        sub = largest_component(inside & region[box])
        area = int(sub.sum())
        if area and 0.88 <= area / area_px <= 1.12:
            break
        r *= math.sqrt(area_px / max(area, 1)) ** (1.0 if area else 2.0)
        r = min(r, 2.0)
    mask = np.zeros((g.size, g.size), bool)
    mask[box] = sub
    return Footprint(mask, box, q, sub)


def _profile(q: np.ndarray, edge: float) -> np.ndarray:
    """Alpha falling from 1 in the interior to ``~0`` at ``q = 1`` over ``edge``."""
    return np.clip((F32(1.0) - q) * F32(1.0 / edge), 0.0, 1.0)


def _texture(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    low = rng.standard_normal((cells, cells), dtype=F32)
    return cv2.resize(low, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _paint(img: np.ndarray, fp: Footprint, alpha: np.ndarray, value) -> None:
    """Blend towards ``value`` inside the footprint only."""
    sub = img[fp.box]
    sub += (value - sub) * (alpha * fp.sub)


def _add(img: np.ndarray, fp: Footprint, alpha: np.ndarray, amount) -> None:
    sub = img[fp.box]
    sub += amount * (alpha * fp.sub)


# Lesion area targets (fraction of the *final* image, all lesions together).
AREA = {
    ("brain-mri", "glioma"): (0.035, 0.10),
    ("brain-mri", "meningioma"): (0.02, 0.065),
    ("brain-mri", "pituitary"): (0.013, 0.022),
    ("chest-ct", "nodule"): (0.013, 0.022),
    ("chest-ct", "mass"): (0.03, 0.065),
    ("chest-ct", "ground-glass"): (0.03, 0.07),
    ("chest-xray", "nodule"): (0.013, 0.022),
    ("chest-xray", "mass"): (0.03, 0.06),
    ("chest-xray", "consolidation"): (0.03, 0.065),
}
# Classes that sometimes come in pairs (two lesions of the same class).
MULTIPLE = {("brain-mri", "glioma"), ("brain-mri", "meningioma"), ("chest-ct", "nodule"),
            ("chest-ct", "ground-glass"), ("chest-xray", "nodule"),
            ("chest-xray", "consolidation")}
PAIR_PROBABILITY = 0.15


def draw_lesions(rng: np.random.Generator, modality: str, label: str, anat: Anatomy,
                 size: int) -> tuple[np.ndarray, list[Lesion]]:
    """Paint the lesions of class ``label`` onto a copy of the canonical image."""
    g = grid(size)
    img = anat.image.copy()
    lo, hi = AREA[(modality, label)]
    total = rng.uniform(lo, hi)
    count = 2 if ((modality, label) in MULTIPLE and rng.random() < PAIR_PROBABILITY) else 1
    # canonical pixels that become ``total`` of the final image
    area_px = total * size * size / anat.det / count
    painter = _PAINTERS[(modality, label)]
    lesions: list[Lesion] = []
    taken = np.zeros((size, size), bool)
    for _ in range(count):
        les = painter(rng, g, img, anat, area_px, lesions, taken)
        if les is None:
            break
        taken |= cv2.dilate(les.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        lesions.append(les)
    return img, lesions


def _place(rng, g, region, area_px, lesions, taken, blob, need=0.9, fit_region=None,
           extra_fn=None):
    """Pick a centre in ``region`` and fit ``blob`` there (inside ``fit_region``)."""
    region = region & ~taken
    r_px = math.sqrt(area_px / math.pi)
    center = _pick_center(rng, g, region, need * r_px, lesions, 2.2 * r_px)
    if center is None:
        return None, None
    fit = region if fit_region is None else fit_region & ~taken
    if extra_fn is None:
        return center, _fit_blob(g, blob, center, area_px, fit)
    extra, reach = extra_fn(center, r_px)
    return center, _fit_blob(g, blob, center, area_px, fit, extra, reach)


# ---- brain


def _glioma(rng, g, img, anat, area_px, lesions, taken):
    side = 1 if rng.random() < 0.5 else -1
    region = anat.organs["brain"] & (g.u * side > 0.2) & (g.rho < 0.72)
    blob = Blob.random(rng, 0.4, aspect=0.3)
    center, fp = _place(rng, g, region, area_px, lesions, taken, blob, need=0.5,
                        fit_region=anat.organs["brain"])
    if center is None:
        return None
    q = fp.q
    tex = _texture(rng, q.shape, 6)
    core = F32(rng.uniform(0.35, 0.55)) + F32(0.08) * tex
    rim_v = F32(rng.uniform(0.72, 0.85))
    inner_v = F32(rng.uniform(0.14, 0.24))
    val = np.where(q < core, inner_v * (1.0 + 0.2 * tex), rim_v * (1.0 + 0.1 * tex))
    val = np.where((q >= core) & (q < core + 0.1), (val + inner_v) * 0.5, val)
    _paint(img, fp, _profile(q, 0.18), val)
    return Lesion(fp.mask, center)


def _meningioma(rng, g, img, anat, area_px, lesions, taken):
    r = math.sqrt(area_px / math.pi) / g.half
    coef = anat.info["coef"]
    for _ in range(20):
        phi = rng.uniform(-math.pi, math.pi)
        rad = 1.0 + sum(coef[i, 0] * math.cos((i + 2) * phi) + coef[i, 1] * math.sin((i + 2) * phi)
                        for i in range(3))
        d = anat.info["inner"] * rad - 0.55 * r
        center = (d * math.cos(phi), d * math.sin(phi))
        if all(math.hypot(center[0] - l.center[0], center[1] - l.center[1]) > 3 * r for l in lesions):
            break
    blob = Blob.random(rng, 0.08, aspect=0.25)
    fp = _fit_blob(g, blob, center, area_px, anat.organs["intracranial"] & ~taken)
    val = F32(rng.uniform(0.78, 0.88)) * (1.0 + 0.04 * _texture(rng, fp.q.shape, 5))
    _paint(img, fp, _profile(fp.q, 0.12), val)
    return Lesion(fp.mask, center)


def _pituitary(rng, g, img, anat, area_px, lesions, taken):
    center = (rng.uniform(-0.02, 0.02), rng.uniform(0.14, 0.28))
    blob = Blob.random(rng, 0.05, aspect=0.2)
    fp = _fit_blob(g, blob, center, area_px, anat.organs["brain"] & ~taken)
    val = F32(rng.uniform(0.64, 0.72)) * (1.0 + 0.03 * _texture(rng, fp.q.shape, 4))
    _paint(img, fp, _profile(fp.q, 0.2), val)
    return Lesion(fp.mask, center)


# ---- chest CT


def _lung_side(rng, anat):
    return anat.organs["right_lung" if rng.random() < 0.5 else "left_lung"]


def _ct_nodule(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.06, aspect=0.15)
    center, fp = _place(rng, g, _lung_side(rng, anat), area_px, lesions, taken, blob, 1.0)
    if center is None:
        return None
    val = F32(rng.uniform(0.5, 0.58)) * (1.0 + 0.03 * _texture(rng, fp.q.shape, 4))
    _paint(img, fp, _profile(fp.q, 0.15), val)
    return Lesion(fp.mask, center)


def _ct_mass(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.3, aspect=0.25)
    n_sp = int(rng.integers(7, 14))
    sp_ang = rng.uniform(0, 2 * math.pi, n_sp)
    sp_len = rng.uniform(1.25, 1.7, n_sp)

    def spicules(center, r_px):
        r = r_px / g.half
        ends = np.stack([center[0] + sp_len * r * np.cos(sp_ang),
                         center[1] + sp_len * r * np.sin(sp_ang)], axis=1)
        curves = np.stack([np.broadcast_to(center, ends.shape), ends], axis=1)
        return stroke(g, curves, 1.0 * g.size / 128) > 0.5, 1.8

    center, fp = _place(rng, g, _lung_side(rng, anat), area_px, lesions, taken, blob, 0.6,
                        extra_fn=spicules)
    if center is None:
        return None
    tex = _texture(rng, fp.q.shape, 6)
    val = F32(rng.uniform(0.47, 0.55)) * (1.0 + 0.06 * tex)
    alpha = np.where(fp.q < 1, _profile(fp.q, 0.12), F32(0.75))
    _paint(img, fp, alpha, val)
    return Lesion(fp.mask, center)


def _ct_ggo(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.45, aspect=0.4)
    center, fp = _place(rng, g, _lung_side(rng, anat), area_px, lesions, taken, blob, 0.5)
    if center is None:
        return None
    tex = _texture(rng, fp.q.shape, 7)
    amount = F32(rng.uniform(0.1, 0.15)) * np.clip(1.0 + 0.45 * tex, 0.2, 2.0)
    _add(img, fp, _profile(fp.q, 0.45), amount)
    return Lesion(fp.mask, center)


# ---- chest X-ray


def _zone(g, anat, lo, hi):
    lv, av = anat.info["lv"], anat.info["av"]
    rel = (g.v - F32(lv - av)) * F32(1 / (2 * av))
    return (rel >= lo) & (rel <= hi)


def _xr_nodule(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.05, aspect=0.15)
    center, fp = _place(rng, g, _lung_side(rng, anat), area_px, lesions, taken, blob, 1.0)
    if center is None:
        return None
    _add(img, fp, _profile(fp.q, 0.3), F32(rng.uniform(0.13, 0.18)))
    return Lesion(fp.mask, center)


def _xr_mass(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.12, aspect=0.2)
    lung = _lung_side(rng, anat)
    center, fp = _place(rng, g, lung & _zone(g, anat, 0.0, 0.5), area_px, lesions, taken, blob,
                        0.8, fit_region=lung)
    if center is None:
        return None
    tex = _texture(rng, fp.q.shape, 5)
    _add(img, fp, _profile(fp.q, 0.2), F32(rng.uniform(0.22, 0.28)) * (1.0 + 0.05 * tex))
    return Lesion(fp.mask, center)


def _xr_consolidation(rng, g, img, anat, area_px, lesions, taken):
    blob = Blob.random(rng, 0.5, aspect=0.35)
    lung = _lung_side(rng, anat)
    center, fp = _place(rng, g, lung & _zone(g, anat, 0.55, 1.0), area_px, lesions, taken,
                        blob, 0.4, fit_region=lung)
    if center is None:
        return None
    tex = _texture(rng, fp.q.shape, 8)
    amount = F32(rng.uniform(0.14, 0.2)) * np.clip(1.0 + 0.5 * tex, 0.2, 2.0)
    # air bronchograms: dark branching lines inside the opacity
    side = 1 if center[0] > 0 else -1
    ang = (0.3, 1.4) if side > 0 else (math.pi - 1.4, math.pi - 0.3)
    air = stroke(g, branches(rng, (side * 0.15, center[1] - 0.15), 4, angle_range=ang,
                             seg=0.07, steps=5), 1.0 * g.size / 128)[fp.box]
    amount = amount * (1.0 - 0.6 * air)
    _add(img, fp, _profile(fp.q, 0.45), amount)
    return Lesion(fp.mask, center)


_PAINTERS = {
    ("brain-mri", "glioma"): _glioma,
    ("brain-mri", "meningioma"): _meningioma,
    ("brain-mri", "pituitary"): _pituitary,
    ("chest-ct", "nodule"): _ct_nodule,
    ("chest-ct", "mass"): _ct_mass,
    ("chest-ct", "ground-glass"): _ct_ggo,
    ("chest-xray", "nodule"): _xr_nodule,
    ("chest-xray", "mass"): _xr_mass,
    ("chest-xray", "consolidation"): _xr_consolidation,
}


# --------------------------------------------------------------------------- extra findings
# The findings a multi-finding phantom adds to its class lesion (mwm.data.findings). Each
# painter changes ``img`` only inside the mask of the Lesion it returns, and never inside
# ``taken`` (the class lesion and the findings drawn before it, grown by two pixels).

HEMORRHAGE_AREA = (0.008, 0.018)       # fraction of the final image
HEMORRHAGE_DEEP = 0.5                  # chance of a deep (basal ganglia, thalamus) site
# Enlarged ventricles: scale and extra width beyond any normal ventricles (scale 0.8-1.3),
# so that they never pass for normal ones; the scale's top keeps them off the cortex.
VENTRICLE_SCALE = (1.55, 1.8)
VENTRICLE_WIDTH = (1.25, 1.5)
SEPTUM = 0.012                         # half-width of the septum left between the horns


def draw_finding(rng: np.random.Generator, modality: str, name: str, img: np.ndarray,
                 anat: Anatomy, size: int, avoid: list[Lesion],
                 taken: np.ndarray) -> Lesion | None:
    """Paint one extra finding onto ``img`` (canonical frame, in place); None when it finds
    no room. Chest findings are one lesion of the class painter of the same name."""
    g = grid(size)
    painter = _FINDING_PAINTERS.get((modality, name))
    if painter is not None:
        return painter(rng, g, img, anat, avoid, taken)
    lo, hi = AREA[(modality, name)]
    area_px = rng.uniform(lo, hi) * size * size / anat.det
    return _PAINTERS[(modality, name)](rng, g, img, anat, area_px, avoid, taken)


def finding_min_fraction(modality: str, name: str) -> float:
    """The least fraction of the final image a drawn extra finding may keep (half its
    smallest area target; 0 for those drawn without one), else it is drawn again."""
    if (modality, name) == ("brain-mri", "hemorrhage"):
        return HEMORRHAGE_AREA[0] / 2
    return AREA[(modality, name)][0] / 2 if (modality, name) in AREA else 0.0


def _disc(radius_px: float) -> np.ndarray:
    r = max(1, math.ceil(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _parenchyma(g: Grid, anat: Anatomy, taken: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Brain tissue at least ``margin`` (normalized) below the brain surface, clear of the
    ventricles (by three pixels) and of ``taken``."""
    deep = distance_inside(anat.organs["brain"]) > margin * g.half
    near_vent = cv2.dilate(anat.organs["ventricles"].astype(np.uint8), _disc(3.0)).astype(bool)
    return deep & ~near_vent & ~taken


def _enlarged_ventricles(rng, g, img, anat, avoid, taken):
    """Ventriculomegaly: the lateral ventricles redrawn larger, CSF-dark with the anatomy's
    soft edge. The mask is the ventricles as they now look (old outline included)."""
    info = anat.info["ventricles"]
    big = ventricle_shape(g, rng.uniform(*VENTRICLE_SCALE), info["vc"], info["tilt"],
                          rng.uniform(*VENTRICLE_WIDTH))
    big &= np.abs(g.u) > F32(SEPTUM)
    paint = big & (distance_inside(anat.organs["brain"]) > 0.06 * g.half) & ~taken
    if not (paint & ~anat.organs["ventricles"]).any():
        return None
    # blur of the painted shape, cut to it: the edge softness of the drawn anatomy
    alpha = blur(paint.astype(F32), anat.info["blur_px"]) * paint
    img += (F32(info["value"]) - img) * alpha
    mask = paint | anat.organs["ventricles"]
    ys, xs = np.nonzero(mask)
    return Lesion(mask, (float(g.u[0, int(xs.mean())]), float(g.v[int(ys.mean()), 0])))


def _calcification(rng, g, img, anat, avoid, taken):
    """A cluster of 3-6 tiny very bright dots in the deep parenchyma. The mask is the
    cluster: the convex hull of the dots, grown to cover them plus one pixel."""
    k = g.size / 128.0
    spread = rng.uniform(0.05, 0.08)                     # cluster radius, normalized
    n_dots = int(rng.integers(3, 7))
    radius_px = max(0.75, rng.uniform(0.9, 1.3) * k)
    value = F32(rng.uniform(0.95, 1.0))
    region = _parenchyma(g, anat, taken)
    center = _pick_center(rng, g, region, 1.3 * spread * g.half, avoid,
                          2.5 * spread * g.half + 4.0)
    if center is None:
        return None
    # candidate offsets in a disc; keep those far enough apart to read as separate dots
    ang = rng.uniform(0.0, 2 * math.pi, 6 * n_dots)
    rad = spread * np.sqrt(rng.uniform(0.0, 1.0, 6 * n_dots))
    cand = np.stack([center[0] + rad * np.cos(ang), center[1] + rad * np.sin(ang)], axis=1)
    sep = (2.6 * radius_px + 1.0) / g.half
    pts: list[np.ndarray] = []
    for p in cand:
        if all(np.hypot(*(p - q)) >= sep for q in pts):
            pts.append(p)
        if len(pts) == n_dots:
            break
    pts_uv = np.array(pts)
    hull = np.zeros((g.size, g.size), np.uint8)
    px = np.round(g.to_px(pts_uv) * _ONE).astype(np.int32)
    cv2.fillConvexPoly(hull, cv2.convexHull(px), 1, cv2.LINE_8, _SHIFT)
    mask = cv2.dilate(hull, _disc(radius_px + 1.5)).astype(bool)
    mask &= anat.organs["brain"] & ~taken
    layer = dots(g, pts_uv, radius_px) * mask
    img += (value - img) * layer
    return Lesion(mask, center)


def _hemorrhage(rng, g, img, anat, avoid, taken):
    """A subacute intraparenchymal hematoma as T1 shows it: a smooth homogeneous bright
    ovoid (methaemoglobin) with a thin dark rim (haemosiderin) in the deep parenchyma;
    the reverse of a glioma's bright rim around a dark core, and smooth where it is
    lobulated."""
    area_px = rng.uniform(*HEMORRHAGE_AREA) * g.size * g.size / anat.det
    blob = Blob.random(rng, 0.03, aspect=0.35)
    region = _parenchyma(g, anat, taken)
    deep = region & (g.rho < F32(0.38))
    if rng.random() < HEMORRHAGE_DEEP and deep.any():
        region = deep
    center, fp = _place(rng, g, region, area_px, avoid, taken, blob, need=1.0)
    if center is None:
        return None
    core_v = F32(rng.uniform(0.86, 0.94))
    rim_v = F32(rng.uniform(0.04, 0.1))
    rim_start = F32(1.0 - rng.uniform(0.18, 0.26))
    to_rim = np.clip((fp.q - (rim_start - F32(0.08))) * F32(1 / 0.08), 0.0, 1.0)
    val = core_v * (1.0 + 0.015 * _texture(rng, fp.q.shape, 4))
    val = val + (rim_v - val) * to_rim
    _paint(img, fp, _profile(fp.q, 0.1), val)
    return Lesion(fp.mask, center)


_FINDING_PAINTERS = {
    ("brain-mri", "enlarged-ventricles"): _enlarged_ventricles,
    ("brain-mri", "calcification"): _calcification,
    ("brain-mri", "hemorrhage"): _hemorrhage,
}


# --------------------------------------------------------------------------- acquisition


def acquire(rng: np.random.Generator, modality: str, img: np.ndarray) -> np.ndarray:
    """Bias field, gain and noise in the final frame; returns float32 clipped to [0, 1]."""
    size = img.shape[0]
    g = grid(size)
    if modality == "brain-mri":
        bias = 1.0 + F32(0.12) * smooth_field(rng, size, 3)
        gain = F32(rng.uniform(0.85, 1.1))
        sigma = F32(rng.uniform(0.012, 0.03))
        s = img * bias * gain
        n = rng.standard_normal((2, size, size), dtype=F32) * sigma
        out = np.sqrt((s + n[0]) ** 2 + n[1] ** 2)          # Rician magnitude noise
    elif modality == "chest-ct":
        bias = 1.0 + F32(0.03) * smooth_field(rng, size, 3)
        gain = F32(rng.uniform(0.93, 1.06))
        sigma = F32(rng.uniform(0.012, 0.028))
        n = rng.standard_normal((size, size), dtype=F32)
        n = blur(n, 0.6) * F32(1.8)                          # mildly correlated CT noise
        out = img * bias * gain + n * sigma
    else:  # chest-xray
        gx, gy = rng.uniform(-0.08, 0.08), rng.uniform(-0.04, 0.08)
        bias = (1.0 + F32(0.05) * smooth_field(rng, size, 3)
                + F32(gx) * g.u + F32(gy) * g.v)
        gamma = rng.uniform(0.85, 1.15)
        sigma = F32(rng.uniform(0.01, 0.022))
        s = np.clip(img * bias, 0.0, None) ** F32(gamma)
        n = rng.standard_normal((size, size), dtype=F32)
        out = s * F32(rng.uniform(0.95, 1.1)) + n * sigma * np.sqrt(s + F32(0.05))
    return np.clip(out, 0.0, 1.0).astype(F32, copy=False)
