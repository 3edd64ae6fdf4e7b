"""One view of the world: biome, terrain draw, camera (position, heading, lens), water, sun, clouds.

Every random number of a render is drawn here, from ``np.random.default_rng(seed)`` in a fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .biomes import BIOMES, Biome
from .blend import F32
from .classes import CLASS_NAMES
from .terrain import Terrain

WORLD_VERSION = 1
FAR_DEPTH = 20000.0  # depth of sky and cloud pixels (metres)
Z_NEAR = 2.0  # first column sample (metres ahead of the camera)
Z_MAX = 12000.0  # last column sample; the curvature puts any sea horizon nearer than this


@dataclass
class Scene:
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


def choose_view(rng: np.random.Generator, terrain: Terrain, b: Biome):
    """Probe candidate positions x headings; return org, heading, ground, water level, clearance."""
    n_pos, n_head = 6, 12
    pos = rng.uniform(-3000.0, 3000.0, (n_pos, 2))
    heads = rng.uniform(0.0, 2.0 * np.pi) + np.arange(n_head) * (2.0 * np.pi / n_head)
    dists = np.array([0.0, 25.0, 60.0, 150.0, 400.0, 1000.0, 2500.0, 6000.0])
    px = pos[:, 0, None, None] + dists[None, None, :] * np.cos(heads)[None, :, None]
    py = pos[:, 1, None, None] + dists[None, None, :] * np.sin(heads)[None, :, None]
    base = terrain.base
    hgt = terrain.height(px.ravel().astype(F32), py.ravel().astype(F32), base, max_oct=7)
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


def build_scene(seed: int, cls: int):
    b = BIOMES[CLASS_NAMES[cls]]
    rng = np.random.default_rng(seed)
    terrain = Terrain(rng, b)
    org, heading, water, clearance, aerial = choose_view(rng, terrain, b)
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
    rx = np.concatenate([[0.0], 6.0 * np.cos(ring), 15.0 * np.cos(ring)]).astype(F32)
    ry = np.concatenate([[0.0], 6.0 * np.sin(ring), 15.0 * np.sin(ring)]).astype(F32)
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
    scene = Scene(b=b, cam_xy=org, heading=heading, cam_h=cam_h, tan_half=tan_half, horizon=horizon,
                   water=water, radius=0.0, snow_line=0.0, tree_line=0.0, light=light,
                   sun_elev=sun_elev, cloud_h=cloud_h, cloud_cover=cloud_cover, cloud_off=cloud_off,
                   cloud_dir=cloud_dir, aurora_phase=aurora_phase, ripple=ripple, seed=seed)
    snow_u = rng.uniform()
    return terrain, scene, fwd, snow_u

