"""2D gradient (Perlin) noise on numpy float32 arrays.

One fixed 256x256 lattice of unit gradients is shared by every world (a constant, not RNG state);
worlds differ by per-octave rotations and offsets drawn from the seed. The lattice wraps every
256 cells, far beyond what one view can show at any octave.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_N = 256  # lattice period in cells
_ROW = _N + 1  # padded row length so corner (x+1, y+1) never needs a wrap


@lru_cache(maxsize=None)
def _gradients() -> np.ndarray:
    """(257*257,) complex64 unit gradients, the last row/column repeating the first."""
    angle = np.random.default_rng(0x57_0D_10).uniform(0.0, 2.0 * np.pi, (_N, _N))
    g = np.exp(1j * angle).astype(np.complex64)
    return np.ascontiguousarray(np.pad(g, ((0, 1), (0, 1)), mode="wrap")).ravel()


@lru_cache(maxsize=None)
def _gradient_xy() -> tuple[np.ndarray, np.ndarray]:
    g = _gradients()
    return np.ascontiguousarray(g.real), np.ascontiguousarray(g.imag)


def perlin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient noise at lattice coordinates (x, y) -> values roughly in [-1, 1] (float32).

    Inputs may be any shape (same shape); keep |x|, |y| below ~1e5 for float32 precision.
    Written with in-place operations: it is the renderer's hottest function.
    """
    gx, gy = _gradient_xy()
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = np.subtract(x, x0, dtype=np.float32)
    fy = np.subtract(y, y0, dtype=np.float32)
    i = (y0.astype(np.int32) & (_N - 1)) * _ROW + (x0.astype(np.int32) & (_N - 1))
    fx1 = fx - np.float32(1.0)
    fy1 = fy - np.float32(1.0)
    n00 = gx.take(i); n00 *= fx; t = gy.take(i); t *= fy; n00 += t  # noqa: E702
    i += 1
    n10 = gx.take(i); n10 *= fx1; t = gy.take(i); t *= fy; n10 += t  # noqa: E702
    i += _ROW
    n11 = gx.take(i); n11 *= fx1; t = gy.take(i); t *= fy1; n11 += t  # noqa: E702
    i -= 1
    n01 = gx.take(i); n01 *= fx; t = gy.take(i); t *= fy1; n01 += t  # noqa: E702
    # quintic fade u = fx^3 (fx (6 fx - 15) + 10): C2 continuous
    u = fx * np.float32(6.0); u -= 15.0; u *= fx; u += 10.0; u *= fx; u *= fx; u *= fx  # noqa: E702
    v = fy * np.float32(6.0); v -= 15.0; v *= fy; v += 10.0; v *= fy; v *= fy; v *= fy  # noqa: E702
    n10 -= n00; n10 *= u; n00 += n10  # noqa: E702
    n11 -= n01; n11 *= u; n01 += n11  # noqa: E702
    n01 -= n00; n01 *= v; n00 += n01  # noqa: E702
    n00 *= np.float32(1.41)
    return n00


def hash01(i: np.ndarray, j: np.ndarray, salt: int = 0) -> np.ndarray:
    """Deterministic per-integer-cell uniform numbers in [0, 1) (float32), for stars and sparkle."""
    h = (i.astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (j.astype(np.uint32) * np.uint32(0xD8163841))
    h ^= np.uint32(salt * 0x9E3779B1 & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0x5BD1E995)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
