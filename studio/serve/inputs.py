"""The page's values -> job parameters: editor images and masks as PNG bytes, class labels, the
sampling accordion. Plain Python + PIL (no torch); a mistake raises gr.Error (or studio.params'
UserError) before the job waits in the queue. studio.serve.ui wires these to the widgets.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np
from PIL import Image

from studio import params as P
from studio.serve.protocol import ModelInfo
from studio.world import SEG_CLASSES, SEG_PALETTE  # numpy only, no torch

RANDOM_CLASS = "(random)"  # Generate without a class: each image gets a random one
NO_CLASS = "(none)"  # Edit / Guide without a class: the unconditional model


def class_label(name, info: ModelInfo) -> str:
    """The dropdown's value -> a class name for the worker ('' = no class); ids are accepted too."""
    if name is None or str(name).strip() in ("", RANDOM_CLASS, NO_CLASS):
        return ""
    return info.class_names[P.find_class(str(name), info.class_names)]


def sampling(info: ModelInfo, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview) -> dict:
    """The Sampling accordion's values as job parameters (studio.params checks them with the job)."""
    if isinstance(top_k, (int, float)):
        top_k = min(top_k, info.vocab_size)  # the slider's end is the model's vocabulary: top-k off
    return dict(seed=-1 if seed is None else seed, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                more_smooth=more_smooth, num_images=num_images, preview=preview or None)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _as_pil(x) -> Optional[Image.Image]:
    if x is None:
        return None
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        return Image.fromarray(x)
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
    return _flatten(bg)


def editor_composite(value, missing: str = "Paint a colour layout or upload a guide image first.") -> Image.Image:
    """What the editor shows (upload + strokes), as RGB."""
    im = _as_pil(value.get("composite")) if isinstance(value, dict) else _as_pil(value)
    if im is None and isinstance(value, dict):
        im = _as_pil(value.get("background"))
    if im is None:
        raise gr.Error(missing)
    return _flatten(im)



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


def _flatten(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return im.convert("RGB")


def layer_mask(layer: Image.Image) -> np.ndarray:
    """A painted layer (transparent where unpainted) or an opaque black/white mask -> bool (H, W)."""
    arr = np.asarray(layer.convert("RGBA"))
    alpha = arr[..., 3]
    if alpha.min() == 255:  # an opaque mask image: white = regenerate
        return arr[..., :3].mean(axis=-1) > 127
    return alpha > 0


def editor_mask(value, upload, size, invert: bool) -> Image.Image:
    """The regenerate mask (L, 255 = regenerate) from the uploaded mask if any, else the strokes."""
    if upload is not None:
        up = _as_pil(upload)
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
            if layer.size != tuple(size):  # the editor's canvas can differ from the upload by a pixel
                layer = layer.resize(tuple(size), Image.Resampling.NEAREST)
            mask |= layer_mask(layer)
    if invert:
        mask = ~mask
    if not mask.any():
        raise gr.Error("The mask is empty: paint over the part of the image to regenerate "
                       "(or upload a mask where white = regenerate).")
    if mask.all():
        raise gr.Error("The mask covers the whole image: use Generate instead, or invert the mask.")
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def readable_upload_errors(**components) -> None:
    """A corrupt upload fails inside Gradio's preprocessing with a developer message; turn it into a
    message for people (and API clients). Keys name the upload in the message."""
    for what, comp in components.items():
        original = comp.preprocess

        def preprocess(payload, _original=original, _what=what.replace("_", " ")):
            try:
                return _original(payload)
            except gr.Error:
                raise
            except Exception as e:
                raise gr.Error(f"The {_what} could not be read ({type(e).__name__}): upload a PNG, JPEG or WebP "
                               "file.") from e

        comp.preprocess = preprocess

