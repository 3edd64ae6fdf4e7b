"""Zero-shot editing's geometry: what the model sees and where its result goes (no model code here).

Zero-shot editing with VAR: encode the image to its token pyramid, then at every scale keep the
known tokens and let the model generate the rest. This module turns a user's image and pixel mask
(white = regenerate) into an InpaintPlan: the square the model sees, the per-scale keep masks, and
the feathered paste-back of each result; and it holds the OutpaintCanvas whose sliding windows
out-painting fills one by one. The pipeline only samples: `VARPipeline.inpaint` asks for a plan,
runs the model on `plan.model_image` with `plan.keep_masks(...)`, and hands each result to
`plan.paste`. Pixel conversions, masks, crops and blending are studio.images'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio import images as im
from studio.images import Region
from studio.windows import MIN_SIDE, next_outpaint_window, window_side  # noqa: F401 (re-exported)
from studio.pngmeta import decode_array, encode_array

INPAINT_AREAS = ("masked", "whole")


# ---------------------------------------------------------------------------------------------
# masks per scale (the official zero-shot rule)


def latent_regen_mask(mask: np.ndarray, grid: int, coverage: float = 0.0) -> np.ndarray:
    """Pixel mask (H, W) -> (grid, grid) bool: latent cells to regenerate.

    A cell is regenerated when more than `coverage` of its pixels are masked (0: any masked pixel,
    so a thin brush stroke still regenerates the tokens under it)."""
    b = torch.from_numpy(im.binary(mask))[None, None]
    frac = F.adaptive_avg_pool2d(b, (grid, grid))[0, 0]
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
# in-painting


@dataclass
class InpaintPlan:
    """An in-painting job in pixels: the user's image and mask, and the square the model works on."""

    image: np.ndarray  # (H, W, 3) float in [0, 1], as given
    mask: np.ndarray  # (H, W) binary, grown or shrunk: 1 = regenerate
    alpha: np.ndarray  # (H, W) paste-back weights: the feathered mask (0 = the original exactly)
    region: Optional[Region]  # the square cropped around the mask, or None: the whole image
    model_image: np.ndarray  # (R, R, 3) float in [0, 1]: what the model encodes
    regen: np.ndarray  # (grid, grid) bool: the latent cells to regenerate

    @property
    def empty(self) -> bool:
        return not self.mask.any()

    @property
    def size(self) -> Tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def keep_masks(self, patch_nums: Sequence[int]) -> List[torch.Tensor]:
        return scale_keep_masks(self.regen, patch_nums)

    def reroll_masks(self, patch_nums: Sequence[int], from_scale: int) -> List[torch.Tensor]:
        """Re-rolling the edit from `from_scale`: scales before it keep every token of the result,
        the later ones keep what the edit kept (the area outside it) and resample the edited cells."""
        edit = self.keep_masks(patch_nums)
        return [torch.ones_like(m) if si < from_scale else m for si, m in enumerate(edit)]

    def record(self) -> dict:
        """What a result's PNG keeps of the plan so that it can be re-rolled later (see from_record)."""
        return {"region": None if self.region is None else [self.region.x0, self.region.y0, self.region.side],
                "alpha": encode_array(np.round(np.clip(self.alpha, 0, 1) * 255).astype(np.uint8)),
                "regen": encode_array(self.regen.astype(np.uint8))}

    @classmethod
    def from_record(cls, image, rec: dict) -> "InpaintPlan":
        """The plan of an edit whose result is `image`: re-rolled output is pasted back over it."""
        base = im.to_float_rgb(image)
        alpha = decode_array(rec["alpha"]).astype(np.float32) / 255.0
        if alpha.shape != base.shape[:2]:
            raise ValueError(f"the edit's mask is {alpha.shape[1]}x{alpha.shape[0]}, the picture "
                             f"{base.shape[1]}x{base.shape[0]}")
        region = None if rec.get("region") is None else Region(*[int(v) for v in rec["region"]])
        return cls(base, (alpha > 0).astype(np.float32), alpha, region, None, decode_array(rec["regen"]).astype(bool))

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """A full-size (H, W[, C]) array (a control map) cut like the image (not resized)."""
        return arr if self.region is None else im.crop(arr, self.region)

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """The model's (R, R, 3) float result -> the edited (H, W, 3) image: resized to the crop,
        put back in place, its colours matched to the original's along the edit's border
        (studio.images.seam_matched), and blended over the original with the feathered mask."""
        H, W = self.image.shape[:2]
        side = (W, H) if self.region is None else (self.region.side, self.region.side)
        patch = im.resize(generated, side)
        full = patch if self.region is None else im.paste(self.image, patch, self.region)
        # its colours continue the surroundings' at the seam (the known pixels decide it), then the feathered blend
        return im.blend(self.image, im.seam_matched(self.image, full, self.alpha), self.alpha)


