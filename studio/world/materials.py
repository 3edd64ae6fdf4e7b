"""Surfaces: materials and labels of terrain points (sand, grass, forest, rock, snow) under sun and sky
light; rippled water with reflections, Fresnel, sun glitter, depth tint and shore foam."""
from __future__ import annotations

import numpy as np

from .blend import F32, lin, mix, smoothstep
from .classes import SEG

SAND, GRASS, FOREST, ROCK, SNOW = SEG["sand"], SEG["grass"], SEG["forest"], SEG["rock"], SEG["snow"]


class Surfaces:
    """Shading of the surface points of one view."""

    def __init__(self, grid):
        self.b, self.sc, self.terrain = grid.b, grid.sc, grid.terrain
        self.fwd, self.right = grid.fwd, grid.right

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
        jitter = np.clip(0.6 * big + 0.5 * det, -1.0, 1.0) * F32(b.snow_jitter)
        snow = (h > sc.snow_line + jitter) & (nz > b.snow_rock_nz + 0.05 * det)
        rock = (nz < b.rock_nz + 0.06 * det) & ~snow
        lab[rock] = ROCK
        lab[snow] = SNOW
        # albedo
        alb = np.empty(h.shape + (3,), F32)
        g = smoothstep(-0.6, 0.6, moist * 0.6 - big * 0.4 - det * 0.4)
        alb[:] = mix(lin(b.grass[1]), lin(b.grass[0]), g)
        m = lab == FOREST
        if m.any():
            # tree crowns: bright tops, dark gaps, fading to a mean tone with distance
            tex = self.terrain.noise(self.b.octaves + 3, wx[m], wy[m], 2.4, sc.cam_xy)
            tex = 1.0 + 0.45 * np.clip(1.6 - dist[m] / 250.0, 0.0, 1.0) * (np.abs(tex) * -2.0 + 0.6)
            fa = mix(lin(b.forest[0]), lin(b.forest[1]), smoothstep(-0.5, 0.5, det[m]))
            fa = mix(fa, lin(b.forest[2]), smoothstep(0.2, 0.8, moist[m] - 0.5 * det[m]))
            alb[m] = fa * (tex * (1.0 + 0.35 * det[m]))[:, None]
        m = lab == SAND
        if m.any():
            alb[m] = mix(lin(b.sand[0]), lin(b.sand[1]), smoothstep(-0.6, 0.6, det[m]))
        m = lab == ROCK
        if m.any():
            k = 0.5 + 0.5 * det[m]
            if b.strata:
                k = 0.5 + 0.5 * np.sin(h[m] / 7.0 + 2.5 * det[m])
            alb[m] = mix(lin(b.rock[0]), lin(b.rock[1]), k)
        m = lab == SNOW
        if m.any():
            alb[m] = lin(b.snow) * (0.93 + 0.07 * det[m])[:, None]
        near = np.nonzero(dist < 90.0)[0]
        if len(near):  # fine texture close to the camera (grass tufts, pebbles, needles)
            fine = self.terrain.noise(self.b.octaves + 1, wx[near], wy[near], 0.9, sc.cam_xy)
            fade = np.clip(1.5 - dist[near] / 60.0, 0.0, 1.0) * np.where(lab[near] == SNOW, 0.3, 1.0)
            alb[near] *= (1.0 + 0.25 * fine * fade)[:, None]
        # light: sun (or moon) with soft cast shadows, sky ambient from above (less inside forest)
        L = sc.light
        sz = nrm[2]
        ndl = np.clip(nrm[0] * L[0] + nrm[1] * L[1] + sz * L[2], 0.0, 1.0) * shadow
        sun = lin(b.sun_col) * F32(b.sun_int)
        amb = lin(b.amb_col) * F32(b.amb_int)
        sky = (0.55 + 0.45 * sz) * (1.0 - 0.3 * forest)
        light = ndl[:, None] * sun[None, :] + sky[:, None] * amb[None, :]
        col = alb * light
        if self.terrain.cone is not None:  # glowing lava in the crater
            cx, cy, radius, _ = self.terrain.cone
            r = np.hypot(wx - F32(cx - sc.cam_xy[0]), wy - F32(cy - sc.cam_xy[1])) / F32(radius)
            lava = smoothstep(0.13, 0.07, r + 0.03 * det)
            if lava.any():
                col = col + lin("#ff5a10")[None, :] * (6.0 * lava * (0.6 + 0.4 * big))[:, None]
        return col, lab

    def water_surface(self, wx, wy, xn, s, dist):
        """Rippled water normal seen along the camera ray: reflected direction (unit) and Fresnel."""
        b, sc, t, org = self.b, self.sc, self.terrain, self.sc.cam_xy
        i = b.octaves + 3
        near = np.clip(1.5 - dist / 400.0, 0.0, 1.0)
        amp = F32((0.06 if b.water_q and b.water_q[0] >= 0.3 else 0.035) * sc.ripple)
        rx = amp * (near * t.noise(i - 1, wx * 0.5, wy, 4.0, org) + 0.5 * t.noise(i, wx, wy, 40.0, org))
        ry = amp * (near * t.noise(i - 2, wx, wy * 0.5, 4.0, org) + 0.5 * t.noise(i - 1, wx, wy, 40.0, org))
        dx = F32(self.fwd[0]) + xn * F32(self.right[0])
        dy = F32(self.fwd[1]) + xn * F32(self.right[1])
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
        depth = np.maximum(F32(sc.water) - hb, 0.0)
        L = sc.light
        sun = lin(b.sun_col) * F32(b.sun_int)
        amb = lin(b.amb_col) * F32(b.amb_int)
        body_light = sun * max(float(L[2]), 0.0) * 0.35 + amb
        trans = np.exp(-depth / b.water_clarity)
        body = mix(lin(b.water_deep), lin(b.water_shallow), trans) * body_light
        col = body * (1.0 - fres)[:, None] + refl * fres[:, None]
        ex, ey, ez = ref_dir
        rl = np.clip(ex * L[0] + ey * L[1] + ez * L[2], 0.0, 1.0)
        glit = (rl**800 * 12.0 + rl**60 * (0.05 if b.night else 0.25)) * (L[2] > -0.02)
        col = col + sun[None, :] * glit[:, None]
        if b.foam:
            det, _ = self._detail(wx, wy, dist)
            foam = smoothstep(0.6, 0.1, depth + 0.5 * det) * b.foam * near
            white = lin("#f4f6f4") * (sun * max(float(L[2]), 0.2) + amb)
            col = mix(col, np.broadcast_to(white, col.shape), foam * 0.8)
        return col
