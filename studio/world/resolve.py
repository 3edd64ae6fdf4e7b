"""Sub-samples to pixels: the image box-filtered and tone-mapped to sRGB; each pixel's label by majority
vote of its sub-samples and its depth from the nearest sub-sample of that label."""
from __future__ import annotations

import numpy as np

from .blend import F32


def tonemap(img: np.ndarray) -> np.ndarray:
    """Linear HDR -> sRGB uint8 with a soft shoulder."""
    x = 1.0 - np.exp(-img * 1.35)
    return np.clip(np.rint(x ** (1.0 / 2.2) * 255.0), 0, 255).astype(np.uint8)


def downsample(img, depth, labels, size, ss):
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
    return img, out_d.reshape(size, size).astype(F32), out_l.reshape(size, size)
