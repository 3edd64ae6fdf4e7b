"""Step 3 of a render (see render.py): the heightfield sampled along every pixel column, and ray casting.

Each column is sampled at K = 64 + 2*size distances (geometric, Z_NEAR to Z_MAX); a ray hits the terrain
at the first sample whose elevation angle exceeds its own, refined linearly between two samples.
"""
from __future__ import annotations

import math

import numpy as np

from .blend import F32, smoothstep
from .scene import Z_MAX, Z_NEAR, build_scene


def n_steps(size: int) -> int:
    return 64 + 2 * size


class ColumnGrid:
    """The view's geometry on its (distance, column) sample grid: heights with the forest canopy,
    normals, moisture, cast shadows, the planet's drop; and the rays cast through it."""

    def __init__(self, seed: int, cls: int, size: int, ss: int):
        self.size, self.ss = size, ss
        self.terrain, self.sc, self.fwd, snow_u = build_scene(seed, cls)
        sc, b = self.sc, self.sc.b
        self.b = b
        self.right = np.array([self.fwd[1], -self.fwd[0]])
        self.n = n = size * ss
        self.K = K = n_steps(size)
        self.z = Z_NEAR * (Z_MAX / Z_NEAR) ** (np.arange(K) / (K - 1))  # (K,) float64
        self.log_ratio = math.log(Z_MAX / Z_NEAR) / (K - 1)
        self.lod_c = 1.0 / (4.0 * (math.exp(self.log_ratio) - 1.0))
        centres = (np.arange(n) + 0.5) / n
        self.xn = ((2.0 * centres - 1.0) * sc.tan_half).astype(F32)  # (W,) per column
        self.s = ((sc.horizon - centres) * 2.0 * sc.tan_half).astype(F32)  # (H,) per row
        # Column sample grid (K, Wg). With supersampling the noise is evaluated on every other
        # sub-pixel column (one per output pixel) and interpolated: the costly part halves, and the
        # ray casting below still runs per sub-pixel column.
        wg = n // 2 + 1 if ss >= 2 else n
        xg = np.linspace(float(self.xn[0]), float(self.xn[-1]), wg).astype(F32)
        zc = self.z.astype(F32)[:, None]
        dirx = F32(self.fwd[0]) + xg * F32(self.right[0])
        diry = F32(self.fwd[1]) + xg * F32(self.right[1])
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
        wet = moist + F32(0.35 * 0.55) * mid
        forest = smoothstep(b.forest_thr - 0.05, b.forest_thr + 0.2, wet)
        forest *= smoothstep(b.forest_nz - 0.12, b.forest_nz + 0.04, nz0)
        if math.isfinite(sc.tree_line):
            forest *= smoothstep(sc.tree_line + 30.0, sc.tree_line - 30.0, H - 60.0 * mid)
        if sc.water is not None:
            forest *= smoothstep(b.beach_h + 1.0, b.beach_h + 4.0, H - F32(sc.water))
        forest = forest.astype(F32)
        surf = H
        if b.canopy_h and forest.max() > 0.0:
            crown = 0.6 * (1.0 - np.abs(self._grid_noise(gx, gy, 8.0, b.octaves + 2)))
            crown += 0.4 * (1.0 - np.abs(self._grid_noise(gx, gy, 3.6, b.octaves + 1)))
            # canopy height follows the forest density smoothly: no cliffs at forest edges
            surf = H + F32(b.canopy_h) * forest * (0.75 + 0.25 * crown)
            nx, ny, nz = self._normals(surf, xg)
        else:
            nz = nz0
        fields = np.stack([surf, nx, ny, nz, moist, self._shadows(surf, xg), forest, nz0, mesa])
        if wg != n:  # to sub-pixel columns
            pos = (self.xn - xg[0]) / (xg[1] - xg[0])
            c0 = np.clip(np.floor(pos).astype(np.int64), 0, wg - 2)
            t = (pos - c0).astype(F32)
            fields = fields[:, :, c0] + (fields[:, :, c0 + 1] - fields[:, :, c0]) * t
        self.H = np.ascontiguousarray(fields[0])
        self.drop = (zc**2 * (1.0 + self.xn**2)[None, :] / F32(2.0 * sc.radius)).astype(F32)
        self.He = self.H - self.drop
        self.fields = fields.reshape(len(fields), -1)
        self.crater_h = None  # height of the volcano's crater (the ash plume rises from there)
        if self.terrain.cone is not None:
            cx, cy = self.terrain.cone[:2]
            p = np.array([cx - sc.cam_xy[0], cy - sc.cam_xy[1]], F32)
            self.crater_h = float(self.terrain.height(p[:1], p[1:], sc.cam_xy)[0])

    def _grid_noise(self, gx, gy, lam: float, stream: int):
        """Noise of wavelength lam on the column grid, only on rows where it is resolved (else 0)."""
        out = np.zeros(gx.shape, F32)
        zc = self.lod_c * lam * 2.0
        rows = int(np.searchsorted(self.z, zc))
        if rows:
            fade = np.clip(2.0 - 2.0 * self.z[:rows] / zc, 0.0, 1.0).astype(F32)[:, None]
            out[:rows] = self.terrain.noise(stream, gx[:rows], gy[:rows], lam, self.sc.cam_xy) * fade
        return out

    def _normals(self, H, xg):
        """Unit normals (nx, ny, nz) from finite differences on the (distance, column) grid."""
        zc = self.z.astype(F32)[:, None]
        dHdz = np.gradient(H, self.z, axis=0).astype(F32)
        dHdc = np.gradient(H, xg.astype(np.float64), axis=1).astype(F32) / zc
        hu = dHdz - dHdc * xg[None, :]  # along the view direction
        hv = dHdc  # along the camera's right
        hx = hu * F32(self.fwd[0]) + hv * F32(self.right[0])
        hy = hu * F32(self.fwd[1]) + hv * F32(self.right[1])
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
            return np.zeros((K, wg), F32)
        if lh < 1e-3:
            return np.ones((K, wg), F32)
        tan_e = F32(L[2] / lh)
        lu = F32((L[0] * self.fwd[0] + L[1] * self.fwd[1]) / lh)
        lv = F32((L[0] * self.right[0] + L[1] * self.right[1]) / lh)
        ks = np.arange(0, K, k_step)
        cs = np.unique(np.r_[np.arange(0, wg, c_step), wg - 1])
        pu = self.z[ks].astype(F32)[:, None] + np.zeros(len(cs), F32)[None, :]
        pv = pu * xg[cs][None, :]
        h0 = H[np.ix_(ks, cs)] + F32(1.0)
        d0 = np.maximum(F32(3.0), F32(0.02) * pu)
        Hf = H.reshape(-1)
        lit = np.ones_like(pu)
        inv_lr = F32(1.0 / self.log_ratio)
        dxg = float(xg[1] - xg[0])
        for j in range(steps):
            d = d0 * F32(1.42**j)
            qu = pu + d * lu
            qv = pv + d * lv
            zq = np.maximum(qu, F32(Z_NEAR))
            kf = np.log(zq * F32(1.0 / Z_NEAR)) * inv_lr
            cf = (qv / zq - xg[0]) * F32(1.0 / dxg)
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
            clear = (h0 + d * tan_e - hq) / (F32(0.03) * d + F32(2.0))
            lit = np.where(ok, np.minimum(lit, clear), lit)
        lit = np.clip(lit, 0.0, 1.0)
        # back to the full grid: linear along k, then along columns
        kf = np.interp(np.arange(K), ks, np.arange(len(ks)))
        cf = np.interp(np.arange(wg), cs, np.arange(len(cs)))
        k0 = np.minimum(kf.astype(int), len(ks) - 1)
        k1 = np.minimum(k0 + 1, len(ks) - 1)
        c0 = np.minimum(cf.astype(int), len(cs) - 1)
        c1 = np.minimum(c0 + 1, len(cs) - 1)
        tk = (kf - k0).astype(F32)[:, None]
        tc = (cf - c0).astype(F32)[None, :]
        rows = lit[k0] + (lit[k1] - lit[k0]) * tk
        return (rows[:, c0] + (rows[:, c1] - rows[:, c0]) * tc).astype(F32)

    # ---------------------------------------------------------------- ray casting
    def primary_hits(self):
        """k index of the first column sample above each ray (K = none), (H, W)."""
        n = self.n
        q = (self.He - F32(self.sc.cam_h)) / self.z.astype(F32)[:, None]
        Q = np.maximum.accumulate(q, axis=0)  # (K, W) non-decreasing along k
        # ray of row r (slope s_r) is below Q_k  <=>  r <= rho_k
        rho = n * (self.sc.horizon - Q.astype(np.float64) / (2.0 * self.sc.tan_half)) - 0.5
        bk = np.clip(np.floor(rho), -1, n - 1).astype(np.int64) + 1  # 0..n
        cols = np.broadcast_to(np.arange(n)[None, :], bk.shape)
        counts = np.bincount((cols * (n + 1) + bk).ravel(), minlength=n * (n + 1)).reshape(n, n + 1)
        ge = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # ge[c, j] = #{k: bk >= j}
        return ge[:, 1:].T.copy()  # (H, W): #{k : row <= rho_k} = first k above the ray

    def interp(self, k_hit, col, s, g_fn):
        """Refine hits between samples k-1 and k; returns z (metres ahead) and gathered fields."""
        K, n = self.K, self.n
        k1 = np.minimum(k_hit, K - 1)
        k0 = np.maximum(k1 - 1, 0)
        z0, z1 = self.z.astype(F32)[k0], self.z.astype(F32)[k1]
        g0, g1 = g_fn(k0, col, z0, s), g_fn(k1, col, z1, s)
        t = np.where(g0 < 0.0, g0 / np.minimum(g0 - g1, -1e-6), 0.0)
        t = np.clip(t, 0.0, 1.0).astype(F32)
        z = z0 + t * (z1 - z0)
        f0 = self.fields[:, k0 * n + col]
        f1 = self.fields[:, k1 * n + col]
        f = f0 + (f1 - f0) * t[None, :]
        f[1:4] /= np.sqrt((f[1:4] ** 2).sum(0, keepdims=True))
        return z, f  # f: height, normal (3), moisture, lit, forest, material n_z, mesa

    def reflect_hits(self, col, s, k_start):
        """First sample k >= k_start where a ray continuing below the water into the mirror world
        meets mirrored terrain (K = none); sparse min-table descent, O(log K) per ray."""
        K, n, sc = self.K, self.n, self.sc
        p = (2.0 * sc.water - self.H - self.drop - sc.cam_h) / self.z.astype(F32)[:, None]  # (K, W)
        levels = max(1, int(math.ceil(math.log2(K))))
        Kp = K + (1 << levels)
        table = np.full((levels + 1, Kp, n), np.inf, F32)
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

