"""Where out-painting's windows go, known before any of them is generated (numpy only, no torch).

The windows' places depend only on which pixels are known, never on what is painted there, so the
web process can count an out-painting's windows (its cost) exactly before the job is queued, with
the same function studio.editing.OutpaintCanvas uses to place them:

    side = window_side(w, h, left, right, top, bottom)
    n = count_windows(w, h, left, right, top, bottom, limit=64)   # limit + 1 means "more than limit"
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

MIN_SIDE = 16  # the smallest window (and so the smallest picture out-painting can extend)
MAX_WINDOWS = 64  # the most windows one out-painting may take (VARPipeline.outpaint's max_windows)


def window_side(width: int, height: int, left: int, right: int, top: int, bottom: int,
                window: Optional[int] = None) -> int:
    """A window's side: `window` or the image's shorter side, at least MIN_SIDE, within the canvas."""
    W2, H2 = width + left + right, height + top + bottom
    return max(MIN_SIDE, min(int(window or min(height, width)), H2, W2))


def next_outpaint_window(known: np.ndarray, side: int, min_known: float = 0.3) -> Optional[Tuple[int, int]]:
    """Where to generate next: the (x0, y0) of a side x side window with the most unknown pixels
    among those that still see at least `min_known` of known content (falling back to the window
    with the most known content); the first such window in row-major order wins a tie. None when
    nothing is unknown. All candidate windows are scored at once from one integral image."""
    H, W = known.shape
    if known.all():
        return None
    step = max(1, side // 8)
    xs = np.array(sorted(set(list(range(0, max(W - side, 0) + 1, step)) + [max(W - side, 0)])))
    ys = np.array(sorted(set(list(range(0, max(H - side, 0) + 1, step)) + [max(H - side, 0)])))
    integ = np.zeros((H + 1, W + 1), np.int32)  # known pixels above-left of each corner (exact: < 2**31)
    np.cumsum(known, 0, dtype=np.int32, out=integ[1:, 1:])
    np.cumsum(integ[1:, 1:], 1, out=integ[1:, 1:])
    y0, x0 = ys[:, None], xs[None, :]
    y1, x1 = np.minimum(y0 + side, H), np.minimum(x0 + side, W)
    area = ((y1 - y0) * (x1 - x0)).astype(np.float64)
    kn = (integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]).astype(np.float64)
    unknown = area - kn
    frac = kn / area
    enough = frac >= min_known
    valid = unknown >= 1
    if not valid.any():
        return None
    # the score (enough, unknown if enough else frac), compared lexicographically
    first = np.where(valid, enough, False).any()
    pool = valid & (enough == first)
    second = np.where(pool, np.where(enough, unknown, frac), -np.inf)
    i = int(np.argmax(second))  # row-major: the first best, as a y-then-x scan finds it
    r, c = divmod(i, second.shape[1])
    return int(xs[c]), int(ys[r])


def count_windows(width: int, height: int, left: int, right: int, top: int, bottom: int,
                  window: Optional[int] = None, limit: int = 64) -> int:
    """How many windows out-painting will generate (stops counting at limit + 1)."""
    H2, W2 = height + top + bottom, width + left + right
    side = window_side(width, height, left, right, top, bottom, window)
    new = H2 * W2 - width * height
    if new <= 0:
        return 0
    if -(-new // (side * side)) > limit:  # each window adds at most side² pixels
        return limit + 1
    known = np.zeros((H2, W2), dtype=bool)
    known[top:top + height, left:left + width] = True
    n = 0
    while n <= limit and (pos := next_outpaint_window(known, side)) is not None:
        x0, y0 = pos
        known[y0:y0 + side, x0:x0 + side] = True
        n += 1
    return n
