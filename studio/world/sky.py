"""Sky and atmosphere: the sky dome with sun or moon, stars, aurora, clouds, a volcano's ash plume, and
height-dependent haze over distant surfaces."""
from __future__ import annotations

import math

import numpy as np

from .blend import F32, lin, mix, smoothstep
from .noise import hash01, perlin


class Sky:
    """Colours of rays that leave the world (and of the fog in front of surfaces) for one view."""

    def __init__(self, grid):
        self.b, self.sc, self.terrain, self.ss = grid.b, grid.sc, grid.terrain, grid.ss
        self.crater_h = grid.crater_h

    def _dome(self, dx, dy, dz, disk=True):
        b, L = self.b, self.sc.light
        up = np.maximum(dz, 0.0)
        t = 1.0 - np.exp(-up * F32(b.sky_grad * 2.0))
        hl = np.sqrt(dx * dx + dy * dy) + 1e-6
        lh = math.hypot(L[0], L[1]) + 1e-6
        w = ((1.0 + (dx * L[0] + dy * L[1]) / (hl * lh)) * 0.5) ** 2
        horizon = mix(lin(b.horizon_away), lin(b.horizon_sun), w)
        col = mix(horizon, lin(b.zenith)[None, :].repeat(len(dx), 0), t)
        cosg = dx * L[0] + dy * L[1] + dz * L[2]
        glow = b.glow * (0.22 * np.exp((cosg - 1.0) * 5.0) + 0.6 * np.exp((cosg - 1.0) * 80.0))
        glow = glow * (1.0 - 0.6 * t) * F32(0.25 if b.night else 1.0)
        col = col + lin(b.glow_col)[None, :] * glow[:, None]
        if disk:
            r = math.radians(1.6 if b.night else 1.3)
            d = smoothstep(math.cos(r * 1.25), math.cos(r), cosg) * (dz > -0.01)
            if b.night:  # moon, with a few darker maria
                disc = lin("#f0f0e6") * 2.2
                col = mix(col, np.broadcast_to(disc, col.shape), d)
            else:
                col = col + lin(b.sun_col)[None, :] * (d * 30.0)[:, None]
        return col

    def _clouds(self, dx, dy, dz, col):
        """Composite the cloud layer over sky colours col; returns (col, cloud alpha)."""
        b, sc = self.b, self.sc
        up = np.maximum(dz, 1e-3)
        t = F32(sc.cloud_h) / up  # distance to the cloud layer along the ray
        px, py = dx * t, dy * t  # relative to the camera (metres)
        c, s = math.cos(sc.cloud_dir), math.sin(sc.cloud_dir)
        u = (px * c + py * s) / (b.cloud_lam * b.cloud_stretch)
        v = (-px * s + py * c) / b.cloud_lam
        far = t / F32(sc.cloud_h)  # ~ 1/elevation
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
            dens += amp * fade * perlin(u * f + F32(ox), v * f + F32(oy))
            if o < 3:
                shade += amp * perlin((u + F32(lu)) * f + F32(ox), (v + F32(lv)) * f + F32(oy))
            amp *= 0.5
        th = 0.5 - 1.05 * sc.cloud_cover
        alpha = smoothstep(th, th + 0.35, dens)
        lit = np.clip(0.55 + (dens - shade) * 2.2, 0.0, 1.0)
        ccol = mix(lin(b.cloud_dark), lin(b.cloud_lit), lit)
        if not b.night:  # sunlit edges glow when looking towards the sun
            cosg = np.clip(dx * L[0] + dy * L[1] + dz * L[2], 0.0, 1.0)
            ccol = ccol + lin(b.glow_col)[None, :] * (b.glow * 0.5 * cosg**8 * (1.0 - alpha))[:, None]
        ccol = ccol * F32(1.25 if not b.night else 1.0)
        # thin out towards the horizon, where the layer is far and hazy
        alpha = alpha * np.clip((dz - 0.01) * 9.0, 0.0, 1.0) * np.exp(-far * 0.03)
        return mix(col, ccol, alpha), alpha

    def _aurora(self, dx, dy, dz):
        ph = self.sc.aurora_phase
        az = np.arctan2(dy, dx)
        el = np.arcsin(np.clip(dz, -1.0, 1.0))
        centre = 0.32 + 0.1 * np.sin(az * 2.0 + ph[0]) + 0.05 * np.sin(az * 5.0 + ph[1])
        band = np.exp(-(((el - centre) / 0.09) ** 2)) + 0.7 * np.exp(-(((el - centre - 0.12) / 0.06) ** 2))
        rays = 0.5 + 0.5 * perlin(az * 30.0 + F32(ph[2]), el * 1.5 + F32(ph[3]))
        fade = 0.5 + 0.5 * np.sin(az * 1.3 + ph[3])
        inten = band * rays**3 * fade**2 * (el > 0.0) * 0.12
        top = smoothstep(0.0, 0.2, el - centre)
        col = mix(lin("#30ff9a"), lin("#a050ff"), top)
        return col * inten[:, None]

    def color(self, dx, dy, dz, rows=None, cols=None, stars=True):
        col = self._dome(dx, dy, dz)
        b = self.b
        if b.night and stars and rows is not None:
            i, j = rows // self.ss, cols // self.ss  # one star covers one output pixel
            h = hash01(i, j, self.sc.seed & 0xFFFF)
            tw = hash01(i, j, 77)
            star = smoothstep(0.992, 1.0, h) * (0.3 + 0.7 * tw) * np.clip(dz * 6.0, 0.0, 1.0)
            col = col + (star * 1.2)[:, None] * lin("#e8eeff")[None, :]
        if b.aurora:
            col = col + self._aurora(dx, dy, dz)
        col, alpha = self._clouds(dx, dy, dz, col)
        if self.terrain.plume is not None:
            pc, pa = self._plume(dx, dy, dz, self.sc.cam_h if stars else 2.0 * (self.sc.water or 0.0) - self.sc.cam_h)
            col = mix(col, pc, pa)
            alpha = np.maximum(alpha, pa)
        return col, alpha

    def _plume(self, dx, dy, dz, eye_h):
        """Ash column rising from the crater, drifting with the wind: colour and alpha per ray."""
        cx, cy, radius, peak = self.terrain.cone
        drift, o1, o2 = self.terrain.plume
        b, sc = self.b, self.sc
        px, py = F32(cx - sc.cam_xy[0]), F32(cy - sc.cam_xy[1])
        dist = math.hypot(px, py)
        hn = np.sqrt(dx * dx + dy * dy) + F32(1e-6)
        lat = (dx * py - dy * px) / hn  # signed miss distance in the crater's vertical plane
        rise = F32(eye_h) + dz * (F32(dist) / hn) - F32(self.crater_h)
        off = lat - F32(drift) * rise
        width = 160.0 + 0.45 * np.maximum(rise, 0.0)
        u = off / width
        dens = np.exp(-u * u * 1.5)
        bil = perlin(u * 1.8 + F32(o1), rise / 420.0 + F32(o2))
        bil += 0.5 * perlin(u * 3.6 + F32(o2), rise / 210.0 + F32(o1))
        dens = dens * (0.75 + 0.55 * bil) * smoothstep(-60.0, 150.0, rise) * smoothstep(5000.0, 1800.0, rise)
        alpha = np.clip((dens - 0.25) * 2.2, 0.0, 1.0) * (dz > -0.2)
        lit = np.clip(0.45 + 0.5 * bil, 0.0, 1.0)
        col = mix(lin("#2e2a2c"), lin("#8a8482"), lit) * F32(1.2)
        col = col + lin("#ff6a20")[None, :] * (1.5 * np.exp(-np.maximum(rise, 0.0) / 250.0))[:, None]
        haze = 1.0 - math.exp(-dist * b.fog_density * 0.7)
        col = mix(col, self.fog_color(dx, dy), np.full(len(dx), haze, F32))
        return col, alpha

    def fog_color(self, dx, dy):
        b = self.b
        col = self._dome(dx, dy, np.full_like(dx, 0.02), disk=False)
        if b.fog_tint:
            col = mix(col, np.broadcast_to(lin(b.fog_tint), col.shape), np.full(len(dx), 0.6, F32))
        return col

    def fog(self, col, dist, h0, h1, dx, dy):
        b, sc = self.b, self.sc
        ref = sc.water if sc.water is not None else 0.0
        hs = F32(b.fog_height)
        a = np.clip((h1 - h0) / hs, -40.0, 40.0)
        base = F32(b.fog_density) * np.exp(np.clip(-(h0 - ref) / hs, -40.0, 10.0))
        avg = base * np.where(np.abs(a) > 1e-3, (1.0 - np.exp(-a)) / np.where(a == 0, 1, a), 1.0 - a / 2)
        f = 1.0 - np.exp(-avg * dist)
        return mix(col, self.fog_color(dx, dy), f)
