"""Every image <-> array <-> tensor conversion, and the pixel work on images and masks, in one place.

Conventions (the rest of the studio relies on them):
- a picture: a PIL image of any mode; `to_rgb` composites transparency over white;
- a float image: (H, W, 3) float32 in [0, 1]; float arrays a caller gives are taken exactly
  (never rounded to 8 bits), uint8 arrays are divided by 255;
- a model tensor: (B, 3, H, W) float in [-1, 1] (x * 2 - 1 of a float image);
- a mask: (H, W) float32 in [0, 1], 1 = regenerate; binary masks hold exactly 0 and 1.

Blur and morphology are OpenCV's (cv2.blur, cv2.dilate / cv2.erode with a disc); resizing is PIL's
Lanczos on float32 channels (measured better than cv2.resize, see `resize`). Nothing is rounded to
8 bits on the way.

Why not diffusers' VaeImageProcessor: its pil/numpy/pt/normalize steps give exactly our numbers,
but `import diffusers.image_processor` costs ~1.9 CPU-s on top of the pipeline's ~1.4 (every worker
start and CLI run pays it), and it lacks what we need around them: `convert_to_rgb` turns
transparent pixels black (we composite over white), `numpy_to_pil` does not clip (1.2 -> 50),
arrays and tensors resize by nearest neighbour. Its mask helpers do not fit our in-painting either:
`blur` (PIL GaussianBlur, 8-bit) reaches ~2.5x blur_factor outside the mask where our band is
exactly `mask_blur` px; `get_crop_region` has no minimum side (a 20 px mask is upscaled ~6x) and
clamps to the image, so a wide box in a small image comes out non-square and is stretched;
`apply_overlay` works in 8 bits and only on boxes inside the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from studio.uploads import mask_levels

Size = Tuple[int, int]  # (width, height), as PIL sizes are
OUTPUT_TYPES = ("pil", "np", "pt")


# ---------------------------------------------------------------------------------------------
# pictures and arrays


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _hwc(a: np.ndarray, what: str = "image") -> np.ndarray:
    """An image array as (H, W) or (H, W, C): (C, H, W) arrays (from tensors) are transposed."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) {what} array, got shape {a.shape}")
    return a


