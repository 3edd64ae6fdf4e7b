"""Control-map preprocessors: an image -> (map tensor for a control adapter, PIL preview for the user).

    from studio import preprocess as pp
    edges, preview = pp.canny(image, size=256, low=100, high=200)      # (1,S,S) float32 in {0, 1}
    depth, preview = pp.depth(image, size=256, net=nets["depth"])      # (1,S,S) float32, 0 near .. 1 far
    labels, preview = pp.segmentation(image, size=256, net=nets["seg"])  # (1,S,S) int64 class ids
    m = pp.load_depth_model("Intel/dpt-hybrid-midas")                  # only from the local HF cache
    depth, preview = pp.depth(image, size=256, model=m)
    labels, preview = pp.user_map("segmentation", painted_layout, size=256)   # the "none" path
    m, preview = pp.preprocess("depth", image, "world", size=256, net=...)    # one entry point

Map conventions (what the adapters of models/control.py are trained on):
- canny: cv2.Canny-identical edges (canny_edges, OpenCV, default thresholds 100/200 as CAR and
  ControlAR use) of the image resized to the model's resolution; 1 = edge.
- depth: normalised log-depth of the world (studio.domainnets.estimate_depth(units="normalised")),
  0 near, 1 far. A transformers depth model (DPT / Depth Anything) predicts relative inverse depth;
  its map is 1 - minmax(prediction): the same order (near low), not the same curve.
- segmentation: class ids; the world's 8 SEG_CLASSES from its seg net, or ADE20K's 150 classes from
  a transformers model (only for adapters trained on ADE20K ids).
- "none" (the user's own map): pictures are read with the usual control-image conventions: edges
  white on black, depth near = bright (as the previews show it), segmentation painted with a
  palette (the world's SEG_PALETTE by default; each pixel takes the nearest palette colour) or a
  grayscale image of class ids. Float arrays/tensors are taken as maps already.

Weights are never downloaded at run time: the transformers paths load with local_files_only=True
and raise WeightsNotCached (a FileNotFoundError) with the command to fetch them otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.control import resize_map
from studio import images as im
from studio.params import PREPROCESSORS  # the control types and their preprocessors, the first the default

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"  # the MiDaS DPT-hybrid that CAR and ControlAR use
DEFAULT_SEG_MODEL = "nvidia/segformer-b0-finetuned-ade-512-512"  # ADE20K, 150 classes, 3.7M params


class ControlMap(NamedTuple):
    map: torch.Tensor  # (1, S, S): float32 for canny/depth, int64 ids for segmentation
    preview: Image.Image


class WeightsNotCached(FileNotFoundError):
    """A preprocessor's weights are not on this machine (the studio does not download at run time)."""


class HFModel(NamedTuple):
    """A transformers model with its image processor (None: resize + normalise by hand)."""
    model: torch.nn.Module
    processor: object = None


# ---------------------------------------------------------------------------------------------
# helpers


def _check_size(size):
    if size is not None and (int(size) != size or size < 8):
        raise ValueError(f"size must be a whole number of pixels >= 8, got {size}")


def depth_preview(map_1SS: torch.Tensor) -> Image.Image:
    """Depth map (0 near, 1 far) -> grayscale picture with near bright."""
    a = (1.0 - map_1SS[0].clamp(0, 1)).mul(255).round().byte().cpu().numpy()
    return Image.fromarray(a, mode="L")


def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the world's SEG_PALETTE when it is big enough, then fixed
    well-spread colours (golden-ratio hues) for other label sets such as ADE20K."""
    from studio.world import SEG_PALETTE

    cols = [tuple(c) for c in SEG_PALETTE[:num_classes]]
    i = 0
    while len(cols) < num_classes:
        h = (i * 0.61803398875) % 1.0
        s, v = 0.55 + 0.4 * ((i * 7) % 5) / 4, 0.6 + 0.4 * ((i * 3) % 4) / 3
        k = np.array([5, 3, 1], np.float64)
        kk = (k + h * 6) % 6
        rgb = v - v * s * np.clip(np.minimum(kk, 4 - kk), 0, 1)
        c = tuple(int(round(x * 255)) for x in rgb)
        if c not in cols:
            cols.append(c)
        i += 1
    return np.asarray(cols, np.uint8)


def labels_preview(labels_1SS: torch.Tensor, num_classes: int) -> Image.Image:
    ids = labels_1SS[0].cpu().numpy()
    return Image.fromarray(label_palette(max(num_classes, int(ids.max()) + 1 if ids.size else 1))[ids], mode="RGB")


def edges_preview(map_1SS: torch.Tensor) -> Image.Image:
    return Image.fromarray(map_1SS[0].clamp(0, 1).mul(255).round().byte().cpu().numpy(), mode="L")


def map_preview(control_type: str, map_, num_classes: Optional[int] = None) -> Image.Image:
    """One map as an RGB picture: (1,S,S) for canny / depth, (S,S) or (1,S,S) ids for segmentation."""
    if control_type == "segmentation":
        m = map_ if map_.ndim == 3 else map_[None]
        return labels_preview(m, num_classes or 1)
    return (edges_preview if control_type == "canny" else depth_preview)(map_).convert("RGB")


# ---------------------------------------------------------------------------------------------
# canny


def canny_edges(image, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Binary (H,W) bool edge map by cv2.Canny(grey, low, high) (L1 gradient, 3x3 Sobel).

    image: (H,W,3)/(H,W) uint8, float in [0, 1], or PIL; colour goes to grey by OpenCV's RGB2GRAY."""
    import cv2

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = im.to_uint8(a)
    if a.ndim == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a[..., :3]), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(np.ascontiguousarray(a), float(low), float(high)) > 0


