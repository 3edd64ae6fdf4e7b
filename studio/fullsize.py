"""Edits of huge pictures at full resolution: an upload above the working size is edited downscaled, and
the edit is then upscaled and pasted into the ORIGINAL, so every pixel outside the edit is the
original's, bit for bit.

    full = paste_inpaint(original, working_result, alpha)     # alpha: (h, w) paste-back weights of the edit
    full = paste_outpaint(original, working_canvas, left=64, right=0, top=0, bottom=0)
    match = same_picture(thumbnail(a), thumbnail(b))        # is b the picture a was downscaled to?

Plain Python (PIL and numpy, no torch): the web process runs it after the worker's job, inside a
heavy-job slot. Only the edit's bounding box is resampled and blended (PIL's resize with a source
box gives exactly that part of the whole upscale), so an 8000x8000 original costs its own bytes plus
the box, not several float copies of the whole picture.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from studio.uploads import flatten

THUMB = 128  # side of the thumbnails that tell whether a picture is the one an original was downscaled to
SAME_LEVELS = 3.0  # ... when no thumbnail pixel differs by more than this (of 255): a browser's re-encoding


def thumbnail(picture: Image.Image) -> np.ndarray:
    """(THUMB, THUMB, 3) float32 block means of the flattened picture: what `same_picture` compares."""
    small = flatten(picture).resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def same_picture(a: np.ndarray, b: np.ndarray, levels: float = SAME_LEVELS) -> bool:
    """Two thumbnails of the same picture (up to a re-encoding); an edit anywhere shows in its block."""
    return a.shape == b.shape and float(np.abs(a - b).max()) <= levels


def _upscaled_box(picture: Image.Image, size: Tuple[int, int], box: Tuple[int, int, int, int],
                  resample) -> Image.Image:
    """The part `box` (in full-size pixels) of `picture` upscaled to `size`, computed for the box alone."""
    sx, sy = picture.width / size[0], picture.height / size[1]
    x0, y0, x1, y1 = box
    return picture.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def paste_inpaint(original: Image.Image, working_result: Image.Image, alpha: np.ndarray) -> Image.Image:
    """The in-painting `working_result` (edited at the working size, `alpha` its (h, w) paste-back
    weights in [0, 1], 0 = untouched) upscaled into `original`: original * (1 - a) + upscaled * a with
    `a` the weights upscaled (bilinear); where `a` is 0 the original's pixels are kept exactly."""
    original = flatten(original)
    W, H = original.size
    h, w = alpha.shape
    if (w, h) != working_result.size:
        raise ValueError(f"the edit's weights are {w}x{h}, its result {working_result.width}x{working_result.height}")
    weights = Image.fromarray(np.clip(np.asarray(alpha, np.float32), 0.0, 1.0), "F")
    # the box of the full picture the edit reaches: the weights' box scaled up, one working pixel wider
    # (bilinear support), inside the picture
    ys, xs = np.nonzero(np.asarray(alpha) > 0)
    if not len(ys):
        return original.copy()
    sx, sy = W / w, H / h
    box = (max(0, int(np.floor((xs.min() - 1) * sx))), max(0, int(np.floor((ys.min() - 1) * sy))),
           min(W, int(np.ceil((xs.max() + 2) * sx))), min(H, int(np.ceil((ys.max() + 2) * sy))))
    a = np.asarray(_upscaled_box(weights, (W, H), box, Image.Resampling.BILINEAR), np.float32)
    a = np.where(a < 0.5 / 255, 0.0, np.minimum(a, 1.0)).astype(np.float32)
    up = np.asarray(_upscaled_box(flatten(working_result), (W, H), box, Image.Resampling.LANCZOS), np.float32)
    orig = np.asarray(original.crop(box), np.float32)
    mixed = orig + (up - orig) * a[..., None]
    patch = np.where(a[..., None] > 0, np.clip(np.round(mixed), 0, 255), orig).astype(np.uint8)
    out = original.copy()
    out.paste(Image.fromarray(patch, "RGB"), box[:2])
    return out


def outpaint_margins(original_size: Tuple[int, int], working_size: Tuple[int, int], left: int, right: int,
                     top: int, bottom: int) -> Tuple[int, int, int, int]:
    """The out-painting's margins (left, right, top, bottom) at the original's scale."""
    sx, sy = original_size[0] / working_size[0], original_size[1] / working_size[1]
    return round(left * sx), round(right * sx), round(top * sy), round(bottom * sy)


def paste_outpaint(original: Image.Image, working_canvas: Image.Image, left: int, right: int, top: int,
                   bottom: int, working_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """The out-painted `working_canvas` (the working picture of `working_size` extended by the margins)
    upscaled to the original's scale, with the original pasted into it, exactly, where it belongs."""
    original = flatten(original)
    W, H = original.size
    w, h = working_size or (working_canvas.width - left - right, working_canvas.height - top - bottom)
    if (w + left + right, h + top + bottom) != working_canvas.size:
        raise ValueError(f"the canvas is {working_canvas.width}x{working_canvas.height}, not the {w}x{h} picture "
                         f"extended by left {left}, right {right}, top {top}, bottom {bottom}")
    L, R, T, B = outpaint_margins((W, H), (w, h), left, right, top, bottom)
    size = (W + L + R, H + T + B)
    # the canvas is resampled so that the working picture's area lands exactly on the original's
    sx, sy = w / W, h / H
    src = (left - L * sx, top - T * sy, left + (W + R) * sx, top + (H + B) * sy)
    out = flatten(working_canvas).resize(size, Image.Resampling.LANCZOS, box=src)
    out.paste(original, (L, T))
    return out