def to_float_rgb(image) -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] (also (3, H, W), grey or RGBA) -> (H, W, 3)
    float32 in [0, 1]. Float arrays are kept exact; RGBA arrays drop alpha, RGBA pictures are
    composited over white."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        a = _hwc(image)
        if a.dtype == np.uint8:
            arr = a.astype(np.float32) / 255.0
        elif np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_:
            arr = a.astype(np.float32)
            if not np.isfinite(arr).all():
                raise ValueError("the image contains NaN or infinite values")
            arr = np.clip(arr, 0, 1)
        else:
            raise ValueError(f"image arrays must be uint8 or floats in [0, 1], got {a.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr[..., :3])
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, a numpy array or a torch tensor, not {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError("the image is empty")
    return np.asarray(to_rgb(image), dtype=np.float32) / 255.0


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8 (clipped, rounded to nearest)."""
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def to_pil(arr: np.ndarray) -> Image.Image:
    """A float image (H, W, 3) or mask (H, W) in [0, 1] -> PIL (RGB or L)."""
    return Image.fromarray(to_uint8(arr))


def rgb_picture(image, size: Optional[int] = None) -> Image.Image:
    """PIL / uint8 array / float array in [0, 1] / tensor -> RGB PIL image, resized (Lanczos) to
    size x size. An 8-bit picture stays an 8-bit picture: its resize is PIL's on the 8-bit image."""
    pic = image if isinstance(image, Image.Image) and image.width >= 1 and image.height >= 1 else None
    pic = to_rgb(pic) if pic is not None else to_pil(to_float_rgb(image))
    if size is not None and pic.size != (size, size):
        pic = pic.resize((size, size), Image.Resampling.LANCZOS)
    return pic


def grey(image) -> np.ndarray:
    """A picture's grey level (H, W) float32 in [0, 1] (ITU-R 601 luma, as PIL's "L")."""
    if isinstance(image, np.ndarray) and image.ndim == 2:
        return image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    return np.asarray(to_pil(to_float_rgb(image)).convert("L"), np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# model tensors (B, 3, H, W) in [-1, 1]


def images_to_tensor(images_NHW3: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    a = np.ascontiguousarray(images_NHW3)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def tensor_to_images(x_N3HW: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return x_N3HW.detach().float().add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def float_to_tensor(rgb01: np.ndarray) -> torch.Tensor:
    """A float image (H, W, 3) or a batch (N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1], exact."""
    a = rgb01[None] if rgb01.ndim == 3 else rgb01
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2).mul(2).sub(1)


def to_tensor_batch(images, size: Optional[int] = None) -> Tuple[torch.Tensor, bool]:
    """PIL image(s), arrays (uint8, or floats in [0, 1] taken exactly; (H,W,3), (H,W) or a batch
    (N,H,W,3)) or a (3,H,W)/(N,3,H,W) tensor in [-1, 1] -> ((N, 3, H, W) float in [-1, 1] on the CPU,
    whether one image was given). size: pictures and arrays are resized to size x size; tensors must
    already have that size."""
    if isinstance(images, torch.Tensor):
        single = images.ndim == 3
        x = images[None] if single else images
        if x.ndim != 4 or x.shape[1] != 3 or (size is not None and tuple(x.shape[-2:]) != (size, size)):
            want = f"({size}, {size})" if size is not None else "(H, W)"
            raise ValueError(f"image tensor must be (B, 3) x {want} in [-1, 1], got {tuple(images.shape)}")
        return x.float(), single
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images, single = list(images), False
    elif isinstance(images, (Image.Image, np.ndarray)):
        images, single = [images], True
    elif isinstance(images, (list, tuple)):
        single = False
    else:
        raise ValueError(f"expected PIL images, arrays or a tensor, got {type(images).__name__}")
    if not images:
        raise ValueError("no images given")
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.append(to_tensor_batch(im, size)[0])
            continue
        if isinstance(im, Image.Image):
            im = np.asarray(to_rgb(im))  # uint8 (H, W, 3)
        if isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3 \
                and (size is None or im.shape[:2] == (size, size)):
            out.append(images_to_tensor(im[None]))  # x / 127.5 - 1 of the 8-bit values
            continue
        arr = to_float_rgb(im)
        if size is not None:
            arr = resize(arr, (size, size))
        out.append(float_to_tensor(arr))
    shapes = {tuple(t.shape[-2:]) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)} in one batch; pass size= to resize them")
    return torch.cat(out), single


def tensor_to_output(x_m11: torch.Tensor, output_type: str = "pil"):
    """(B, 3, H, W) in [-1, 1] -> a list of PIL images, an (B, H, W, 3) float array in [0, 1], or a
    (B, 3, H, W) tensor in [0, 1] (the diffusers output types)."""
    check_output_type(output_type)
    x = x_m11.float().add(1).mul_(0.5).clamp_(0, 1)
    if output_type == "pt":
        return x.cpu()
    arr = x.permute(0, 2, 3, 1).cpu().numpy()
    return arr if output_type == "np" else [Image.fromarray(a) for a in to_uint8(arr)]


def float_to_output(images_NHW3: np.ndarray, output_type: str = "pil"):
    """Float images (N, H, W, 3) in [0, 1] -> the output type, as tensor_to_output."""
    check_output_type(output_type)
    if output_type == "np":
        return images_NHW3
    if output_type == "pt":
        return torch.from_numpy(images_NHW3).permute(0, 3, 1, 2).contiguous()
    return [Image.fromarray(a) for a in to_uint8(images_NHW3)]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")


# ---------------------------------------------------------------------------------------------
# resizing


def _resize_channels(arr: np.ndarray, size: Size, resample) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    chans = [a] if a.ndim == 2 else [a[..., c] for c in range(a.shape[2])]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c), "F").resize(size, resample)) for c in chans]
    return out[0] if a.ndim == 2 else np.stack(out, axis=-1)


