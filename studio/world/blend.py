"""Small numeric helpers of the renderer: float32, sRGB colours to linear, smoothstep, colour mixing."""
from __future__ import annotations

import numpy as np

F32 = np.float32  # every image-sized array is float32


def lin(hex_rgb: str) -> np.ndarray:
    """sRGB hex -> linear RGB (3,) float32."""
    h = hex_rgb.lstrip("#")
    c = np.array([int(h[i : i + 2], 16) for i in (0, 2, 4)], np.float32) / 255.0
    return (c**2.2).astype(np.float32)


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def mix(a, b, t):
    """a*(1-t) + b*t for colours: a, b (3,) or (N,3); t (N,)."""
    t = np.asarray(t, np.float32)[..., None]
    return a + (b - a) * t

