"""Uploaded pictures, read safely: their size from the header before anything is decoded, and masks
at their full bit depth. Plain Python (PIL and numpy, no torch): the web process checks uploads
with it before Gradio or the studio decodes them, the worker reads masks with it.

    w, h, fmt = image_header(path_or_bytes, "mask")        # UserError for a non-image
    check_image_size(w, h, "mask", max_pixels=16_000_000)  # UserError naming the limit
    levels = mask_levels(Image.open(...))                  # (H, W) float32 in [0, 1], 16-bit aware
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from PIL import Image

from studio.params import UserError

# what an upload may be: the formats the page offers (and that browsers show inline safely)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
WORDS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}


def megapixels(n: float) -> str:
    return f"{n / 1e6:.3g} megapixels"


def image_header(source: Union[str, Path, bytes, bytearray], what: str,
                 formats: Tuple[str, ...] = IMAGE_FORMATS) -> Tuple[int, int, str]:
    """(width, height, format) from the file's header alone: nothing is decoded, so a huge image
    costs a few kilobytes here. A file that is not a PNG, JPEG or WebP is a UserError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's decompression-bomb warning: the caller checks the size
            src = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
            with Image.open(src) as im:
                w, h, fmt = im.width, im.height, im.format
    except Image.DecompressionBombError as e:  # over PIL's own guard (about 179 megapixels)
        raise UserError(f"the {what} is far too large ({e}); upload an image of at most a few megapixels") from e
    except Exception as e:
        raise UserError(f"the {what} could not be read as an image ({type(e).__name__}): upload a "
                        f"{', '.join(WORDS[f] for f in formats[:-1])} or {WORDS[formats[-1]]} file") from e
    if fmt not in formats:
        raise UserError(f"the {what} is a {fmt} file: upload a {', '.join(WORDS[f] for f in formats[:-1])} "
                        f"or {WORDS[formats[-1]]} file")
    return w, h, fmt


def check_image_size(width: int, height: int, what: str, max_pixels: int, min_side: int = 1,
                     setting: str = "") -> None:
    """UserError naming the limit (and, when given, the setting that changes it)."""
    if width < min_side or height < min_side:
        raise UserError(f"the {what} is {width}x{height} pixels; it must be at least {min_side}x{min_side}")
    if width * height > max_pixels:
        how = f" (the server's {setting})" if setting else ""
        raise UserError(f"the {what} is {width}x{height} pixels ({megapixels(width * height)}); the limit is "
                        f"{megapixels(max_pixels)}{how}: scale it down first")


def flatten(picture: Image.Image) -> Image.Image:
    """RGB, transparency over white (as the editors send a picture to the worker)."""
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        rgba = picture.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return picture.convert("RGB")


def mask_levels(mask: Image.Image) -> np.ndarray:
    """A mask image -> (H, W) float32 in [0, 1], white = 1, read at its own bit depth.

    16-bit greyscale (PIL modes I;16*, I) is divided by 65535 and a float image taken as it is
    (or /255 when it holds 0..255): PIL's convert("L") would clip those to 8 bits, so near-black
    (300 of 65535) became white. RGBA / LA masks (a painted layer): painted, opaque pixels count."""
    mode = mask.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(mask, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        arr = np.asarray(mask, dtype=np.float32)
        arr = np.nan_to_num(arr, nan=0.0)
        return np.clip(arr / 255.0 if arr.max(initial=0) > 1.0 else arr, 0.0, 1.0)
    if mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3].max(axis=-1) * rgba[..., 3]
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