def resize(arr: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float image (H, W[, C]) in [0, 1] to size = (w, h) with Lanczos (antialiased when
    shrinking), in float32 (nothing rounded to 8 bits), clipped to [0, 1].

    PIL's Lanczos, not OpenCV's: on a 256 -> 128 -> 256 round trip of held-out renders it keeps
    37.4 dB PSNR where cv2 INTER_AREA down / INTER_CUBIC up keeps 37.0 (LANCZOS4 up: 37.2)."""
    size = (int(size[0]), int(size[1]))
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return np.clip(_resize_channels(arr, size, Image.Resampling.LANCZOS), 0.0, 1.0)


def resize_nearest(arr: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a mask (H, W) or a float image to size = (w, h) (pixel centres)."""
    size = (int(size[0]), int(size[1]))
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return _resize_channels(arr, size, Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------
# masks


def mask_to_array(mask_image, size: Size) -> np.ndarray:
    """A mask image (PIL any mode, array, or tensor; white = regenerate) -> (H, W) float32 in [0, 1].

    RGBA masks (a painted layer) count painted, opaque pixels; `size` is the image's (W, H) and the
    mask must have the same size."""
    if isinstance(mask_image, torch.Tensor):
        mask_image = mask_image.detach().cpu().numpy()
    if isinstance(mask_image, np.ndarray):
        arr = mask_image.astype(np.float32)
        if arr.ndim == 3:
            arr = arr.max(axis=-1) if arr.shape[-1] in (1, 3, 4) else arr.max(axis=0)
        if arr.max(initial=0.0) > 1.0:
            arr = arr / 255.0
    elif isinstance(mask_image, Image.Image):
        arr = mask_levels(mask_image)  # at the mask's own bit depth (16-bit masks are not clipped to 8 bits)
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


def binary(mask: np.ndarray) -> np.ndarray:
    """Mask -> float32 {0, 1} (threshold one half)."""
    return (np.asarray(mask) > 0.5).astype(np.float32)


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binarise, then grow (pixels > 0) or shrink (pixels < 0) by |pixels| in every direction: a
    disc-shaped structuring element, so a corner or a dot grows round, as brushes paint. Outside the
    image counts as neither: growing comes in from no border, shrinking eats in from none."""
    b = binary(mask)
    if pixels == 0:
        return b
    r = abs(int(pixels))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx * xx + yy * yy <= (r + 0.5) ** 2).astype(np.uint8)  # symmetric (cv2's MORPH_ELLIPSE is not)
    op = cv2.dilate if pixels > 0 else cv2.erode
    return op(b, disc, borderType=cv2.BORDER_CONSTANT,
              borderValue=0.0 if pixels > 0 else 1.0).astype(np.float32)


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Soft blend weights: the binary mask box-blurred twice, with radii pixels//2 and the rest (a
    tent filter, edges replicated).

    Pixels farther than `pixels` from the mask get weight exactly 0, so the original shows through
    unchanged there; inside the mask deeper than `pixels` the weight is exactly 1."""
    x = binary(mask)
    if pixels <= 0:
        return x
    r1 = pixels // 2
    for r in (r1, pixels - r1):
        if r > 0:
            x = cv2.blur(x, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REPLICATE)
    x[x < 1e-6] = 0.0
    x[x > 1 - 1e-6] = 1.0
    return x


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool (H, W) mask grown by a square of radius `radius` (Chebyshev distance <= radius)."""
    if radius <= 0:
        return mask
    k = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image (H, W[, C]), truncated at 2.5 sigma, edges mirrored."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    return cv2.GaussianBlur(np.ascontiguousarray(arr, dtype=np.float32), (2 * r + 1, 2 * r + 1), sigmaX=sigma,
                            sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


# ---------------------------------------------------------------------------------------------
# crop regions, paste-back and overlays


@dataclass
class Region:
    """A square crop box (x0, y0, side) in image pixels; it may reach outside the image (crops are
    edge-padded there)."""

    x0: int
    y0: int
    side: int

    @property
    def box(self) -> Tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


def region_around(mask: np.ndarray, padding: int, min_side: int) -> Region:
    """The square around the mask's bounding box plus `padding`, at least `min_side`, inside the
    image when it fits (centred on the image where the image is narrower than the square)."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask > 0.5)
    if not len(ys):
        raise ValueError("the mask is empty: no region to crop")
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


def crop(arr: np.ndarray, region: Region) -> np.ndarray:
    """Crop (H, W[, C]) to the region, edge-replicating where it leaves the image."""
    H, W = arr.shape[:2]
    x0, y0, x1, y1 = region.box
    pad = ((max(0, -y0), max(0, y1 - H)), (max(0, -x0), max(0, x1 - W))) + ((0, 0),) * (arr.ndim - 2)
    if any(p for pair in pad for p in pair):
        arr = np.pad(arr, pad, mode="edge")
        x0, x1 = x0 + pad[1][0], x1 + pad[1][0]
        y0, y1 = y0 + pad[0][0], y1 + pad[0][0]
    return arr[y0:y1, x0:x1]


def paste(arr: np.ndarray, patch: np.ndarray, region: Region) -> np.ndarray:
    """A copy of `arr` with `patch` (region.side x region.side) put back where `crop` took it (the
    parts of the patch outside the image are dropped)."""
    H, W = arr.shape[:2]
    x0, y0, x1, y1 = region.box
    out = arr.copy()
    sx, sy = max(0, -x0), max(0, -y0)
    h, w = min(y1, H) - max(y0, 0), min(x1, W) - max(x0, 0)
    out[max(y0, 0):max(y0, 0) + h, max(x0, 0):max(x0, 0) + w] = patch[sy:sy + h, sx:sx + w]
    return out


def seam_matched(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray, ring: int = 2,
                 reach: float = 0.5) -> np.ndarray:
    """`generated` with its colours pulled to the original's where they meet: the known pixels decide the seam.

    Where alpha == 0 the original is kept; along that border (the `ring` known pixels next to the edit) the
    difference original - generated is measured, spread smoothly over the edited area (pull-push: averaged
    down a pyramid of the ring's values, then pushed back up, so every edited pixel gets a mean of the
    nearest border; the pixels right at the seam take their nearest known pixel's difference exactly) and
    added to `generated`, fading with the distance to the border (over `reach` times
    the image's shorter side). The edit keeps its own detail and gradients; its colours continue the
    surroundings', so a blend over the feathered mask no longer shows a step. An edit with no known border
    (alpha > 0 everywhere) is returned unchanged."""
    known = alpha <= 0
    if known.all() or not known.any():
        return generated
    k = np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)
    near = cv2.dilate((~known).astype(np.uint8), k) > 0
    ys, xs = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))  # the work stays in the edit's bounding box
    border = known[box] & near[box]
    diff = (original[box] - generated[box]).astype(np.float32)
    smooth = _pull_push(diff, border.astype(np.float32))
    # right at the seam each edited pixel takes its nearest known pixel's difference exactly (the step
    # there becomes the edit's own gradient), giving way to the smooth fill within a few pixels
    unknown = (~known[box]).astype(np.uint8)
    dist, label = cv2.distanceTransformWithLabels(unknown, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    nearest = diff[unknown == 0][label - 1]
    exact = np.exp(-np.maximum(dist - 1.0, 0.0) / 2.0)[..., None].astype(np.float32)
    offset = nearest * exact + smooth * (1 - exact)
    fade = np.exp(-dist / max(1.0, reach * min(alpha.shape))).astype(np.float32)
    out = generated.copy()
    out[box] = np.clip(generated[box] + offset * fade[..., None], 0.0, 1.0)
    return out


def _pull_push(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Fill (H, W, C) `values` known where `weights` > 0 smoothly everywhere: each coarser level holds the
    weighted means of 2x2 blocks (weights summed, capped at 1); each finer level keeps its own values where
    it has weight and takes the coarser level's (bilinear) elsewhere."""
    levels = []
    v, w = values * weights[..., None], weights
    while True:
        mean = np.divide(v, w[..., None], out=np.zeros_like(v), where=w[..., None] > 0)
        levels.append((mean, np.minimum(w, 1.0)))
        H, W = w.shape
        if H <= 1 and W <= 1:
            break
        size = (max(1, (W + 1) // 2), max(1, (H + 1) // 2))
        v = cv2.resize(v, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], -1) * 4
        w = cv2.resize(w, size, interpolation=cv2.INTER_AREA) * 4
    est = levels[-1][0]
    for mean, w in reversed(levels[:-1]):
        H, W = w.shape
        up = cv2.resize(est, (W, H), interpolation=cv2.INTER_LINEAR).reshape(H, W, -1)
        est = mean * w[..., None] + up * (1 - w[..., None])
    return est


def blend(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """original * (1 - alpha) + generated * alpha (float images), where alpha == 0 returns the
    original exactly."""
    a = alpha[..., None]
    out = original * (1 - a) + generated * a
    out[alpha == 0] = original[alpha == 0]
    return out


# ---------------------------------------------------------------------------------------------
# CAR condition pictures


def _map_picture(picture, family: str) -> Image.Image:
    """A released control model's condition picture (a PIL image or a uint8 array (H, W[, 3])) as an RGB
    PIL image; float maps are refused (they would have to be rounded to 8 bits)."""
    if isinstance(picture, np.ndarray):
        if picture.dtype != np.uint8:
            raise ValueError(f"a {family} control map is an 8-bit picture: give a PIL image or a uint8 array, "
                             f"not a {picture.dtype} array")
        picture = Image.fromarray(_hwc(picture, "control map"))
    if not isinstance(picture, Image.Image):
        raise ValueError(f"a {family} control map must be a PIL image or a uint8 array, not {type(picture).__name__}")
    return to_rgb(picture)


def car_scale_maps(picture, patch_nums, pixels_per_token: int = 16):
    """A CAR condition picture -> one (1, 3, s, s) float32 tensor in [-1, 1] per scale, s = 16 * pn.

    The released CAR's rule (inference.py, get_control_for_each_scale): the picture is resized
    straight to each scale's size with PIL's default filter (BICUBIC for RGB), then uint8/255
    in float32 and x + x - 1. Pictures of other modes are made RGB first (to_rgb: the released code
    expects RGB; a grey 'L' map would give a one-channel tensor there). uint8 arrays (H, W[, 3])
    are taken as pictures; float maps are refused (they would have to be rounded to 8 bits)."""
    picture = _map_picture(picture, "CAR")
    out = []
    for pn in patch_nums:
        s = pixels_per_token * int(pn)
        arr = np.asarray(picture.resize((s, s), Image.Resampling.BICUBIC)).astype(np.float32) / 255.0
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
        out.append(t.add(t).add_(-1))
    return out


def controlvar_map(picture, resolution: int = 256, control_type: str = "canny") -> torch.Tensor:
    """A ControlVAR control map -> (1, 3, R, R) float32 in [-1, 1], as the released val loader feeds
    it: uint8/255 in float32, then (x - 0.5) / 0.5, pixel for pixel at R x R. The model's VQVAE
    tokenises it (its multi-scale quantiser does the per-scale downsampling).

    Maps of another size are resized to R x R (our choice; the official loader only ever sees its
    dataset's 256 px crops): NEAREST for segmentation maps, so that every pixel keeps a palette
    colour, LANCZOS (the loader's filter) for the others. uint8 arrays (H, W[, 3]) are taken as
    pictures; float maps are refused (they would have to be rounded to 8 bits)."""
    picture = _map_picture(picture, "ControlVAR")
    if picture.size != (resolution, resolution):
        flt = Image.Resampling.NEAREST if control_type == "segmentation" else Image.Resampling.LANCZOS
        picture = picture.resize((resolution, resolution), flt)
    arr = np.asarray(picture).astype(np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
    return (t - 0.5) / 0.5
