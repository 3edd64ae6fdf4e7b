"""Masks, crops and canvases for zero-shot editing (no model code here).

Zero-shot editing with VAR: encode the image to its token pyramid, then at every scale keep the
known tokens and let the model generate the rest. This module turns a user's pixel mask (white =
regenerate) into per-scale keep masks, crops the region around the mask, feathers the seam, and
plans the sliding windows of out-painting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# ---------------------------------------------------------------------------------------------
# masks


def mask_to_array(mask_image, size: Tuple[int, int]) -> np.ndarray:
    """A mask image (PIL any mode, array, or tensor; white = regenerate) -> (H, W) float32 in [0, 1].

    RGBA masks (a painted layer) count painted, opaque pixels; `size` is the image's (W, H) and the
    mask must have the same size."""
    if isinstance(mask_image, torch.Tensor):
        mask_image = mask_image.detach().cpu().numpy()
    if isinstance(mask_image, np.ndarray):
        arr = mask_image.astype(np.float32)
        if arr.ndim == 3:
            arr = arr.max(axis=-1) if arr.shape[-1] in (1, 3, 4) else arr.max(axis=0)
        if arr.max() > 1.0:
            arr = arr / 255.0
    elif isinstance(mask_image, Image.Image):
        if mask_image.mode in ("RGBA", "LA", "PA") or "transparency" in mask_image.info:
            rgba = np.asarray(mask_image.convert("RGBA"), dtype=np.float32) / 255.0
            arr = rgba[..., :3].max(axis=-1) * rgba[..., 3]
        else:
            arr = np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0
    else:
        raise ValueError(f"mask must be a PIL image, an array or a tensor, not {type(mask_image).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"mask must be a single-channel image, got shape {arr.shape}")
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise ValueError(f"the mask is {arr.shape[1]}x{arr.shape[0]} but the image is {size[0]}x{size[1]}; "
                         "they must be the same size")
    if not np.isfinite(arr).all():
        raise ValueError("the mask contains NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation (pixels > 0) or erosion (pixels < 0) with a square of radius |pixels|."""
    binary = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    if pixels == 0:
        return binary[0, 0].numpy()
    k = 2 * abs(pixels) + 1
    if pixels > 0:
        out = F.max_pool2d(binary, k, stride=1, padding=abs(pixels))
    else:
        out = 1 - F.max_pool2d(1 - binary, k, stride=1, padding=abs(pixels))
    return out[0, 0].numpy()


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Soft blend weights: the binary mask box-blurred twice with radius pixels/2 (a tent).

    Pixels farther than `pixels` from the mask get weight exactly 0, so the original shows through
    unchanged there; inside the mask deeper than `pixels` the weight is exactly 1."""
    binary = (mask > 0.5).astype(np.float32)
    if pixels <= 0:
        return binary
    x = torch.from_numpy(binary)[None, None]
    r1 = pixels // 2
    r2 = pixels - r1
    for r in (r1, r2):
        if r > 0:
            k = 2 * r + 1
            x = F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), k, stride=1)
    out = x[0, 0].numpy()
    out[out < 1e-6] = 0.0
    out[out > 1 - 1e-6] = 1.0
    return out


def latent_regen_mask(mask: np.ndarray, grid: int, coverage: float = 0.0) -> np.ndarray:
    """Pixel mask (H, W) -> (grid, grid) bool: latent cells to regenerate.

    A cell is regenerated when more than `coverage` of its pixels are masked (0: any masked pixel,
    so a thin brush stroke still regenerates the tokens under it)."""
    binary = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    frac = F.adaptive_avg_pool2d(binary, (grid, grid))[0, 0]
    return (frac > coverage).numpy() if coverage > 0 else (frac > 1e-9).numpy()


def scale_keep_masks(regen_last: np.ndarray, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """The official zero-shot rule: keep mask (1 = keep the input's token) at the last scale,
    bilinearly resized to every scale and thresholded at 0.5; scales of at most 3 tokens (the 1x1)
    are always kept. Returns per scale (1, pn*pn) bool."""
    keep = torch.from_numpy(~regen_last.astype(bool)).float()[None, None]
    out = []
    for pn in patch_nums:
        if pn * pn <= 3:
            m = torch.ones(pn, pn, dtype=torch.bool)
        else:
            m = F.interpolate(keep, size=(pn, pn), mode="bilinear", align_corners=False)[0, 0] > 0.5
        out.append(m.reshape(1, pn * pn))
    return out


# ---------------------------------------------------------------------------------------------
# crops and paste-back


@dataclass
class Region:
    """A square crop box (x0, y0, side) in image pixels."""

    x0: int
    y0: int
    side: int

    @property
    def box(self) -> Tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


def region_around(mask: np.ndarray, padding: int, min_side: int) -> Region:
    """The square around the mask's bounding box plus `padding`, at least `min_side`, inside the image
    when it fits (an image smaller than the square is padded by the caller)."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask > 0.5)
    y0, y1 = int(ys.min()) - padding, int(ys.max()) + 1 + padding
    x0, x1 = int(xs.min()) - padding, int(xs.max()) + 1 + padding
    side = max(y1 - y0, x1 - x0, min_side)
    side = min(side, max(H, W))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    x0 = min(max(x0, 0), max(W - side, 0)) if side <= W else (W - side) // 2
    y0 = min(max(y0, 0), max(H - side, 0)) if side <= H else (H - side) // 2
    return Region(x0, y0, side)


def crop_square(arr: np.ndarray, region: Region) -> np.ndarray:
    """Crop (H, W[, C]) to the region, edge-replicating where it leaves the image."""
    H, W = arr.shape[:2]
    x0, y0, x1, y1 = region.box
    pad = ((max(0, -y0), max(0, y1 - H)), (max(0, -x0), max(0, x1 - W))) + ((0, 0),) * (arr.ndim - 2)
    if any(p for pair in pad for p in pair):
        arr = np.pad(arr, pad, mode="edge")
        x0, x1 = x0 + pad[1][0], x1 + pad[1][0]
        y0, y1 = y0 + pad[0][0], y1 + pad[0][0]
    return arr[y0:y1, x0:x1]


def resize_float(arr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) float array in [0, 1] to (w, h) with Lanczos."""
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(im.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def blend(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """original * (1 - alpha) + generated * alpha, where alpha == 0 returns the original exactly."""
    a = alpha[..., None]
    out = original * (1 - a) + generated * a
    out[alpha == 0] = original[alpha == 0]
    return out


def to_float_rgb(image) -> np.ndarray:
    from studio.pipeline import to_rgb

    if isinstance(image, np.ndarray):  # uint8, or float in [0, 1] kept exact (no rounding to 8 bits)
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.clip(image.astype(np.float32), 0, 1)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
        return np.ascontiguousarray(arr[..., :3])
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or an array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError("the image is empty")
    return np.asarray(to_rgb(image), dtype=np.float32) / 255.0


def to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# out-painting windows


def next_outpaint_window(known: np.ndarray, side: int, min_known: float = 0.3) -> Optional[Tuple[int, int]]:
    """Where to generate next: the (x0, y0) of a side x side window with the most unknown pixels
    among those that still see at least `min_known` of known content (falling back to the window
    with the most known content). None when nothing is unknown."""
    H, W = known.shape
    if known.all():
        return None
    step = max(1, side // 8)
    xs = sorted(set(list(range(0, max(W - side, 0) + 1, step)) + [max(W - side, 0)]))
    ys = sorted(set(list(range(0, max(H - side, 0) + 1, step)) + [max(H - side, 0)]))
    k = torch.from_numpy(known.astype(np.float32))[None, None]
    # known fraction of every window position via an integral image
    integ = F.pad(k, (1, 0, 1, 0)).cumsum(2).cumsum(3)[0, 0]
    best, best_score = None, None
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + side, H), min(x0 + side, W)
            area = (y1 - y0) * (x1 - x0)
            kn = float(integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0])
            unknown = area - kn
            if unknown < 1:
                continue
            frac = kn / area
            score = (frac >= min_known, unknown if frac >= min_known else frac)
            if best_score is None or score > best_score:
                best, best_score = (x0, y0), score
    return best