def canny(image, size: Optional[int] = 256, low: float = 100.0, high: float = 200.0) -> ControlMap:
    """Edges of the image resized to size x size (None: its own size) with OpenCV's Canny or our
    identical torch port."""
    _check_size(size)
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    edges = canny_edges(np.asarray(im.rgb_picture(image, size)), low, high)
    m = torch.from_numpy(edges.astype(np.float32))[None]
    return ControlMap(m, edges_preview(m))


# ---------------------------------------------------------------------------------------------
# depth


def depth(image, size: int = 256, net=None, model: Optional[Union[HFModel, torch.nn.Module]] = None) -> ControlMap:
    """Depth map of an image: with `net`, the world's DepthNet (studio.domainnets); with `model`, a
    transformers depth model (see load_depth_model)."""
    _check_size(size)
    if (net is None) == (model is None):
        raise ValueError("give the world's depth net (net=, from studio.domainnets.load_domain_nets) or a transformers "
                         "depth model (model=, from load_depth_model), not both or neither")
    if net is not None:
        from studio.domainnets import estimate_depth

        d = estimate_depth(net, im.rgb_picture(image, size), units="normalised")  # (S, S) in [0, 1]
        m = torch.from_numpy(np.ascontiguousarray(d, np.float32))[None].clamp_(0, 1)
        return ControlMap(m, depth_preview(m))
    hf = model if isinstance(model, HFModel) else HFModel(model)
    pv = _hf_pixel_values(hf, image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with torch.no_grad():
        pred = hf.model(pixel_values=pv).predicted_depth  # (1, h, w) relative inverse depth
    pred = F.interpolate(pred[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    lo, hi = pred.min(), pred.max()
    disp = (pred - lo) / (hi - lo) if hi > lo else torch.zeros_like(pred)
    m = (1.0 - disp).clamp_(0, 1).cpu()  # near (large disparity) -> 0
    return ControlMap(m, depth_preview(m))


# ---------------------------------------------------------------------------------------------
# segmentation


def segmentation(image, size: int = 256, net=None,
                 model: Optional[Union[HFModel, torch.nn.Module]] = None) -> ControlMap:
    """Class ids of an image: with `net`, the world's SegNet (SEG_CLASSES); with `model`, a
    transformers semantic-segmentation model (see load_segmentation_model; ADE20K ids)."""
    _check_size(size)
    if (net is None) == (model is None):
        raise ValueError("give the world's seg net (net=, from studio.domainnets.load_domain_nets) or a transformers "
                         "segmentation model (model=, from load_segmentation_model), not both or neither")
    if net is not None:
        from studio.domainnets import segment

        ids = segment(net, im.rgb_picture(image, size))
        m = torch.from_numpy(np.asarray(ids, np.int64))[None]
        return ControlMap(m, labels_preview(m, net.cfg.num_classes))
    hf = model if isinstance(model, HFModel) else HFModel(model)
    pv = _hf_pixel_values(hf, image, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with torch.no_grad():
        logits = hf.model(pixel_values=pv).logits  # (1, K, h, w)
    logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    m = logits.argmax(1).long().cpu()
    return ControlMap(m, labels_preview(m, logits.shape[1]))


# ---------------------------------------------------------------------------------------------
# transformers models (local cache only)


def _hf_pixel_values(hf: HFModel, image, mean, std) -> torch.Tensor:
    device = next(hf.model.parameters()).device
    pic = im.rgb_picture(image, None)
    if hf.processor is not None:
        return hf.processor(images=pic, return_tensors="pt")["pixel_values"].to(device)
    side = getattr(hf.model.config, "image_size", 384)
    side = int(side[0] if isinstance(side, (list, tuple)) else side)
    x = torch.from_numpy(np.asarray(pic.resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1)[None].to(device)


def _load_hf(auto_class: str, what: str, model_id: Union[str, Path], cache_dir, device) -> HFModel:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the transformers {what} preprocessor needs the transformers package "
                          f"(pip install transformers); the world's own {what} net works without it") from e
    try:
        model = getattr(transformers, auto_class).from_pretrained(str(model_id), local_files_only=True,
                                                                  cache_dir=cache_dir)
    except OSError as e:
        where = f" ({cache_dir})" if cache_dir else ""
        raise WeightsNotCached(
            f"the {what} model {str(model_id)!r} is not in the local Hugging Face cache{where}. The studio never "
            f"downloads weights while it runs: fetch them once on a connected machine with "
            f"`hf download {model_id}` (the same cache), or pass the folder that holds the model. "
            f"The world's own {what} net (studio.domainnets) needs no download.") from e
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(model_id), local_files_only=True,
                                                                    cache_dir=cache_dir)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: resize + normalise by hand
    return HFModel(model.to(device).eval(), processor)


def load_depth_model(model_id: Union[str, Path] = DEFAULT_DEPTH_MODEL, cache_dir=None, device="cpu") -> HFModel:
    """A DPT / Depth Anything model (e.g. "Intel/dpt-hybrid-midas",
    "depth-anything/Depth-Anything-V2-Small-hf") from the local cache or a folder."""
    return _load_hf("AutoModelForDepthEstimation", "depth", model_id, cache_dir, device)


def load_segmentation_model(model_id: Union[str, Path] = DEFAULT_SEG_MODEL, cache_dir=None,
                            device="cpu") -> HFModel:
    """An ADE20K semantic-segmentation model (e.g. a SegFormer) from the local cache or a folder."""
    return _load_hf("AutoModelForSemanticSegmentation", "segmentation", model_id, cache_dir, device)


# ---------------------------------------------------------------------------------------------
# "none": the user's own map


def _to_array(image, control_type: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, Image.Image):
        return image  # handled by the caller
    if not isinstance(image, np.ndarray):
        raise ValueError(f"a {control_type} map must be a PIL image, a numpy array or a torch tensor, "
                         f"not {type(image).__name__}")
    if image.dtype == object or np.iscomplexobj(image):
        raise ValueError(f"a {control_type} map cannot hold {image.dtype} values")
    a = image
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def nearest_palette_labels(rgb_HW3: np.ndarray, palette: Sequence[Tuple[int, int, int]]) -> np.ndarray:
    """Each pixel's nearest palette colour (squared RGB distance) -> (H, W) int64 ids."""
    pal = np.asarray(palette, np.int32)  # (K, 3)
    px = rgb_HW3.reshape(-1, 1, 3).astype(np.int32)
    ids = np.empty(px.shape[0], np.int64)
    for i in range(0, len(px), 65536):  # bounded memory for big layouts
        ids[i:i + 65536] = ((px[i:i + 65536] - pal[None]) ** 2).sum(-1).argmin(1)
    return ids.reshape(rgb_HW3.shape[:2])


def user_map(control_type: str, image, size: Optional[int] = None, num_classes: Optional[int] = None,
             palette: Optional[Sequence[Tuple[int, int, int]]] = None) -> ControlMap:
    """The "none" preprocessor: a map the user made (uploaded or painted), checked and resized.

    canny: a picture of edges (white on black, thresholded at half) or a float array in [0, 1].
    depth: a grayscale picture with near bright, or a float array already in the map convention.
    segmentation: an RGB picture painted with `palette` (default the world's SEG_PALETTE), a
    grayscale ("L"/"I") image or an integer array of class ids (checked against num_classes).
    size: resize to size x size (nearest for labels, bilinear otherwise); None keeps the size."""
    if control_type not in PREPROCESSORS:
        raise ValueError(f"unknown control type {control_type!r}; known: {', '.join(PREPROCESSORS)}")
    _check_size(size)
    a = _to_array(image, control_type)
    if control_type == "segmentation":
        if palette is None:
            from studio.world import SEG_PALETTE

            palette = SEG_PALETTE
        if isinstance(a, Image.Image):
            if a.mode in ("L", "I", "I;16"):
                ids = np.asarray(a, np.int64)
            else:
                ids = nearest_palette_labels(np.asarray(im.rgb_picture(a, None)), palette)
        elif a.ndim == 2 and (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            ids = a.astype(np.int64)
        elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
            ids = nearest_palette_labels(a[..., :3], palette)
        else:
            raise ValueError(f"a segmentation map must be integer class ids (H, W) or a palette-coloured RGB "
                             f"image, got a {a.dtype} array of shape {a.shape}")
        n = num_classes or len(palette)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"segmentation ids {int(ids.min())}..{int(ids.max())} are outside 0..{n - 1}")
        m = torch.from_numpy(np.ascontiguousarray(ids))[None]
        if size is not None:
            m = resize_map(m[None], int(size), labels=True)[0]
        return ControlMap(m, labels_preview(m, n))
    # g: a picture's gray level in [0, 1] (edges white, depth near bright); f: a map as it is
    g = f = None
    if isinstance(a, Image.Image):
        g = im.grey(a)
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
        g = im.grey(a[..., :3])
    elif a.ndim == 2 and a.dtype == np.uint8:
        g = a.astype(np.float32) / 255.0
    elif a.ndim == 2 and (np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_):
        f = a.astype(np.float32)
        if not np.isfinite(f).all():
            raise ValueError(f"the {control_type} map contains NaN or infinite values")
        if f.min() < 0 or f.max() > 1:
            raise ValueError(f"a float {control_type} map must hold values in [0, 1], got {f.min():.3g}..{f.max():.3g}")
    else:
        raise ValueError(f"a {control_type} map has one channel: give a grayscale picture or an (H, W) array, "
                         f"got a {a.dtype} array of shape {a.shape}")
    if g is not None:
        f = (g >= 0.5).astype(np.float32) if control_type == "canny" else 1.0 - g  # depth: near bright -> 0
    m = torch.from_numpy(np.ascontiguousarray(f, np.float32))[None]
    if size is not None:
        m = resize_map(m[None], int(size), labels=False)[0]
    return ControlMap(m, (edges_preview if control_type == "canny" else depth_preview)(m))


# ---------------------------------------------------------------------------------------------
# one entry point


def preprocess(control_type: str, image, preprocessor: Optional[str] = None, size: int = 256, *,
               low: float = 100.0, high: float = 200.0, net=None, model=None, num_classes: Optional[int] = None,
               palette=None) -> ControlMap:
    """Dispatch to a preprocessor. preprocessor: "canny" (canny only), "world" (the domain net
    `net`), "transformers" (a loaded `model`), or "none" (the image is the map); None picks canny
    for canny and the world's net for depth and segmentation."""
    if control_type not in PREPROCESSORS:
        raise ValueError(f"unknown control type {control_type!r}; known: {', '.join(PREPROCESSORS)}")
    preprocessor = preprocessor or PREPROCESSORS[control_type][0]
    if preprocessor not in PREPROCESSORS[control_type]:
        raise ValueError(f"the {control_type} control has preprocessors {', '.join(PREPROCESSORS[control_type])}, "
                         f"not {preprocessor!r}")
    if preprocessor == "none":
        return user_map(control_type, image, size, num_classes, palette)
    if preprocessor == "canny":
        return canny(image, size, low, high)
    fn = depth if control_type == "depth" else segmentation
    if preprocessor == "world":
        if net is None:
            raise ValueError(f"the world {control_type} preprocessor needs its net (studio.domainnets.load_domain_nets)")
        return fn(image, size, net=net)
    if model is None:
        raise ValueError(f"the transformers {control_type} preprocessor needs a model "
                         f"(load_{'depth' if control_type == 'depth' else 'segmentation'}_model)")
    return fn(image, size, model=model)


# ---------------------------------------------------------------------------------------------
# maps from the world's ground truth (training the adapters, judging adherence)


def ground_truth_maps(control_type: str, images=None, depth_m=None, labels=None, low: float = 100.0,
                      high: float = 200.0, near: float = 1.0, far: Optional[float] = None) -> torch.Tensor:
    """The control maps a batch of world renders stands for, in the adapters' conventions:
    canny: edges of `images` ((N,H,W,3) uint8, or (N,3,H,W) floats in [-1, 1]) -> (N,1,H,W) float32;
    depth: `depth_m` (N,H,W) metres -> normalised log-depth (N,1,H,W) float32 (0 near, 1 far);
    segmentation: `labels` (N,H,W) -> int64 ids (N,H,W)."""
    if control_type == "canny":
        if images is None:
            raise ValueError("canny maps need the images")
        a = images
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = im.tensor_to_images(a)
        elif isinstance(a, torch.Tensor):
            a = a.permute(0, 2, 3, 1).cpu().numpy() if a.shape[1] == 3 else a.cpu().numpy()
        edges = np.stack([canny_edges(np.ascontiguousarray(x), low, high) for x in np.asarray(a)])
        return torch.from_numpy(edges.astype(np.float32))[:, None]
    if control_type == "depth":
        if depth_m is None:
            raise ValueError("depth maps need the depth in metres")
        from studio.domainnets import normalise_depth

        d = depth_m.detach().cpu().numpy() if isinstance(depth_m, torch.Tensor) else np.asarray(depth_m)
        return torch.from_numpy(normalise_depth(d, near, far))[:, None]
    if control_type == "segmentation":
        if labels is None:
            raise ValueError("segmentation maps need the labels")
        return torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels), dtype=torch.long)
    raise ValueError(f"unknown control type {control_type!r}; known: {', '.join(PREPROCESSORS)}")
