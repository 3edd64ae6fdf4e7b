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

The modules, in that order: scene.py (1-2, every random draw), terrain.py (the height field),
columns.py (3-4: column grid, ray casting), sky.py and materials.py (5), resolve.py (sub-samples to
pixels); this one traces every pixel's ray through them and holds the entry points.

Outputs per pixel (see ``WorldSample``):
- depth: Euclidean distance in metres from the camera centre to the surface point along the pixel's
  view ray (ray range, not z-depth). Sky and cloud pixels get ``FAR_DEPTH`` (20000 m); every
  surface lies nearer than 16000 m.
- labels: ids into ``SEG_CLASSES``. With supersampling, a pixel's label is the majority of its
  sub-samples (ties go to the nearest surface) and its depth is the nearest sub-sample of that
  label, so label and depth always describe the same sub-sample: sky/cloud <=> depth == FAR_DEPTH.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .blend import F32
from .classes import CLASS_NAMES, SEG, class_id_of
from .columns import ColumnGrid
from .materials import Surfaces
from .resolve import downsample, tonemap
from .scene import FAR_DEPTH, WORLD_VERSION, Z_NEAR
from .sky import Sky

__all__ = ["FAR_DEPTH", "WORLD_VERSION", "WorldBatch", "WorldSample", "render", "render_batch"]

SKY, CLOUD, WATER = SEG["sky"], SEG["cloud"], SEG["water"]


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



