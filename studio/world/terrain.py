"""The height field H(x, y) of one world: hills, ridged mountains under a mask, mesas, dunes, a volcano."""
from __future__ import annotations

import math

import numpy as np

from .biomes import Biome
from .blend import F32, smoothstep
from .noise import perlin


class Terrain:
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
        u = x * F32(c * k) - y * F32(s * k) + F32(ou)
        v = x * F32(s * k) + y * F32(c * k) + F32(ov)
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
        hill = np.zeros(shape, F32)
        ridge = np.zeros(shape, F32) if b.mtn_amp else None
        weight = np.ones(shape, F32) if b.mtn_amp else None
        rows = shape[0]
        n_oct = b.octaves if max_oct is None else min(max_oct, b.octaves)
        for i in range(n_oct):
            lam = b.lam0 * 0.5**i
            if z is not None:
                zc = lod_c * lam
                n = int(np.searchsorted(z, zc))
                if n == 0:
                    break
                fade = np.clip(2.0 - 2.0 * z[:n] / zc, 0.0, 1.0).astype(F32)[:, None]
            else:
                n, fade = rows, F32(1.0)
            nv = self.noise(i, x[:n], y[:n], lam, org)
            amp = F32(0.5**i)
            hill[:n] += nv * (amp * fade)
            if ridge is not None:
                r = 1.0 - np.abs(nv)
                r = r * r if b.ridge_sharp == 2.0 else r ** F32(b.ridge_sharp)
                r *= weight[:n]
                weight[:n] = np.clip(r * 1.6, 0.0, 1.0)
                ridge[:n] += r * (amp * fade)
        h = b.hill_amp * hill
        mask = None
        if ridge is not None:
            mask = smoothstep(b.mask_lo, b.mask_hi, self.noise(b.octaves, x, y, b.mask_lam, org))
            h = h + b.mtn_amp * mask * np.maximum(ridge - 0.15, 0.0)
        if b.mesa_amp:
            # buttes: two plateau levels of a low-frequency field, edges eroded by the hills' noise
            m = self.noise(b.octaves, x, y, b.mesa_lam, org) + 0.3 * hill
            lo, hi = smoothstep(0.25, 0.3, m), smoothstep(0.5, 0.55, m)
            h = h + b.mesa_amp * (0.6 * lo + 0.4 * hi)
            mask = lo
        if b.dune_amp:
            h = h + self._dunes(x, y, org, z, lod_c) * (1.0 - mask if mask is not None else 1.0)
        if self.cone is not None:
            h = h + self._cone(x, y, org)
        h = h.astype(F32, copy=False)
        if with_mesa:
            return h, (lo if b.mesa_amp else np.zeros(shape, F32))
        return h

    def _dunes(self, x, y, org, z, lod_c):
        b = self.b
        lam = b.dune_lam
        n = b.octaves + 2
        if z is not None:
            zc = lod_c * lam * 2.0
            rows = max(int(np.searchsorted(z, zc)), 1)
            fade = np.clip(2.0 - 2.0 * z[:rows] / zc, 0.0, 1.0).astype(F32)[:, None]
        else:
            rows, fade = x.shape[0], F32(1.0)
        xs, ys = x[:rows], y[:rows]
        c, s = math.cos(self.dune_dir), math.sin(self.dune_dir)
        phase0 = ((org[0] * c + org[1] * s) / lam) % 1.0
        phase = (xs * F32(c / lam) + ys * F32(s / lam) + F32(phase0)
                 + 0.9 * self.noise(n, xs, ys, lam * 3.0, org))
        fr = phase - np.floor(phase)
        # long convex windward side up to a sharp crest, short steep lee side
        p = np.minimum(fr * F32(1.0 / 0.78), 1.0)
        q = np.clip((fr - 0.78) * F32(1.0 / 0.22), 0.0, 1.0)  # fr near 1 rounds q past 1: (1 - q) ** 1.5 is NaN
        shape = (1.0 - (1.0 - p) ** 2) * (1.0 - q) ** 1.5
        amp = b.dune_amp * (0.6 + 0.4 * self.noise(n, xs, ys, lam * 11.0, org))
        out = np.zeros(x.shape, F32)
        out[:rows] = amp * shape * fade
        return out

    def _cone(self, x, y, org):
        cx, cy, radius, peak = self.cone
        dx = x - F32(cx - org[0])
        dy = y - F32(cy - org[1])
        r = np.sqrt(dx * dx + dy * dy) / F32(radius)
        prof = np.clip(1.0 - r, 0.0, 1.0)
        h = peak * prof**1.7
        h -= 0.13 * peak * smoothstep(0.1, 0.0, r)  # crater
        return h

