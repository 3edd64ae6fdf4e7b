"""The page's values -> job parameters: editor images and masks as PNG bytes, class labels, the
sampling accordion. Plain Python + PIL (no torch); a mistake raises gr.Error (or studio.params'
UserError) before the job waits in the queue. studio.serve.ui wires these to the widgets.
"""
from __future__ import annotations

import base64
import functools
import io
import math
from pathlib import Path
from typing import Optional, Tuple

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

from studio import params as P
from studio.params import UserError
from studio.serve.limits import Limits
from studio.uploads import flatten, mask_levels
from studio.serve.protocol import ModelInfo
from studio.world import SEG_CLASSES, SEG_PALETTE  # numpy only, no torch

RANDOM_CLASS = "(random)"  # Generate without a class: each image gets a random one
NO_CLASS = "(none)"  # Edit / Guide without a class: the unconditional model


def class_label(name, info: ModelInfo) -> str:
    """The dropdown's value -> a class name for the worker ('' = no class); ids are accepted too."""
    if name is None or str(name).strip() in ("", RANDOM_CLASS, NO_CLASS):
        return ""
    if getattr(info, "family", "var") == "infinity":  # text-to-image: the worker's words for a class sent to it
        return str(name).strip()
    return info.class_names[P.find_class(str(name), info.class_names)]


# sampling settings whose default is the model's own: an API caller who leaves one out gets the chosen
# model's published value (ModelInfo.defaults: Infinity's cfg 3, top-p 0.97 ...), not the first model's
MODEL_DEFAULTS = P.MODEL_DEFAULTS


def model_defaults(info: ModelInfo) -> dict:
    """The model's published sampling defaults (ModelInfo.defaults), else VAR's (studio.params.VAR_DEFAULTS)."""
    return P.published_defaults(getattr(info, "defaults", None))


def sampling(info: ModelInfo, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview) -> dict:
    """The Sampling accordion's values as job parameters (studio.params checks them with the job).
    guidance_scale, top_k or top_p None (left out by an API caller): the model's own default."""
    d = model_defaults(info)
    guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
    top_k = d["top_k"] if top_k is None else top_k
    top_p = d["top_p"] if top_p is None else top_p
    if isinstance(top_k, (int, float)):
        top_k = min(top_k, info.vocab_size)  # the slider's end is the model's vocabulary: top-k off
    return dict(seed=-1 if seed is None else seed, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                more_smooth=more_smooth, num_images=num_images, preview=preview or None)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Upload(str):
    """An uploaded picture's path, checked from its header only (nothing decoded yet): `.size` is
    its (width, height). Opened (lazily) where a handler needs the pixels."""

    size: Tuple[int, int] = (0, 0)


class UploadBytes(bytes):
    """The same for a picture that arrived as bytes (the editor's blob storage, a data: URL)."""

    size: Tuple[int, int] = (0, 0)


def upload_pixels(*values) -> int:
    """The pixels of every checked upload among `values` (editor dicts, uploads): what decoding costs."""
    total = 0
    for v in values:
        if isinstance(v, dict):
            total += upload_pixels(v.get("background"), v.get("composite"), *(v.get("layers") or []))
        elif isinstance(v, (Upload, UploadBytes)):
            total += v.size[0] * v.size[1]
    return total


def upload_size(value) -> Optional[Tuple[int, int]]:
    """The (width, height) of an editor's picture or an upload, from the header check."""
    if isinstance(value, dict):
        for key in ("background", "composite"):
            if isinstance(value.get(key), (Upload, UploadBytes)):
                return value[key].size
        return None
    return value.size if isinstance(value, (Upload, UploadBytes)) else None


def _as_pil(x) -> Optional[Image.Image]:
    if x is None:
        return None
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        return Image.fromarray(x)
    if isinstance(x, (bytes, bytearray)):
        return Image.open(io.BytesIO(x))
    if isinstance(x, (str, Path)):
        return Image.open(x)
    raise gr.Error(f"Unexpected image value of type {type(x).__name__}.")


def editor_background(value) -> Image.Image:
    """The image under an ImageEditor's strokes (the upload), as RGB."""
    bg = _as_pil(value.get("background")) if isinstance(value, dict) else _as_pil(value)
    if bg is None and isinstance(value, dict):
        bg = _as_pil(value.get("composite"))
    if bg is None:
        raise gr.Error("Upload an image first (or send a result here with “Send to Edit”).")
    return flatten(bg)


def editor_composite(value, missing: str = "Paint a colour layout or upload a guide image first.") -> Image.Image:
    """What the editor shows (upload + strokes), as RGB."""
    im = _as_pil(value.get("composite")) if isinstance(value, dict) else _as_pil(value)
    if im is None and isinstance(value, dict):
        im = _as_pil(value.get("background"))
    if im is None:
        raise gr.Error(missing)
    return flatten(im)



def control_map_request(image, control_type, preprocessor, canny_low, canny_high) -> dict:
    """The worker's description of a control map: the editor's picture (with any painted layout) and
    how to read it (studio.params.ControlMapParams checks the rest)."""
    image = editor_composite(image, "Upload a picture or a map, or paint a segmentation layout, first.")
    return dict(image=png_bytes(image), control_type=control_type, preprocessor=preprocessor or None,
                canny_low=canny_low, canny_high=canny_high)