class _Picture:
    """The supersampled picture of one view: each sub-pixel ray is traced to terrain, water or sky,
    which give its linear colour, its label and its depth (ray range)."""

    def __init__(self, seed: int, cls: int, size: int, ss: int):
        self.grid = g = ColumnGrid(seed, cls, size, ss)
        self.sky, self.surfaces = Sky(g), Surfaces(g)
        self.sc, self.b, n = g.sc, g.b, g.n
        rows, cols = np.indices((n, n))
        self.rows, self.cols = rows.ravel(), cols.ravel()
        self.s = g.s[self.rows]
        self.xn = g.xn[self.cols]
        self.cam_h = F32(self.sc.cam_h)
        self.norm = np.sqrt(1.0 + self.xn * self.xn + self.s * self.s)
        self.dirx = (F32(g.fwd[0]) + self.xn * F32(g.right[0])) / self.norm
        self.diry = (F32(g.fwd[1]) + self.xn * F32(g.right[1])) / self.norm
        self.dirz = self.s / self.norm
        self.fx, self.fy, self.rx, self.ry = (F32(v) for v in (g.fwd[0], g.fwd[1], g.right[0], g.right[1]))
        self.labels = np.full(n * n, SKY, np.uint8)
        self.depth = np.full(n * n, FAR_DEPTH, F32)
        self.img = np.zeros((n * n, 3), F32)

    def render(self):
        """(image (n, n, 3) linear, depth (n, n), labels (n, n)) at n = size * supersample."""
        g, n, s = self.grid, self.grid.n, self.s
        k_hit = g.primary_hits().ravel()  # (H*W,)
        terr = k_hit < g.K
        z_t = np.full(n * n, np.inf, F32)
        z_w = self._water_range()
        cam_h = self.cam_h
        He = g.He.reshape(-1)

        def g_primary(k, c, zk, sk):
            return He[k * n + c] - (cam_h + sk * zk)

        it = np.nonzero(terr)[0]
        zt, ft = g.interp(k_hit[it], self.cols[it], s[it], g_primary)
        z_t[it] = zt
        is_water = np.isfinite(z_w) & (z_w < z_t)
        is_terr = terr & ~is_water
        is_sky = ~is_terr & ~is_water
        keep = is_terr[it]
        self._terrain(it[keep], zt[keep], ft[:, keep])
        self._sky(np.nonzero(is_sky)[0])
        self._water(np.nonzero(is_water)[0], z_w)
        img = self.img.reshape(n, n, 3) * F32(self.b.exposure)
        return img, self.depth.reshape(n, n), self.labels.reshape(n, n)

    def _water_range(self):
        """Distance ahead to the water: first root of  a z^2 + s z + (cam_h - wl) = 0 on the curved
        surface (inf where the ray misses it)."""
        sc, s, xn = self.sc, self.s, self.xn
        z_w = np.full(len(s), np.inf, F32)
        if sc.water is not None:
            a = (1.0 + xn * xn) / F32(2.0 * sc.radius)
            dh = F32(sc.cam_h - sc.water)
            disc = s * s - 4.0 * a * dh
            ok = (s < 0.0) & (disc >= 0.0)
            z_w[ok] = 2.0 * dh / (-s[ok] + np.sqrt(disc[ok]))
        return z_w

    def _terrain(self, m, zt, ft):
        if not len(m):
            return
        xn = self.xn[m]
        dist = zt * self.norm[m]
        col, lab = self.surfaces.shade_terrain(zt * (self.fx + xn * self.rx), zt * (self.fy + xn * self.ry), ft, dist)
        self.img[m] = self.sky.fog(col, dist, self.cam_h, ft[0], self.dirx[m], self.diry[m])
        self.labels[m] = lab
        self.depth[m] = dist

    def _sky(self, m):
        if not len(m):
            return
        col, alpha = self.sky.color(self.dirx[m], self.diry[m], self.dirz[m], self.rows[m], self.cols[m])
        self.img[m] = col
        self.labels[m[alpha > 0.5]] = CLOUD

    def _water(self, m, z_w):
        if not len(m):
            return
        g, sc, n = self.grid, self.sc, self.grid.n
        zw, sm, xm, cm = z_w[m], self.s[m], self.xn[m], self.cols[m]
        dist = zw * self.norm[m]
        wx, wy = zw * (self.fx + xm * self.rx), zw * (self.fy + xm * self.ry)
        kf = np.log(np.maximum(zw, Z_NEAR) / Z_NEAR) / g.log_ratio
        k0 = np.clip(np.floor(kf).astype(np.int64), 0, g.K - 1)
        k1 = np.minimum(k0 + 1, g.K - 1)
        tt = np.clip(kf - k0, 0.0, 1.0).astype(F32)
        Hf = g.H.reshape(-1)
        hb = Hf[k0 * n + cm] * (1 - tt) + Hf[k1 * n + cm] * tt  # lake bottom under the hit
        (ex, ey, ez), fres, near = self.surfaces.water_surface(wx, wy, xm, sm, dist)
        refl = self._reflection(m, zw, dist, k1, (ex, ey, ez))
        col = self.surfaces.shade_water(wx, wy, hb, dist, refl, (ex, ey, ez), fres, near)
        self.img[m] = self.sky.fog(col, dist, self.cam_h, F32(sc.water), self.dirx[m], self.diry[m])
        self.labels[m] = WATER
        self.depth[m] = dist

    def _reflection(self, m, zw, dist, k1, ref_dir):
        """Colour reflected by the water at pixels m: mirrored terrain where the mirrored ray meets it,
        else sky."""
        g, sc, n, cam_h = self.grid, self.sc, self.grid.n, self.cam_h
        ex, ey, ez = ref_dir
        xm, cm = self.xn[m], self.cols[m]
        sref = -ez * self.norm[m]  # camera-ray slope whose mirror image leaves along the reflection
        kr = g.reflect_hits(cm, sref, k1)
        hit = kr < g.K
        refl = np.zeros((len(m), 3), F32)
        sky_c, _ = self.sky.color(ex[~hit], ey[~hit], ez[~hit], stars=False)
        refl[~hit] = sky_c
        if hit.any():
            hm = np.nonzero(hit)[0]
            wl2 = F32(2.0 * sc.water)
            Hd = (g.H + g.drop).reshape(-1)

            def g_mirror(k, c, zk, sk):
                return (cam_h + sk * zk) - (wl2 - Hd[k * n + c])

            zr, fr = g.interp(kr[hm], cm[hm], sref[hm], g_mirror)
            zr = np.maximum(zr, zw[hm])
            dr = zr * np.sqrt(1.0 + xm[hm] ** 2 + sref[hm] ** 2)
            rc, _ = self.surfaces.shade_terrain(zr * (self.fx + xm[hm] * self.rx), zr * (self.fy + xm[hm] * self.ry),
                                                fr, dr)
            refl[hm] = self.sky.fog(rc, np.maximum(dr - dist[hm], 0.0), F32(sc.water), fr[0], ex[hit], ey[hit])
        return refl


def _render_arrays(seed: int, size: int, class_id, supersample: int):
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cls = seed % len(CLASS_NAMES) if class_id is None else class_id_of(class_id)
    r = _Picture(seed, cls, size, supersample)
    img, depth, labels = r.render()
    img, depth, labels = downsample(img, depth, labels, size, supersample)
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
    return tonemap(img), depth, labels.astype(np.uint8), cls, info


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
