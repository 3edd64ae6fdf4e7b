"""The landscape renderer: seed -> image, exact depth, semantic labels, class id.

How a picture is made (all numpy, float32, one image at a time, no global RNG state):

1. World. A heightfield H(x, y) in metres: fractal gradient noise (hills) plus a ridged multifractal
   (mountains) under a low-frequency mask, with per-biome extras (dunes, mesas, a volcano).
   Every random number comes from ``np.random.default_rng(seed)`` in a fixed order.
2. Camera. A pinhole camera looking horizontally (yaw only), with the principal point shifted
   vertically (an off-axis / shift lens) so the horizon sits 24-48 % from the top. Vertical world
   lines stay vertical on screen, so every pixel column is one vertical plane through the camera.
   Position, heading and height are picked among candidates by probing the terrain for a view
   that is open but not empty; field of view 52-72 degrees.
3. Columns. Each pixel column is sampled at K = 64 + 2*size distances (geometric spacing, 2 m to
   12 km); the heightfield is evaluated there once (on one column per output pixel, interpolated to
   the sub-pixel columns), with octaves finer than the sample spacing left out (level of detail).
   Normals come from finite differences on that (distance, column) grid; a forest canopy (height
   following the forest density, with bumpy crowns near the camera) is added on the same grid, and
   soft cast shadows are marched towards the sun through it.
   A ray hits the terrain at the first sample whose elevation angle exceeds the ray's; the running
   maximum of those angles turns this into a counting problem (no per-ray loop), and the hit is
   refined by linear interpolation between the two samples around the crossing. The rendered
   surface is thus the piecewise-linear terrain along each column, and depth is exact for it.
4. Water is a level surface; the world is a small planet (curvature radius chosen per image so a
   sea horizon lies within 12 km), so every downward ray ends within the world and every other ray
   is sky. Lakes and sea mirror terrain and sky (a mirror-world ray march with a sparse min-table
   per column), with ripples, Fresnel, sun glitter, depth tint and shore foam.
5. Shading: materials by height, slope, moisture and noise (sand, grass, forest, rock, snow), sun
   lambert with cast shadows + sky ambient, a sky with sun/moon, stars, aurora, a volcano's ash
   plume and noise clouds on a cloud layer, height-dependent haze. Supersampled (2x2 by default)
   and box-filtered, then a soft tone curve and sRGB gamma.

Outputs per pixel (see ``WorldSample``):
- depth: Euclidean distance in metres from the camera centre to the surface point along the pixel's
  view ray (ray range, not z-depth). Sky and cloud pixels get ``FAR_DEPTH`` (20000 m); every
  surface lies nearer than 16000 m.
- labels: ids into ``SEG_CLASSES``. With supersampling, a pixel's label is the majority of its
  sub-samples (ties go to the nearest surface) and its depth is the nearest sub-sample of that
  label, so label and depth always describe the same sub-sample: sky/cloud <=> depth == FAR_DEPTH.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .biomes import BIOMES, Biome
from .classes import CLASS_NAMES, SEG, class_id_of
from .noise import hash01, perlin

WORLD_VERSION = 1
FAR_DEPTH = 20000.0  # depth of sky and cloud pixels (metres)
Z_NEAR = 2.0  # first column sample (metres ahead of the camera)
Z_MAX = 12000.0  # last column sample; the curvature puts any sea horizon nearer than this

SKY, CLOUD, WATER = SEG["sky"], SEG["cloud"], SEG["water"]
SAND, GRASS, FOREST, ROCK, SNOW = SEG["sand"], SEG["grass"], SEG["forest"], SEG["rock"], SEG["snow"]

_F = np.float32


def _lin(hex_rgb: str) -> np.ndarray:
    """sRGB hex -> linear RGB (3,) float32."""
    h = hex_rgb.lstrip("#")
    c = np.array([int(h[i : i + 2], 16) for i in (0, 2, 4)], np.float32) / 255.0
    return (c**2.2).astype(np.float32)


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _mix(a, b, t):
    """a*(1-t) + b*t for colours: a, b (3,) or (N,3); t (N,)."""
    t = np.asarray(t, np.float32)[..., None]
    return a + (b - a) * t


@dataclass
class WorldSample:
    """One rendered view of the world.

    image: PIL RGB, size x size. depth: (H, W) float32 ray range in metres, FAR_DEPTH for sky and
    cloud. labels: (H, W) uint8 ids into SEG_CLASSES. class_id: index into CLASS_NAMES.
    info: camera and world scalars (camera position/heading/lens, water level, snow line, ...).
    """

    image: Image.Image
    depth: np.ndarray
    labels: np.ndarray
    class_id: int
    seed: int = 0
    info: dict = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """(xn, s): per pixel-centre ray direction in camera units (right, up) per metre ahead, (H, W)."""
        return _pixel_rays(self.info, self.depth.shape[0])

    def world_heights(self) -> np.ndarray:
        """Terrain/water height (metres, world frame) of each pixel's surface point; NaN for sky.

        Uses the pixel-centre ray, so it is exact up to the sub-pixel offset of the sample.
        """
        xn, s = self.pixel_rays()
        z = self.depth / np.sqrt(1.0 + xn**2 + s**2)  # metres ahead
        drop = z**2 * (1.0 + xn**2) / (2.0 * self.info["curvature_radius"])
        h = self.info["camera_height"] + s * z + drop
        return np.where(self.depth < FAR_DEPTH, h, np.nan).astype(np.float32)


def _pixel_rays(info: dict, size: int):
    n = size
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n
    th = info["tan_half_fov"]
    xn = ((2.0 * centres - 1.0) * th)[None, :].repeat(n, 0)
    s = ((info["horizon"] - centres) * 2.0 * th)[:, None].repeat(n, 1)
    return xn, s


class _Terrain:
    """Height field H(x, y) in metres; coordinates are metres relative to an origin."""

    def __init__(self, rng: np.random.Generator, b: Biome):
        self.b = b
        n = b.octaves + 4  # terrain octaves, then streams for mask, moisture, dunes, spare
        ang = rng.uniform(0.0, 2.0 * np.pi, n)
        self.cos, self.sin = np.cos(ang), np.sin(ang)
        self.off = rng.uniform(0.0, 256.0, (n, 2))
        self.base = rng.uniform(-3.0e5, 3.0e5, 2)  # where in the (periodic) world this view is
        self.dune_dir = rng.uniform(0.0, 2.0 * np.pi)
        self.cone = None  # (x, y, radius, peak) of the volcano, set once the camera is known
        self.plume = None  # (wind drift per metre of rise, noise offsets)

    def noise(self, i: int, x, y, lam: float, org) -> np.ndarray:
        c, s = self.cos[i], self.sin[i]
        ou = ((org[0] * c - org[1] * s) / lam + self.off[i, 0]) % 256.0
        ov = ((org[0] * s + org[1] * c) / lam + self.off[i, 1]) % 256.0
        k = 1.0 / lam
        u = x * _F(c * k) - y * _F(s * k) + _F(ou)
        v = x * _F(s * k) + y * _F(c * k) + _F(ov)
        return perlin(u, v)

    def moisture(self, x, y, org) -> np.ndarray:
        n = self.b.octaves + 1
        return self.noise(n, x, y, 1300.0, org)

    def height(self, x, y, org, z=None, lod_c: float = 8.0, max_oct: int | None = None,
               with_mesa: bool = False):
        """x, y: float32 arrays (same shape) relative to org. With z (one distance per row of a 2-D
        x), octave i is evaluated only on rows with z < lod_c * wavelength_i (faded in).
        with_mesa: also return the mesa mask (1 on buttes, where the desert floor is bare rock)."""
        b = self.b
        shape = x.shape
        hill = np.zeros(shape, _F)
        ridge = np.zeros(shape, _F) if b.mtn_amp else None
        weight = np.ones(shape, _F) if b.mtn_amp else None
        rows = shape[0]
        n_oct = b.octaves if max_oct is None else min(max_oct, b.octaves)
        for i in range(n_oct):
            lam = b.lam0 * 0.5**i
            if z is not None:
                zc = lod_c * lam
                n = int(np.searchsorted(z, zc))
                if n == 0:
                    break
                fade = np.clip(2.0 - 2.0 * z[:n] / zc, 0.0, 1.0).astype(_F)[:, None]
            else:
                n, fade = rows, _F(1.0)
            nv = self.noise(i, x[:n], y[:n], lam, org)
            amp = _F(0.5**i)
            hill[:n] += nv * (amp * fade)
            if ridge is not None:
                r = 1.0 - np.abs(nv)
                r = r * r if b.ridge_sharp == 2.0 else r ** _F(b.ridge_sharp)
                r *= weight[:n]
                weight[:n] = np.clip(r * 1.6, 0.0, 1.0)
                ridge[:n] += r * (amp * fade)
        h = b.hill_amp * hill
        mask = None
        if ridge is not None:
            mask = _smoothstep(b.mask_lo, b.mask_hi, self.noise(b.octaves, x, y, b.mask_lam, org))
            h = h + b.mtn_amp * mask * np.maximum(ridge - 0.15, 0.0)
        if b.mesa_amp:
            # buttes: two plateau levels of a low-frequency field, edges eroded by the hills' noise
            m = self.noise(b.octaves, x, y, b.mesa_lam, org) + 0.3 * hill
            lo, hi = _smoothstep(0.25, 0.3, m), _smoothstep(0.5, 0.55, m)
            h = h + b.mesa_amp * (0.6 * lo + 0.4 * hi)
            mask = lo
        if b.dune_amp:
            h = h + self._dunes(x, y, org, z, lod_c) * (1.0 - mask if mask is not None else 1.0)
        if self.cone is not None:
            h = h + self._cone(x, y, org)
        h = h.astype(_F, copy=False)
        if with_mesa:
            return h, (lo if b.mesa_amp else np.zeros(shape, _F))
        return h

    def _dunes(self, x, y, org, z, lod_c):
        b = self.b
        lam = b.dune_lam
        n = b.octaves + 2
        if z is not None:
            zc = lod_c * lam * 2.0
            rows = max(int(np.searchsorted(z, zc)), 1)
            fade = np.clip(2.0 - 2.0 * z[:rows] / zc, 0.0, 1.0).astype(_F)[:, None]
        else:
            rows, fade = x.shape[0], _F(1.0)
        xs, ys = x[:rows], y[:rows]
        c, s = math.cos(self.dune_dir), math.sin(self.dune_dir)
        phase0 = ((org[0] * c + org[1] * s) / lam) % 1.0
        phase = (xs * _F(c / lam) + ys * _F(s / lam) + _F(phase0)
                 + 0.9 * self.noise(n, xs, ys, lam * 3.0, org))
        fr = phase - np.floor(phase)
        # long convex windward side up to a sharp crest, short steep lee side
        p = np.minimum(fr * _F(1.0 / 0.78), 1.0)
        q = np.maximum((fr - 0.78) * _F(1.0 / 0.22), 0.0)
        shape = (1.0 - (1.0 - p) ** 2) * (1.0 - q) ** 1.5
        amp = b.dune_amp * (0.6 + 0.4 * self.noise(n, xs, ys, lam * 11.0, org))
        out = np.zeros(x.shape, _F)
        out[:rows] = amp * shape * fade
        return out

    def _cone(self, x, y, org):
        cx, cy, radius, peak = self.cone
        dx = x - _F(cx - org[0])
        dy = y - _F(cy - org[1])
        r = np.sqrt(dx * dx + dy * dy) / _F(radius)
        prof = np.clip(1.0 - r, 0.0, 1.0)
        h = peak * prof**1.7
        h -= 0.13 * peak * _smoothstep(0.1, 0.0, r)  # crater
        return h


@dataclass
class _Scene:
    b: Biome
    cam_xy: tuple
    heading: float
    cam_h: float
    tan_half: float
    horizon: float
    water: float | None
    radius: float  # curvature radius
    snow_line: float
    tree_line: float
    light: np.ndarray  # unit vector towards sun (or moon at night)
    sun_elev: float
    cloud_h: float
    cloud_cover: float
    cloud_off: np.ndarray
    cloud_dir: float
    aurora_phase: np.ndarray
    ripple: float
    seed: int


def _choose_view(rng: np.random.Generator, terrain: _Terrain, b: Biome):
    """Probe candidate positions x headings; return org, heading, ground, water level, clearance."""
    n_pos, n_head = 6, 12
    pos = rng.uniform(-3000.0, 3000.0, (n_pos, 2))
    heads = rng.uniform(0.0, 2.0 * np.pi) + np.arange(n_head) * (2.0 * np.pi / n_head)
    dists = np.array([0.0, 25.0, 60.0, 150.0, 400.0, 1000.0, 2500.0, 6000.0])
    px = pos[:, 0, None, None] + dists[None, None, :] * np.cos(heads)[None, :, None]
    py = pos[:, 1, None, None] + dists[None, None, :] * np.sin(heads)[None, :, None]
    base = terrain.base
    hgt = terrain.height(px.ravel().astype(_F), py.ravel().astype(_F), base, max_oct=7)
    hgt = hgt.reshape(n_pos, n_head, len(dists)).astype(np.float64)
    q = rng.uniform(*b.water_q) if b.water_q else None
    water = float(np.quantile(hgt[:, :, 3:], q)) if q is not None else None
    aerial = rng.uniform() < 0.2
    clearance = math.exp(rng.uniform(math.log(5.0), math.log(60.0)))
    if aerial:
        clearance = rng.uniform(80.0, 350.0)
    ground = hgt[:, 0, 0]
    ground = ground + b.canopy_h
    cam_h = ground + clearance if water is None else np.maximum(ground, water) + clearance
    elev = (hgt[:, :, 1:] - cam_h[:, None, None]) / dists[None, None, 1:]
    block = elev.max(-1)
    target = rng.uniform(0.0, 0.22)
    score = -np.abs(block - target) - 2.0 * np.maximum(elev[:, :, 0], 0.0)
    if water is not None:  # some water in view is nice, a view of mostly water is not
        wet = (hgt[:, :, 2:7] < water).mean(-1)
        score += 0.04 * (wet > 0) - 0.25 * np.maximum(wet - 0.4, 0.0)
    score += 0.02 * rng.uniform(size=score.shape)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    org = (base[0] + pos[i, 0], base[1] + pos[i, 1])
    return org, float(heads[j]), water, clearance, aerial


def _build_scene(seed: int, cls: int):
    b = BIOMES[CLASS_NAMES[cls]]
    rng = np.random.default_rng(seed)
    terrain = _Terrain(rng, b)
    org, heading, water, clearance, aerial = _choose_view(rng, terrain, b)
    hfov = math.radians(rng.uniform(52.0, 72.0))
    tan_half = math.tan(hfov / 2.0)
    horizon = rng.uniform(0.24, 0.4) if aerial else rng.uniform(0.3, 0.48)
    fwd = np.array([math.cos(heading), math.sin(heading)])
    if b.cone:
        ang = heading + math.radians(rng.uniform(-18.0, 18.0))
        dist = rng.uniform(3500.0, 7000.0)
        terrain.cone = (org[0] + dist * math.cos(ang), org[1] + dist * math.sin(ang),
                        rng.uniform(3000.0, 4500.0), rng.uniform(1100.0, 1700.0))
        plume = (rng.uniform(-0.7, 0.7), rng.uniform(0.0, 200.0), rng.uniform(0.0, 200.0))
        terrain.plume = plume if b.plume else None
    # camera height: above the ground around it, and above the water
    ring = np.linspace(0.0, 2.0 * np.pi, 8, endpoint=False)
    rx = np.concatenate([[0.0], 6.0 * np.cos(ring), 15.0 * np.cos(ring)]).astype(_F)
    ry = np.concatenate([[0.0], 6.0 * np.sin(ring), 15.0 * np.sin(ring)]).astype(_F)
    ground = float(terrain.height(rx, ry, org).max())
    # (a forest canopy may stand on that ground: clear it too)
    cam_h = max(ground + b.canopy_h, water if water is not None else -1e9) + clearance
    # sun (or moon) and sky
    sun_elev = math.radians(rng.uniform(*b.sun_elev))
    sun_az = heading + math.radians(rng.uniform(*b.sun_az))
    light = np.array([math.cos(sun_elev) * math.cos(sun_az), math.cos(sun_elev) * math.sin(sun_az),
                      math.sin(sun_elev)], np.float32)
    cloud_cover = rng.uniform(*b.cloud_cover)
    cloud_h = rng.uniform(1500.0, 3000.0)
    cloud_off = rng.uniform(0.0, 256.0, (6, 2))
    cloud_dir = rng.uniform(0.0, 2.0 * np.pi)
    aurora_phase = rng.uniform(0.0, 2.0 * np.pi, 4)
    ripple = rng.uniform(0.2, 1.0)
    scene = _Scene(b=b, cam_xy=org, heading=heading, cam_h=cam_h, tan_half=tan_half, horizon=horizon,
                   water=water, radius=0.0, snow_line=0.0, tree_line=0.0, light=light,
                   sun_elev=sun_elev, cloud_h=cloud_h, cloud_cover=cloud_cover, cloud_off=cloud_off,
                   cloud_dir=cloud_dir, aurora_phase=aurora_phase, ripple=ripple, seed=seed)
    snow_u = rng.uniform()
    return terrain, scene, fwd, snow_u


def _n_steps(size: int) -> int:
    return 64 + 2 * size


class _Renderer:
    def __init__(self, seed: int, cls: int, size: int, ss: int):
        self.size, self.ss = size, ss
        self.terrain, self.sc, self.fwd, snow_u = _build_scene(seed, cls)
        sc, b = self.sc, self.sc.b
        self.b = b
        self.right = np.array([self.fwd[1], -self.fwd[0]])
        self.n = n = size * ss
        self.K = K = _n_steps(size)
        self.z = Z_NEAR * (Z_MAX / Z_NEAR) ** (np.arange(K) / (K - 1))  # (K,) float64
        self.log_ratio = math.log(Z_MAX / Z_NEAR) / (K - 1)
        self.lod_c = 1.0 / (4.0 * (math.exp(self.log_ratio) - 1.0))
        centres = (np.arange(n) + 0.5) / n
        self.xn = ((2.0 * centres - 1.0) * sc.tan_half).astype(_F)  # (W,) per column
        self.s = ((sc.horizon - centres) * 2.0 * sc.tan_half).astype(_F)  # (H,) per row
        # Column sample grid (K, Wg). With supersampling the noise is evaluated on every other
        # sub-pixel column (one per output pixel) and interpolated: the costly part halves, and the
        # ray casting below still runs per sub-pixel column.
        wg = n // 2 + 1 if ss >= 2 else n
        xg = np.linspace(float(self.xn[0]), float(self.xn[-1]), wg).astype(_F)
        zc = self.z.astype(_F)[:, None]
        dirx = _F(self.fwd[0]) + xg * _F(self.right[0])
        diry = _F(self.fwd[1]) + xg * _F(self.right[1])
        gx, gy = zc * dirx[None, :], zc * diry[None, :]
        H, mesa = self.terrain.height(gx, gy, sc.cam_xy, z=self.z, lod_c=self.lod_c, with_mesa=True)
        # lines that depend on the visible heights
        near = H[(self.z > 30.0) & (self.z < 6000.0)]
        if b.snow_q is None:
            sc.snow_line = float("inf")
        elif b.snow_q[1] <= 0.0:
            sc.snow_line = float("-inf")
        else:
            q = b.snow_q[0] + (b.snow_q[1] - b.snow_q[0]) * snow_u
            sc.snow_line = float(np.quantile(near, q))
        sc.tree_line = float(np.quantile(near, min(b.tree_q, 1.0))) if b.tree_q < 1.0 else float("inf")
        # the planet: a sea (or the low ground) seen from this height has its horizon inside Z_MAX
        ref = sc.water if sc.water is not None else float(np.quantile(near, 0.05))
        dh = max(sc.cam_h - ref, 1.0)
        sc.radius = (0.9 * Z_MAX) ** 2 / (2.0 * dh)
        # materials that shape the surface: forest canopy (a raised, bumpy layer), decided on the
        # grid from moisture, slope, tree line and shore, so labels and geometry agree
        nx, ny, nz0 = self._normals(H, xg)
        moist = self.terrain.moisture(gx, gy, sc.cam_xy)
        mid = self._grid_noise(gx, gy, 140.0, b.octaves + 3)  # = the first octave of _detail
        wet = moist + _F(0.35 * 0.55) * mid
        forest = _smoothstep(b.forest_thr - 0.05, b.forest_thr + 0.2, wet)
        forest *= _smoothstep(b.forest_nz - 0.12, b.forest_nz + 0.04, nz0)
        if math.isfinite(sc.tree_line):
            forest *= _smoothstep(sc.tree_line + 30.0, sc.tree_line - 30.0, H - 60.0 * mid)
        if sc.water is not None:
            forest *= _smoothstep(b.beach_h + 1.0, b.beach_h + 4.0, H - _F(sc.water))
        forest = forest.astype(_F)
        surf = H
        if b.canopy_h and forest.max() > 0.0:
            crown = 0.6 * (1.0 - np.abs(self._grid_noise(gx, gy, 8.0, b.octaves + 2)))
            crown += 0.4 * (1.0 - np.abs(self._grid_noise(gx, gy, 3.6, b.octaves + 1)))
            # canopy height follows the forest density smoothly: no cliffs at forest edges
            surf = H + _F(b.canopy_h) * forest * (0.75 + 0.25 * crown)
            nx, ny, nz = self._normals(surf, xg)
        else:
            nz = nz0
        fields = np.stack([surf, nx, ny, nz, moist, self._shadows(surf, xg), forest, nz0, mesa])
        if wg != n:  # to sub-pixel columns
            pos = (self.xn - xg[0]) / (xg[1] - xg[0])
            c0 = np.clip(np.floor(pos).astype(np.int64), 0, wg - 2)
            t = (pos - c0).astype(_F)
            fields = fields[:, :, c0] + (fields[:, :, c0 + 1] - fields[:, :, c0]) * t
        self.H = np.ascontiguousarray(fields[0])
        self.drop = (zc**2 * (1.0 + self.xn**2)[None, :] / _F(2.0 * sc.radius)).astype(_F)
        self.He = self.H - self.drop
        self.fields = fields.reshape(len(fields), -1)
        if self.terrain.cone is not None:
            cx, cy = self.terrain.cone[:2]
            p = np.array([cx - sc.cam_xy[0], cy - sc.cam_xy[1]], _F)
            self.crater_h = float(self.terrain.height(p[:1], p[1:], sc.cam_xy)[0])

    def _grid_noise(self, gx, gy, lam: float, stream: int):
        """Noise of wavelength lam on the column grid, only on rows where it is resolved (else 0)."""
        out = np.zeros(gx.shape, _F)
        zc = self.lod_c * lam * 2.0
        rows = int(np.searchsorted(self.z, zc))
        if rows:
            fade = np.clip(2.0 - 2.0 * self.z[:rows] / zc, 0.0, 1.0).astype(_F)[:, None]
            out[:rows] = self.terrain.noise(stream, gx[:rows], gy[:rows], lam, self.sc.cam_xy) * fade
        return out

    def _normals(self, H, xg):
        """Unit normals (nx, ny, nz) from finite differences on the (distance, column) grid."""
        zc = self.z.astype(_F)[:, None]
        dHdz = np.gradient(H, self.z, axis=0).astype(_F)
        dHdc = np.gradient(H, xg.astype(np.float64), axis=1).astype(_F) / zc
        hu = dHdz - dHdc * xg[None, :]  # along the view direction
        hv = dHdc  # along the camera's right
        hx = hu * _F(self.fwd[0]) + hv * _F(self.right[0])
        hy = hu * _F(self.fwd[1]) + hv * _F(self.right[1])
        inv = 1.0 / np.sqrt(hx * hx + hy * hy + 1.0)
        return -hx * inv, -hy * inv, inv

    def _shadows(self, H, xg, k_step: int = 2, c_step: int = 2, steps: int = 20):
        """Soft cast shadows (1 = lit) on the column grid H (K, Wg) at columns xg: from a subset of
        samples, march towards the light and compare with the terrain looked up in the column grid
        itself (fine near the camera, coarse far away). Occluders outside the view are ignored."""
        sc, K = self.sc, self.K
        wg = len(xg)
        L = sc.light
        lh = math.hypot(L[0], L[1])
        if L[2] <= 0.0:
            return np.zeros((K, wg), _F)
        if lh < 1e-3:
            return np.ones((K, wg), _F)
        tan_e = _F(L[2] / lh)
        lu = _F((L[0] * self.fwd[0] + L[1] * self.fwd[1]) / lh)
        lv = _F((L[0] * self.right[0] + L[1] * self.right[1]) / lh)
        ks = np.arange(0, K, k_step)
        cs = np.unique(np.r_[np.arange(0, wg, c_step), wg - 1])
        pu = self.z[ks].astype(_F)[:, None] + np.zeros(len(cs), _F)[None, :]
        pv = pu * xg[cs][None, :]
        h0 = H[np.ix_(ks, cs)] + _F(1.0)
        d0 = np.maximum(_F(3.0), _F(0.02) * pu)
        Hf = H.reshape(-1)
        lit = np.ones_like(pu)
        inv_lr = _F(1.0 / self.log_ratio)
        dxg = float(xg[1] - xg[0])
        for j in range(steps):
            d = d0 * _F(1.42**j)
            qu = pu + d * lu
            qv = pv + d * lv
            zq = np.maximum(qu, _F(Z_NEAR))
            kf = np.log(zq * _F(1.0 / Z_NEAR)) * inv_lr
            cf = (qv / zq - xg[0]) * _F(1.0 / dxg)
            ok = (qu > Z_NEAR) & (kf < K - 1) & (cf >= 0.0) & (cf <= wg - 1)
            if not ok.any():
                break
            k0 = np.clip(kf.astype(np.int32), 0, K - 2)
            c0 = np.clip(cf.astype(np.int32), 0, wg - 2)
            tk = np.clip(kf - k0, 0.0, 1.0)
            tc = np.clip(cf - c0, 0.0, 1.0)
            i = k0 * wg + c0
            a = Hf.take(i)
            a += (Hf.take(i + 1) - a) * tc
            i += wg
            b = Hf.take(i)
            b += (Hf.take(i + 1) - b) * tc
            hq = a + (b - a) * tk
            clear = (h0 + d * tan_e - hq) / (_F(0.03) * d + _F(2.0))
            lit = np.where(ok, np.minimum(lit, clear), lit)
        lit = np.clip(lit, 0.0, 1.0)
        # back to the full grid: linear along k, then along columns
        kf = np.interp(np.arange(K), ks, np.arange(len(ks)))
        cf = np.interp(np.arange(wg), cs, np.arange(len(cs)))
        k0 = np.minimum(kf.astype(int), len(ks) - 1)
        k1 = np.minimum(k0 + 1, len(ks) - 1)
        c0 = np.minimum(cf.astype(int), len(cs) - 1)
        c1 = np.minimum(c0 + 1, len(cs) - 1)
        tk = (kf - k0).astype(_F)[:, None]
        tc = (cf - c0).astype(_F)[None, :]
        rows = lit[k0] + (lit[k1] - lit[k0]) * tk
        return (rows[:, c0] + (rows[:, c1] - rows[:, c0]) * tc).astype(_F)

    # ---------------------------------------------------------------- ray casting
    def _primary_hits(self):
        """k index of the first column sample above each ray (K = none), (H, W)."""
        n, K = self.n, self.K
        q = (self.He - _F(self.sc.cam_h)) / self.z.astype(_F)[:, None]
        Q = np.maximum.accumulate(q, axis=0)  # (K, W) non-decreasing along k
        # ray of row r (slope s_r) is below Q_k  <=>  r <= rho_k
        rho = n * (self.sc.horizon - Q.astype(np.float64) / (2.0 * self.sc.tan_half)) - 0.5
        bk = np.clip(np.floor(rho), -1, n - 1).astype(np.int64) + 1  # 0..n
        cols = np.broadcast_to(np.arange(n)[None, :], bk.shape)
        counts = np.bincount((cols * (n + 1) + bk).ravel(), minlength=n * (n + 1)).reshape(n, n + 1)
        ge = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # ge[c, j] = #{k: bk >= j}
        return ge[:, 1:].T.copy()  # (H, W): #{k : row <= rho_k} = first k above the ray

    def _interp(self, k_hit, col, s, g_fn):
        """Refine hits between samples k-1 and k; returns z (metres ahead) and gathered fields."""
        K, n = self.K, self.n
        k1 = np.minimum(k_hit, K - 1)
        k0 = np.maximum(k1 - 1, 0)
        z0, z1 = self.z.astype(_F)[k0], self.z.astype(_F)[k1]
        g0, g1 = g_fn(k0, col, z0, s), g_fn(k1, col, z1, s)
        t = np.where(g0 < 0.0, g0 / np.minimum(g0 - g1, -1e-6), 0.0)
        t = np.clip(t, 0.0, 1.0).astype(_F)
        z = z0 + t * (z1 - z0)
        f0 = self.fields[:, k0 * n + col]
        f1 = self.fields[:, k1 * n + col]
        f = f0 + (f1 - f0) * t[None, :]
        f[1:4] /= np.sqrt((f[1:4] ** 2).sum(0, keepdims=True))
        return z, f  # f: height, normal (3), moisture, lit, forest, material n_z, mesa

    def _reflect_hits(self, col, s, k_start):
        """First sample k >= k_start where a ray continuing below the water into the mirror world
        meets mirrored terrain (K = none); sparse min-table descent, O(log K) per ray."""
        K, n, sc = self.K, self.n, self.sc
        p = (2.0 * sc.water - self.H - self.drop - sc.cam_h) / self.z.astype(_F)[:, None]  # (K, W)
        levels = max(1, int(math.ceil(math.log2(K))))
        Kp = K + (1 << levels)
        table = np.full((levels + 1, Kp, n), np.inf, _F)
        table[0, :K] = p
        for j in range(1, levels + 1):
            h = 1 << (j - 1)
            table[j, : Kp - h] = np.minimum(table[j - 1, : Kp - h], table[j - 1, h:])
        flat = table.reshape(-1)
        pos = k_start.astype(np.int64)
        for j in range(levels, -1, -1):
            v = flat[(j * Kp + np.minimum(pos, Kp - 1)) * n + col]
            pos = pos + np.where(v >= s, 1 << j, 0)  # whole block misses: skip it
        return np.minimum(pos, K)

    # ---------------------------------------------------------------- sky
    def _sky(self, dx, dy, dz, disk=True):
        b, L = self.b, self.sc.light
        up = np.maximum(dz, 0.0)
        t = 1.0 - np.exp(-up * _F(b.sky_grad * 2.0))
        hl = np.sqrt(dx * dx + dy * dy) + 1e-6
        lh = math.hypot(L[0], L[1]) + 1e-6
        w = ((1.0 + (dx * L[0] + dy * L[1]) / (hl * lh)) * 0.5) ** 2
        horizon = _mix(_lin(b.horizon_away), _lin(b.horizon_sun), w)
        col = _mix(horizon, _lin(b.zenith)[None, :].repeat(len(dx), 0), t)
        cosg = dx * L[0] + dy * L[1] + dz * L[2]
        glow = b.glow * (0.22 * np.exp((cosg - 1.0) * 5.0) + 0.6 * np.exp((cosg - 1.0) * 80.0))
        glow = glow * (1.0 - 0.6 * t) * _F(0.25 if b.night else 1.0)
        col = col + _lin(b.glow_col)[None, :] * glow[:, None]
        if disk:
            r = math.radians(1.6 if b.night else 1.3)
            d = _smoothstep(math.cos(r * 1.25), math.cos(r), cosg) * (dz > -0.01)
            if b.night:  # moon, with a few darker maria
                disc = _lin("#f0f0e6") * 2.2
                col = _mix(col, np.broadcast_to(disc, col.shape), d)
            else:
                col = col + _lin(b.sun_col)[None, :] * (d * 30.0)[:, None]
        return col

    def _clouds(self, dx, dy, dz, col):
        """Composite the cloud layer over sky colours col; returns (col, cloud alpha)."""
        b, sc = self.b, self.sc
        up = np.maximum(dz, 1e-3)
        t = _F(sc.cloud_h) / up  # distance to the cloud layer along the ray
        px, py = dx * t, dy * t  # relative to the camera (metres)
        c, s = math.cos(sc.cloud_dir), math.sin(sc.cloud_dir)
        u = (px * c + py * s) / (b.cloud_lam * b.cloud_stretch)
        v = (-px * s + py * c) / b.cloud_lam
        far = t / _F(sc.cloud_h)  # ~ 1/elevation
        dens = np.zeros_like(u)
        shade = np.zeros_like(u)
        L = sc.light
        lu = (L[0] * c + L[1] * s) * 0.12
        lv = (-L[0] * s + L[1] * c) * 0.12
        amp = 1.0
        for o in range(5):
            f = 2.0**o
            fade = np.clip(1.6 - far * (0.04 * f), 0.0, 1.0) if o >= 2 else 1.0
            ox, oy = sc.cloud_off[o]
            dens += amp * fade * perlin(u * f + _F(ox), v * f + _F(oy))
            if o < 3:
                shade += amp * perlin((u + _F(lu)) * f + _F(ox), (v + _F(lv)) * f + _F(oy))
            amp *= 0.5
        th = 0.5 - 1.05 * sc.cloud_cover
        alpha = _smoothstep(th, th + 0.35, dens)
        lit = np.clip(0.55 + (dens - shade) * 2.2, 0.0, 1.0)
        ccol = _mix(_lin(b.cloud_dark), _lin(b.cloud_lit), lit)
        if not b.night:  # sunlit edges glow when looking towards the sun
            cosg = np.clip(dx * L[0] + dy * L[1] + dz * L[2], 0.0, 1.0)
            ccol = ccol + _lin(b.glow_col)[None, :] * (b.glow * 0.5 * cosg**8 * (1.0 - alpha))[:, None]
        ccol = ccol * _F(1.25 if not b.night else 1.0)
        # thin out towards the horizon, where the layer is far and hazy
        alpha = alpha * np.clip((dz - 0.01) * 9.0, 0.0, 1.0) * np.exp(-far * 0.03)
        return _mix(col, ccol, alpha), alpha

    def _aurora(self, dx, dy, dz):
        ph = self.sc.aurora_phase
        az = np.arctan2(dy, dx)
        el = np.arcsin(np.clip(dz, -1.0, 1.0))
        centre = 0.32 + 0.1 * np.sin(az * 2.0 + ph[0]) + 0.05 * np.sin(az * 5.0 + ph[1])
        band = np.exp(-(((el - centre) / 0.09) ** 2)) + 0.7 * np.exp(-(((el - centre - 0.12) / 0.06) ** 2))
        rays = 0.5 + 0.5 * perlin(az * 30.0 + _F(ph[2]), el * 1.5 + _F(ph[3]))
        fade = 0.5 + 0.5 * np.sin(az * 1.3 + ph[3])
        inten = band * rays**3 * fade**2 * (el > 0.0) * 0.12
        top = _smoothstep(0.0, 0.2, el - centre)
        col = _mix(_lin("#30ff9a"), _lin("#a050ff"), top)
        return col * inten[:, None]

    def sky_color(self, dx, dy, dz, rows=None, cols=None, stars=True):
        col = self._sky(dx, dy, dz)
        b = self.b
        if b.night and stars and rows is not None:
            i, j = rows // self.ss, cols // self.ss  # one star covers one output pixel
            h = hash01(i, j, self.sc.seed & 0xFFFF)
            tw = hash01(i, j, 77)
            star = _smoothstep(0.992, 1.0, h) * (0.3 + 0.7 * tw) * np.clip(dz * 6.0, 0.0, 1.0)
            col = col + (star * 1.2)[:, None] * _lin("#e8eeff")[None, :]
        if b.aurora:
            col = col + self._aurora(dx, dy, dz)
        col, alpha = self._clouds(dx, dy, dz, col)
        if self.terrain.plume is not None:
            pc, pa = self._plume(dx, dy, dz, self.sc.cam_h if stars else 2.0 * (self.sc.water or 0.0) - self.sc.cam_h)
            col = _mix(col, pc, pa)
            alpha = np.maximum(alpha, pa)
        return col, alpha

    def _plume(self, dx, dy, dz, eye_h):
        """Ash column rising from the crater, drifting with the wind: colour and alpha per ray."""
        cx, cy, radius, peak = self.terrain.cone
        drift, o1, o2 = self.terrain.plume
        b, sc = self.b, self.sc
        px, py = _F(cx - sc.cam_xy[0]), _F(cy - sc.cam_xy[1])
        dist = math.hypot(px, py)
        hn = np.sqrt(dx * dx + dy * dy) + _F(1e-6)
        lat = (dx * py - dy * px) / hn  # signed miss distance in the crater's vertical plane
        rise = _F(eye_h) + dz * (_F(dist) / hn) - _F(self.crater_h)
        off = lat - _F(drift) * rise
        width = 160.0 + 0.45 * np.maximum(rise, 0.0)
        u = off / width
        dens = np.exp(-u * u * 1.5)
        bil = perlin(u * 1.8 + _F(o1), rise / 420.0 + _F(o2))
        bil += 0.5 * perlin(u * 3.6 + _F(o2), rise / 210.0 + _F(o1))
        dens = dens * (0.75 + 0.55 * bil) * _smoothstep(-60.0, 150.0, rise) * _smoothstep(5000.0, 1800.0, rise)
        alpha = np.clip((dens - 0.25) * 2.2, 0.0, 1.0) * (dz > -0.2)
        lit = np.clip(0.45 + 0.5 * bil, 0.0, 1.0)
        col = _mix(_lin("#2e2a2c"), _lin("#8a8482"), lit) * _F(1.2)
        col = col + _lin("#ff6a20")[None, :] * (1.5 * np.exp(-np.maximum(rise, 0.0) / 250.0))[:, None]
        haze = 1.0 - math.exp(-dist * b.fog_density * 0.7)
        col = _mix(col, self.fog_color(dx, dy), np.full(len(dx), haze, _F))
        return col, alpha

    def fog_color(self, dx, dy):
        b = self.b
        col = self._sky(dx, dy, np.full_like(dx, 0.02), disk=False)
        if b.fog_tint:
            col = _mix(col, np.broadcast_to(_lin(b.fog_tint), col.shape), np.full(len(dx), 0.6, _F))
        return col

    def fog(self, col, dist, h0, h1, dx, dy):
        b, sc = self.b, self.sc
        ref = sc.water if sc.water is not None else 0.0
        hs = _F(b.fog_height)
        a = np.clip((h1 - h0) / hs, -40.0, 40.0)
        base = _F(b.fog_density) * np.exp(np.clip(-(h0 - ref) / hs, -40.0, 10.0))
        avg = base * np.where(np.abs(a) > 1e-3, (1.0 - np.exp(-a)) / np.where(a == 0, 1, a), 1.0 - a / 2)
        f = 1.0 - np.exp(-avg * dist)
        return _mix(col, self.fog_color(dx, dy), f)

    # ---------------------------------------------------------------- surfaces
    def _detail(self, wx, wy, dist):
        """Material noise ~[-1, 1] at world points, with fine octaves faded by distance."""
        t, org = self.terrain, self.sc.cam_xy
        i = self.b.octaves + 3
        n1 = 0.55 * t.noise(i, wx, wy, 140.0, org)
        n1 += 0.35 * np.clip(2.0 - dist / 700.0, 0.0, 1.0) * t.noise(i - 1, wx, wy, 19.0, org)
        n1 += 0.25 * np.clip(2.0 - dist / 160.0, 0.0, 1.0) * t.noise(i - 2, wx, wy, 5.0, org)
        return n1, t.noise(i - 3, wx, wy, 700.0, org)

    def shade_terrain(self, wx, wy, f, dist):
        """Colours (N, 3) linear and labels (N,) of terrain points with interpolated fields f."""
        b, sc = self.b, self.sc
        h, nrm, moist, shadow, forest, nz = f[0], f[1:4], f[4], f[5], f[6], f[7]
        det, big = self._detail(wx, wy, dist)
        wet = moist + 0.35 * det
        lab = np.full(h.shape, GRASS, np.uint8)
        if b.ground == "sand":
            lab[wet < 0.7] = SAND
            lab[f[8] > 0.5 + 0.3 * det] = ROCK  # butte tops
        elif b.ground == "rock":
            lab[wet < 0.35] = ROCK
        wl = sc.water if sc.water is not None else -1e9
        lab[forest > 0.5] = FOREST
        beach = (h - wl < b.beach_h * (1.0 + 0.6 * det)) & (nz > 0.75)
        lab[beach] = SAND
        jitter = np.clip(0.6 * big + 0.5 * det, -1.0, 1.0) * _F(b.snow_jitter)
        snow = (h > sc.snow_line + jitter) & (nz > b.snow_rock_nz + 0.05 * det)
        rock = (nz < b.rock_nz + 0.06 * det) & ~snow
        lab[rock] = ROCK
        lab[snow] = SNOW
        # albedo
        alb = np.empty(h.shape + (3,), _F)
        g = _smoothstep(-0.6, 0.6, moist * 0.6 - big * 0.4 - det * 0.4)
        alb[:] = _mix(_lin(b.grass[1]), _lin(b.grass[0]), g)
        m = lab == FOREST
        if m.any():
            # tree crowns: bright tops, dark gaps, fading to a mean tone with distance
            tex = self.terrain.noise(self.b.octaves + 3, wx[m], wy[m], 2.4, sc.cam_xy)
            tex = 1.0 + 0.45 * np.clip(1.6 - dist[m] / 250.0, 0.0, 1.0) * (np.abs(tex) * -2.0 + 0.6)
            fa = _mix(_lin(b.forest[0]), _lin(b.forest[1]), _smoothstep(-0.5, 0.5, det[m]))
            fa = _mix(fa, _lin(b.forest[2]), _smoothstep(0.2, 0.8, moist[m] - 0.5 * det[m]))
            alb[m] = fa * (tex * (1.0 + 0.35 * det[m]))[:, None]
        m = lab == SAND
        if m.any():
            alb[m] = _mix(_lin(b.sand[0]), _lin(b.sand[1]), _smoothstep(-0.6, 0.6, det[m]))
        m = lab == ROCK
        if m.any():
            k = 0.5 + 0.5 * det[m]
            if b.strata:
                k = 0.5 + 0.5 * np.sin(h[m] / 7.0 + 2.5 * det[m])
            alb[m] = _mix(_lin(b.rock[0]), _lin(b.rock[1]), k)
        m = lab == SNOW
        if m.any():
            alb[m] = _lin(b.snow) * (0.93 + 0.07 * det[m])[:, None]
        near = np.nonzero(dist < 90.0)[0]
        if len(near):  # fine texture close to the camera (grass tufts, pebbles, needles)
            fine = self.terrain.noise(self.b.octaves + 1, wx[near], wy[near], 0.9, sc.cam_xy)
            fade = np.clip(1.5 - dist[near] / 60.0, 0.0, 1.0) * np.where(lab[near] == SNOW, 0.3, 1.0)
            alb[near] *= (1.0 + 0.25 * fine * fade)[:, None]
        # light: sun (or moon) with soft cast shadows, sky ambient from above (less inside forest)
        L = sc.light
        sz = nrm[2]
        ndl = np.clip(nrm[0] * L[0] + nrm[1] * L[1] + sz * L[2], 0.0, 1.0) * shadow
        sun = _lin(b.sun_col) * _F(b.sun_int)
        amb = _lin(b.amb_col) * _F(b.amb_int)
        sky = (0.55 + 0.45 * sz) * (1.0 - 0.3 * forest)
        light = ndl[:, None] * sun[None, :] + sky[:, None] * amb[None, :]
        col = alb * light
        if self.terrain.cone is not None:  # glowing lava in the crater
            cx, cy, radius, _ = self.terrain.cone
            r = np.hypot(wx - _F(cx - sc.cam_xy[0]), wy - _F(cy - sc.cam_xy[1])) / _F(radius)
            lava = _smoothstep(0.13, 0.07, r + 0.03 * det)
            if lava.any():
                col = col + _lin("#ff5a10")[None, :] * (6.0 * lava * (0.6 + 0.4 * big))[:, None]
        return col, lab

    def water_surface(self, wx, wy, xn, s, dist):
        """Rippled water normal seen along the camera ray: reflected direction (unit) and Fresnel."""
        b, sc, t, org = self.b, self.sc, self.terrain, self.sc.cam_xy
        i = b.octaves + 3
        near = np.clip(1.5 - dist / 400.0, 0.0, 1.0)
        amp = _F((0.06 if b.water_q and b.water_q[0] >= 0.3 else 0.035) * sc.ripple)
        rx = amp * (near * t.noise(i - 1, wx * 0.5, wy, 4.0, org) + 0.5 * t.noise(i, wx, wy, 40.0, org))
        ry = amp * (near * t.noise(i - 2, wx, wy * 0.5, 4.0, org) + 0.5 * t.noise(i - 1, wx, wy, 40.0, org))
        dx = _F(self.fwd[0]) + xn * _F(self.right[0])
        dy = _F(self.fwd[1]) + xn * _F(self.right[1])
        dn = np.sqrt(dx * dx + dy * dy + s * s)
        dx, dy, dz = dx / dn, dy / dn, s / dn
        nn = np.sqrt(rx * rx + ry * ry + 1.0)
        nx, ny, nz = -rx / nn, -ry / nn, 1.0 / nn
        dot = dx * nx + dy * ny + dz * nz
        ex, ey, ez = dx - 2 * dot * nx, dy - 2 * dot * ny, np.abs(dz - 2 * dot * nz)
        fres = 0.02 + 0.98 * (1.0 - np.clip(-dot, 0.0, 1.0)) ** 5
        return (ex, ey, ez), fres, near

    def shade_water(self, wx, wy, hb, dist, refl, ref_dir, fres, near):
        """Water colour (N, 3): body tint by depth, reflections, Fresnel, sun glitter, foam."""
        b, sc = self.b, self.sc
        depth = np.maximum(_F(sc.water) - hb, 0.0)
        L = sc.light
        sun = _lin(b.sun_col) * _F(b.sun_int)
        amb = _lin(b.amb_col) * _F(b.amb_int)
        body_light = sun * max(float(L[2]), 0.0) * 0.35 + amb
        trans = np.exp(-depth / b.water_clarity)
        body = _mix(_lin(b.water_deep), _lin(b.water_shallow), trans) * body_light
        col = body * (1.0 - fres)[:, None] + refl * fres[:, None]
        ex, ey, ez = ref_dir
        rl = np.clip(ex * L[0] + ey * L[1] + ez * L[2], 0.0, 1.0)
        glit = (rl**800 * 12.0 + rl**60 * (0.05 if b.night else 0.25)) * (L[2] > -0.02)
        col = col + sun[None, :] * glit[:, None]
        if b.foam:
            det, _ = self._detail(wx, wy, dist)
            foam = _smoothstep(0.6, 0.1, depth + 0.5 * det) * b.foam * near
            white = _lin("#f4f6f4") * (sun * max(float(L[2]), 0.2) + amb)
            col = _mix(col, np.broadcast_to(white, col.shape), foam * 0.8)
        return col

    # ---------------------------------------------------------------- all of it
    def render(self):
        sc, n, b = self.sc, self.n, self.b
        k_hit = self._primary_hits().ravel()  # (H*W,)
        rows, cols = np.indices((n, n))
        rows, cols = rows.ravel(), cols.ravel()
        s = self.s[rows]
        xn = self.xn[cols]
        terr = k_hit < self.K
        z_t = np.full(n * n, np.inf, _F)
        # water: first root of  a z^2 + s z + (cam_h - wl) = 0 on the curved surface
        z_w = np.full(n * n, np.inf, _F)
        if sc.water is not None:
            a = (1.0 + xn * xn) / _F(2.0 * sc.radius)
            dh = _F(sc.cam_h - sc.water)
            disc = s * s - 4.0 * a * dh
            ok = (s < 0.0) & (disc >= 0.0)
            z_w[ok] = 2.0 * dh / (-s[ok] + np.sqrt(disc[ok]))
        cam_h = _F(sc.cam_h)
        He = self.He.reshape(-1)

        def g_primary(k, c, zk, sk):
            return He[k * n + c] - (cam_h + sk * zk)

        it = np.nonzero(terr)[0]
        zt, ft = self._interp(k_hit[it], cols[it], s[it], g_primary)
        z_t[it] = zt
        is_water = np.isfinite(z_w) & (z_w < z_t)
        is_terr = terr & ~is_water
        is_sky = ~is_terr & ~is_water
        labels = np.full(n * n, SKY, np.uint8)
        depth = np.full(n * n, FAR_DEPTH, _F)
        img = np.zeros((n * n, 3), _F)
        norm = np.sqrt(1.0 + xn * xn + s * s)
        dirx = (_F(self.fwd[0]) + xn * _F(self.right[0])) / norm
        diry = (_F(self.fwd[1]) + xn * _F(self.right[1])) / norm
        dirz = s / norm
        fx, fy, rx, ry = (_F(v) for v in (self.fwd[0], self.fwd[1], self.right[0], self.right[1]))

        # terrain
        keep = is_terr[it]
        m = it[keep]
        if len(m):
            zt, ft = zt[keep], ft[:, keep]
            dist = zt * norm[m]
            col, lab = self.shade_terrain(zt * (fx + xn[m] * rx), zt * (fy + xn[m] * ry), ft, dist)
            img[m] = self.fog(col, dist, cam_h, ft[0], dirx[m], diry[m])
            labels[m] = lab
            depth[m] = dist

        # sky
        m = np.nonzero(is_sky)[0]
        if len(m):
            col, alpha = self.sky_color(dirx[m], diry[m], dirz[m], rows[m], cols[m])
            img[m] = col
            labels[m[alpha > 0.5]] = CLOUD

        # water
        m = np.nonzero(is_water)[0]
        if len(m):
            zw, sm, xm, cm = z_w[m], s[m], xn[m], cols[m]
            dist = zw * norm[m]
            wx, wy = zw * (fx + xm * rx), zw * (fy + xm * ry)
            kf = np.log(np.maximum(zw, Z_NEAR) / Z_NEAR) / self.log_ratio
            k0 = np.clip(np.floor(kf).astype(np.int64), 0, self.K - 1)
            k1 = np.minimum(k0 + 1, self.K - 1)
            tt = np.clip(kf - k0, 0.0, 1.0).astype(_F)
            Hf = self.H.reshape(-1)
            hb = Hf[k0 * n + cm] * (1 - tt) + Hf[k1 * n + cm] * tt  # lake bottom under the hit
            (ex, ey, ez), fres, near = self.water_surface(wx, wy, xm, sm, dist)
            # reflection: mirrored terrain where the mirrored ray meets it, else sky
            sref = -ez * norm[m]  # camera-ray slope whose mirror image leaves along the reflection
            kr = self._reflect_hits(cm, sref, k1)
            hit = kr < self.K
            refl = np.zeros((len(m), 3), _F)
            sky_c, _ = self.sky_color(ex[~hit], ey[~hit], ez[~hit], stars=False)
            refl[~hit] = sky_c
            if hit.any():
                hm = np.nonzero(hit)[0]
                wl2 = _F(2.0 * sc.water)
                Hd = (self.H + self.drop).reshape(-1)

                def g_mirror(k, c, zk, sk):
                    return (cam_h + sk * zk) - (wl2 - Hd[k * n + c])

                zr, fr = self._interp(kr[hm], cm[hm], sref[hm], g_mirror)
                zr = np.maximum(zr, zw[hm])
                dr = zr * np.sqrt(1.0 + xm[hm] ** 2 + sref[hm] ** 2)
                rc, _ = self.shade_terrain(zr * (fx + xm[hm] * rx), zr * (fy + xm[hm] * ry), fr, dr)
                refl[hm] = self.fog(rc, np.maximum(dr - dist[hm], 0.0), _F(sc.water), fr[0],
                                    ex[hit], ey[hit])
            col = self.shade_water(wx, wy, hb, dist, refl, (ex, ey, ez), fres, near)
            img[m] = self.fog(col, dist, cam_h, _F(sc.water), dirx[m], diry[m])
            labels[m] = WATER
            depth[m] = dist

        img = img.reshape(n, n, 3) * _F(b.exposure)
        return img, depth.reshape(n, n), labels.reshape(n, n)


def _tonemap(img: np.ndarray) -> np.ndarray:
    """Linear HDR -> sRGB uint8 with a soft shoulder."""
    x = 1.0 - np.exp(-img * 1.35)
    return np.clip(np.rint(x ** (1.0 / 2.2) * 255.0), 0, 255).astype(np.uint8)


def _downsample(img, depth, labels, size, ss):
    """Box-filter the image; label = majority of the ss*ss sub-samples (ties: nearest), depth =
    nearest sub-sample carrying that label."""
    if ss == 1:
        return img, depth, labels
    img = img.reshape(size, ss, size, ss, 3).mean((1, 3))
    S = ss * ss
    L = labels.reshape(size, ss, size, ss).transpose(0, 2, 1, 3).reshape(-1, S)
    D = depth.reshape(size, ss, size, ss).transpose(0, 2, 1, 3).reshape(-1, S)
    out_l = L[:, 0].copy()
    out_d = D.min(1)
    mixed = np.nonzero((L != L[:, :1]).any(1))[0]  # only pixels on a label edge need a vote
    if len(mixed):
        Lm, Dm = L[mixed], D[mixed]
        same = Lm[:, :, None] == Lm[:, None, :]  # (M, S, S)
        count = same.sum(-1)
        dmin = np.where(same, Dm[:, None, :], np.inf).min(-1)
        pick = (count * 1e6 - dmin).argmax(-1)[:, None]
        out_l[mixed] = np.take_along_axis(Lm, pick, 1)[:, 0]
        out_d[mixed] = np.take_along_axis(dmin, pick, 1)[:, 0]
    return img, out_d.reshape(size, size).astype(_F), out_l.reshape(size, size)


def _render_arrays(seed: int, size: int, class_id, supersample: int):
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cls = seed % len(CLASS_NAMES) if class_id is None else class_id_of(class_id)
    r = _Renderer(seed, cls, size, supersample)
    img, depth, labels = r.render()
    img, depth, labels = _downsample(img, depth, labels, size, supersample)
    sc = r.sc
    info = {
        "class_name": CLASS_NAMES[cls],
        "camera_xy": [float(sc.cam_xy[0]), float(sc.cam_xy[1])],
        "camera_height": float(sc.cam_h),
        "heading": float(sc.heading),
        "tan_half_fov": float(sc.tan_half),
        "horizon": float(sc.horizon),
        "water_level": None if sc.water is None else float(sc.water),
        "curvature_radius": float(sc.radius),
        "snow_line": float(sc.snow_line),
        "snow_jitter": float(r.b.snow_jitter),
        "light_dir": [float(v) for v in sc.light],
        "night": bool(r.b.night),
    }
    return _tonemap(img), depth, labels.astype(np.uint8), cls, info


def render(seed: int, size: int = 128, class_id: int | str | None = None, supersample: int = 2) -> WorldSample:
    """Render world ``seed`` as a size x size view. class_id (id or name) overrides seed % N: the same
    seed then gives the same terrain draw and camera under another biome and light."""
    img, depth, labels, cls, info = _render_arrays(seed, size, class_id, supersample)
    return WorldSample(image=Image.fromarray(img, "RGB"), depth=depth, labels=labels, class_id=cls,
                       seed=int(seed), info=info)


@dataclass
class WorldBatch:
    """Stacked renders: images (N,H,W,3) uint8, depth (N,H,W) float32, labels (N,H,W) uint8,
    class_ids (N,) int64, seeds (N,) int64. Unpacks as (images, depth, labels, class_ids)."""

    images: np.ndarray
    depth: np.ndarray
    labels: np.ndarray
    class_ids: np.ndarray
    seeds: np.ndarray

    def __iter__(self):
        return iter((self.images, self.depth, self.labels, self.class_ids))

    def __len__(self):
        return len(self.seeds)


def render_batch(seeds, size: int = 128, class_ids=None, supersample: int = 2) -> WorldBatch:
    """Render many seeds into stacked arrays (each image is vectorised over all its pixels)."""
    seeds = [int(s) for s in seeds]
    if class_ids is not None and len(class_ids) != len(seeds):
        raise ValueError("class_ids must have one entry per seed")
    n = len(seeds)
    images = np.empty((n, size, size, 3), np.uint8)
    depth = np.empty((n, size, size), np.float32)
    labels = np.empty((n, size, size), np.uint8)
    cids = np.empty(n, np.int64)
    for i, seed in enumerate(seeds):
        cid = None if class_ids is None else class_ids[i]
        images[i], depth[i], labels[i], cids[i], _ = _render_arrays(seed, size, cid, supersample)
    return WorldBatch(images, depth, labels, cids, np.asarray(seeds, np.int64))