def controls_note(info: ModelInfo) -> str:
    if info.controls:
        return f"This model has control adapters for: **{', '.join(info.controls)}**."
    return ("⚠️ This model has no control adapters yet: *Preview map* works, generating needs a bundle with "
            "`control_<type>.safetensors`.")


def seg_legend() -> str:
    return "Brush colours: " + "".join(f'<span class="swatch" style="background: rgb{tuple(c)}"></span>{name}'
                                       for c, name in zip(SEG_PALETTE, SEG_CLASSES))


def blank_layout(resolution: int) -> Image.Image:
    return Image.new("RGB", (resolution, resolution), tuple(SEG_PALETTE[0]))  # all sky


def layer_mask(layer: Image.Image) -> np.ndarray:
    """A painted layer (transparent where unpainted) or an opaque black/white mask -> bool (H, W).
    A mask is read at its own bit depth: a 16-bit mask's near-black stays black."""
    if layer.mode in ("RGBA", "LA", "PA") or "transparency" in layer.info:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        if alpha.min() < 255:  # a painted layer: what was painted
            return alpha > 0
    return mask_levels(layer) > 0.5  # an opaque mask image: white = regenerate


# a painted layer may differ from the picture by this many pixels (the editor's canvas rounds its size)
LAYER_SLACK = 2


def fit_layer(layer: Image.Image, size) -> Image.Image:
    """A painted layer on the picture's pixels: a layer within LAYER_SLACK pixels of the picture's size
    is padded (unpainted) or cropped at its right and bottom edges, never stretched (a stroke stays
    where it was painted); one further off is refused with both sizes."""
    w, h = size
    if layer.size == (w, h):
        return layer
    if abs(layer.width - w) > LAYER_SLACK or abs(layer.height - h) > LAYER_SLACK:
        raise gr.Error(f"The painted layer is {layer.width}x{layer.height} but the image is {w}x{h}; "
                       "paint on the image again (clear the strokes, then paint).")
    rgba = layer.convert("RGBA")
    out = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    out.paste(rgba.crop((0, 0, min(w, rgba.width), min(h, rgba.height))), (0, 0))
    return out


def editor_mask(value, upload, size, invert: bool) -> Image.Image:
    """The regenerate mask (L, 255 = regenerate) from the uploaded mask if any, else the strokes."""
    if upload is not None:
        up = _as_pil(upload)
        if isinstance(upload, (str, Upload)):
            up = ImageOps.exif_transpose(up)  # as a photo is shown
        if up.size != tuple(size):
            raise gr.Error(f"The mask is {up.width}×{up.height} but the image is {size[0]}×{size[1]}; "
                           "they must be the same size.")
        mask = layer_mask(up)
    else:
        mask = np.zeros((size[1], size[0]), dtype=bool)
        for layer in (value or {}).get("layers") or []:
            layer = _as_pil(layer)
            if layer is None:
                continue
            mask |= layer_mask(fit_layer(layer, size))
    if invert:
        mask = ~mask
    if not mask.any():
        raise gr.Error("The mask is empty: paint over the part of the image to regenerate "
                       "(or upload a mask where white = regenerate).")
    if mask.all():
        raise gr.Error("The mask covers the whole image: use Generate instead, or invert the mask.")
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def _checked_upload(data, what: str, limits: Limits, blob: bool = False):
    """One uploaded file (Gradio's FileData / ImageData, or bytes) -> Upload / UploadBytes, checked
    from its header against the limits; nothing is decoded."""
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray, memoryview)):
        out = UploadBytes(bytes(data))
        out.size = limits.check_upload(out, what)
        return out
    url = getattr(data, "url", None) or ""
    if url.startswith("data:") and not getattr(data, "path", None):
        encoded = url.split(",", 1)[-1]
        limits.check_bytes(len(encoded) * 3 // 4, what)  # before decoding the text
        return _checked_upload(base64.b64decode(encoded), what, limits)
    path = getattr(data, "path", None)
    if not path:
        raise UserError(f"no {what} was uploaded")
    out = Upload(str(path))
    out.size = limits.check_upload(out, what)
    return out


# Uploads larger than this on their longer side are downscaled when they arrive: the editors stay
# responsive and a mask painted on them reaches the worker (the model works at 128-512 px anyway).
WORKING_SIDE = 2048


def read_upload(path, limits: Limits, what: str = "picture") -> tuple:
    """A file from an editor's upload button -> (RGB or RGBA picture, a line for the user). It is first
    checked from its header against the limits (bytes, pixels, PNG/JPEG/WebP), then decoded inside a
    heavy-job slot; pictures above WORKING_SIDE are downscaled, and the line says so. Unreadable files
    raise UserError in the user's words."""
    name = Path(str(path)).name if path else ""
    if not path:
        raise UserError(f"no {what} arrived: try again")
    size = limits.check_upload(str(path), f"file {name}")  # nothing decoded yet
    with limits.heavy(size[0] * size[1]):
        try:
            with Image.open(path) as opened:
                if max(size) > WORKING_SIDE:
                    opened.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # JPEG: decode at a reduced size directly
                picture = opened.convert("RGBA" if opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
                                         else "RGB")
        except Exception as e:  # a truncated or corrupt file behind a valid header
            raise UserError(f"the file {name} could not be read as an image ({type(e).__name__}): "
                            "upload a PNG, JPEG or WebP file") from e
        if max(picture.size) > WORKING_SIDE:
            picture.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.LANCZOS)
    line = f"{name}: {size[0]}×{size[1]}"
    if picture.size != size:
        line += f", downscaled to {picture.width}×{picture.height} to work on"
    return picture, line