def plan_inpaint(image, mask_image, resolution: int, grid: int, mask_blur: int = 4, mask_grow: int = 0,
                 inpaint_area: str = "masked", padding: int = 32, mask_coverage: float = 0.0) -> InpaintPlan:
    """Check the settings and lay out an in-painting (see VARPipeline.inpaint for their meaning).

    "masked" crops the square around the mask and its feather band plus `padding`, at least the
    model's resolution (never upscaled) or the whole image if that is smaller; "whole" resizes the
    whole image to the model's resolution."""
    if inpaint_area not in INPAINT_AREAS:
        raise ValueError(f"inpaint_area must be 'masked' or 'whole', not {inpaint_area!r}")
    if mask_blur < 0 or padding < 0:
        raise ValueError("mask_blur and padding must be >= 0")
    if not 0.0 <= mask_coverage < 1.0:
        raise ValueError(f"mask_coverage must be in [0, 1), got {mask_coverage}")
    orig = im.to_float_rgb(image)
    H, W = orig.shape[:2]
    mask = im.grow_mask(im.mask_to_array(mask_image, (W, H)), int(mask_grow))
    alpha = im.feather(mask, int(mask_blur))
    R = int(resolution)
    region = None
    if inpaint_area == "masked" and mask.any():
        region = im.region_around(np.maximum(mask, alpha > 0), int(padding), min_side=min(R, max(H, W)))
    view = orig if region is None else im.crop(orig, region)
    view_mask = mask if region is None else im.crop(mask, region)
    model_mask = im.resize_nearest(view_mask, (R, R))
    return InpaintPlan(orig, mask, alpha, region, im.resize(view, (R, R)),
                       latent_regen_mask(model_mask, grid, mask_coverage))


# ---------------------------------------------------------------------------------------------
# out-painting


class OutpaintCanvas:
    """The growing canvas of an out-painting: the original in place, the margins edge-filled until
    generated, and which pixels are known. Windows are squares of `window` pixels (default the
    image's shorter side), each overlapping known content."""

    MAX_PIXELS = 64_000_000

    def __init__(self, image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 window: Optional[int] = None):
        for name, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
            if int(v) != v or v < 0:
                raise ValueError(f"{name} must be a whole number of pixels >= 0, got {v}")
        left, right, top, bottom = int(left), int(right), int(top), int(bottom)
        self.original = im.to_float_rgb(image)
        H, W = self.original.shape[:2]
        H2, W2 = H + top + bottom, W + left + right
        if H2 * W2 > self.MAX_PIXELS:
            raise ValueError(f"the canvas would be {W2}x{H2}; at most 64 megapixels")
        if H < MIN_SIDE or W < MIN_SIDE:
            raise ValueError(f"the image is {W}x{H} pixels; out-painting needs at least {MIN_SIDE}x{MIN_SIDE}")
        self.side = window_side(W, H, left, right, top, bottom, window)
        self.canvas = np.pad(self.original, ((top, bottom), (left, right), (0, 0)), mode="edge")
        self.known = np.zeros((H2, W2), dtype=bool)
        self.known[top:top + H, left:left + W] = True
        self.is_original = self.known.copy()
        self.box = (left, top, left + W, top + H)  # where the original sits

    def next_window(self) -> Optional[Region]:
        pos = next_outpaint_window(self.known, self.side)
        return None if pos is None else Region(pos[0], pos[1], self.side)

    def window(self, region: Region) -> Tuple[Image.Image, np.ndarray]:
        """The window's picture (margins edge-filled) and its mask: 1 = not yet known."""
        return im.to_pil(im.crop(self.canvas, region)), (~im.crop(self.known, region)).astype(np.float32)

    def merge(self, region: Region, generated: np.ndarray, mask_blur: int) -> np.ndarray:
        """Take a window's result: new pixels take it, earlier generated pixels blend over a
        feathered band, the original is never touched. Returns the window's blend weights."""
        win_mask = (~im.crop(self.known, region)).astype(np.float32)
        alpha = np.maximum(im.feather(win_mask, int(mask_blur)), win_mask).astype(np.float32)
        alpha[im.crop(self.is_original, region)] = 0.0
        self.canvas = im.paste(self.canvas, im.blend(im.crop(self.canvas, region), generated, alpha), region)
        self.known = im.paste(self.known, np.ones((region.side, region.side), bool), region)
        return alpha

    def window_plan(self, region: Region, alpha: np.ndarray, regen: np.ndarray) -> InpaintPlan:
        """A merged window as an in-painting of the whole canvas (for re-rolling it later)."""
        full = np.zeros(self.canvas.shape[:2], np.float32)
        full = im.paste(full, alpha, region)
        return InpaintPlan(self.canvas, (full > 0).astype(np.float32), full, region, None, regen)

    def picture(self) -> Image.Image:
        return im.to_pil(self.canvas)

    def result(self) -> np.ndarray:
        """The finished (H2, W2, 3) float canvas, the original's pixels exactly as given."""
        x0, y0, x1, y1 = self.box
        out = self.canvas.copy()
        out[y0:y1, x0:x1] = self.original
        return out