def editor_value(picture: Image.Image) -> dict:
    """An ImageEditor value holding `picture` alone (no strokes)."""
    return {"background": picture, "layers": [], "composite": picture}


def guard_uploads(limits: Limits, **components) -> None:
    """Gradio decodes an uploaded picture whole (several copies for an image editor) before a handler
    sees it; a 100-megapixel upload took the web process to gigabytes. Instead, each upload is checked
    from its header (bytes, pixels, PNG/JPEG/WebP) against the limits, and handed on undecoded (an
    Upload: its path, with its size); a handler decodes it inside a heavy-job slot. Keys name the
    upload in messages."""
    for what, comp in components.items():
        what = what.replace("_", " ")
        editor = isinstance(comp, gr.ImageEditor)

        def preprocess(payload, _comp=comp, _what=what, _editor=editor):
            if payload is None:
                return None
            try:
                if not _editor:
                    return _checked_upload(payload, _what, limits)
                if getattr(payload, "id", None) is not None:  # the page sent the editor's images as blobs
                    payload = _comp.blob_storage.pop(payload.id, None)
                    if payload is None:  # none arrived (as Gradio reads it: an empty editor)
                        return {"background": None, "layers": [], "composite": None}
                return {"background": _checked_upload(payload.background, _what, limits),
                        "layers": [_checked_upload(layer, f"{_what}'s painted layer", limits)
                                   for layer in (payload.layers or [])],
                        "composite": _checked_upload(payload.composite, _what, limits)}
            except UserError as e:
                raise gr.Error(_sentence(str(e))) from e
            except gr.Error:
                raise
            except Exception as e:
                raise gr.Error(f"The {_what} could not be read ({type(e).__name__}): upload a PNG, JPEG or WebP "
                               "file.") from e

        comp.preprocess = preprocess


def readable_inputs(components) -> None:
    """A value Gradio cannot take (NaN in a whole-number field, text in a number ...) fails in its
    preprocessing with "Could not preprocess input component at index N"; say instead which field
    and what it must be."""
    for comp in components:
        if getattr(comp, "_readable", False) or isinstance(comp, (gr.ImageEditor, gr.Image, gr.State)):
            continue
        original = comp.preprocess
        label = comp.label or type(comp).__name__

        def preprocess(payload, _original=original, _label=label, _comp=comp):
            if isinstance(payload, float) and not math.isfinite(payload):
                raise gr.Error(f"{_label} must be a number, got {payload}.")
            try:
                return _original(payload)
            except gr.Error:
                raise
            except Exception as e:
                shown = repr(payload) if len(repr(payload)) < 40 else type(payload).__name__
                if isinstance(_comp, (gr.Number, gr.Slider)):
                    whole = " whole" if getattr(_comp, "precision", None) == 0 else ""
                    raise gr.Error(f"{_label} must be a{whole} number{_bounds(_comp)}, got {shown}.") from e
                raise gr.Error(f"{_label} cannot take {shown} ({type(e).__name__}).") from e

        comp.preprocess = preprocess
        comp._readable = True


def api_model_defaults(demo: gr.Blocks, sliders) -> None:
    """API callers who leave out guidance_scale, top_k or top_p get the chosen model's defaults.

    gradio_client sends a left-out parameter as the default the API advertises, which is the slider's
    value when the page was built: the first model's. So the API advertises None for these parameters
    (MODEL_DEFAULTS) in every endpoint, the sliders let None through (the page itself always sends a
    number), and `sampling` takes None from the model's ModelInfo.defaults."""
    for comp in sliders:
        original = comp.preprocess

        def preprocess(payload, _original=original):
            return None if payload is None else _original(payload)

        comp.preprocess = preprocess
    original_info = demo.get_api_info

    @functools.wraps(original_info)
    def get_api_info(*args, **kwargs):
        info = original_info(*args, **kwargs)
        for endpoint in list((info or {}).get("named_endpoints", {}).values()):
            for param in endpoint.get("parameters", []):
                if param.get("parameter_name") in MODEL_DEFAULTS:
                    param["parameter_has_default"], param["parameter_default"] = True, None
        return info

    demo.get_api_info = get_api_info


def _bounds(comp) -> str:
    lo, hi = getattr(comp, "minimum", None), getattr(comp, "maximum", None)
    if lo is not None and hi is not None:
        return f" between {lo:g} and {hi:g}"
    return ""


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")
