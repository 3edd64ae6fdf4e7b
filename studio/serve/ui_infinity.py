"""The page's text-to-image part (Infinity): prompt boxes in place of the class pickers, a negative
prompt, the temperature and an aspect-ratio picker from the official table, and what a model change
or "Reuse settings" does to them. studio.serve.ui calls these from its tabs and wiring; like it, this
module never imports torch.

Which widgets show follows the model in view (ModelInfo.family): a class-conditional model shows its
class pickers and "more smooth", a text-to-image model its prompts and temperature. Both kinds of
widget always exist (a model menu can hold both kinds), and every run endpoint takes both; a prompt
sent to a class-conditional model, or a class sent to Infinity, is refused in words
(studio.params.check_conditioning).
"""
from __future__ import annotations

from typing import Optional

import gradio as gr

from studio import params as P
from studio.params import UserError
from studio.serve.protocol import ModelInfo

SQUARE = "1:1"


def is_text(info: ModelInfo) -> bool:
    return getattr(info, "family", "var") == "infinity"


def text_values(info: ModelInfo, prompt, negative_prompt, aspect_ratio=None, tau=None) -> dict:
    """The text widgets' values as job parameters. A class-conditional model gets none of them: a prompt
    or negative prompt is refused; the hidden picker's square shape and an empty temperature (what the
    page sends with every run) are left out."""
    prompt, negative = str(prompt or "").strip(), str(negative_prompt or "").strip()
    aspect = str(aspect_ratio or "").strip()
    tau = None if tau in (None, "", 0) else tau  # an emptied number box arrives as 0
    if not is_text(info):
        given = [n for n, v in (("prompt", prompt), ("negative_prompt", negative)) if v]
        if aspect not in ("", SQUARE):
            given.append("aspect_ratio")
        if tau is not None:
            given.append("tau")
        if given:
            raise UserError(f"the model {info.name!r} is class-conditional: it takes a class, not "
                            f"{', '.join(given)}; choose a text-to-image (Infinity) model for prompts")
        return {}
    return dict(prompt=prompt, negative_prompt=negative, aspect_ratio=aspect, tau=tau)


# -- the widgets (each called inside the tab or accordion it belongs to) --------------------------------


def generate_widgets(w, info: ModelInfo) -> None:
    """The Generate tab: a prompt and the picture's shape, in place of the class."""
    with gr.Column(visible=is_text(info), elem_id="gen-text") as w.gen_text:
        w.gen_prompt = gr.Textbox("", label="Prompt", lines=2, placeholder="a red fox in the snow, golden hour",
                                  elem_id="gen-prompt")
        w.aspect_ratio = gr.Dropdown(list(P.ASPECT_RATIOS), value=SQUARE, label="Aspect ratio (width:height)",
                                     info=_sizes_note(info), elem_id="aspect-ratio")


def edit_widgets(w, info: ModelInfo) -> None:
    """The Edit tab: what to paint in the masked (or added) part."""
    w.edit_prompt = gr.Textbox("", label="Prompt", lines=2, visible=is_text(info), elem_id="edit-prompt",
                               placeholder="what the painted part (or the added margin) should show")


def guide_widgets(w, info: ModelInfo) -> None:
    w.guide_prompt = gr.Textbox("", label="Prompt", lines=1, visible=is_text(info), elem_id="guide-prompt")


def sampling_widgets(w, info: ModelInfo) -> None:
    """In the Sampling accordion (every tab): the negative prompt and the temperature."""
    with gr.Row(visible=is_text(info), elem_id="text-sampling") as w.text_sampling:
        w.negative_prompt = gr.Textbox("", label="Negative prompt", lines=1, scale=3, elem_id="negative-prompt",
                                       info="guidance steers away from it (used by every tab)")
        _, b = P.spec(P.Sampling, "tau")
        w.tau = gr.Number(None, label="Temperature (tau)", minimum=0, maximum=b.maximum, step=b.step, scale=1,
                          info=f"empty or 0 = the model's ({_default(info, 'tau')})", elem_id="tau")


def reroll_widgets(w) -> None:
    """Hidden: the page's re-roll takes the prompt stored in the picture (the API may give another)."""
    w.reroll_prompt = gr.Textbox("", visible=False)
    w.reroll_negative = gr.Textbox("", visible=False)
    w.reroll_tau = gr.Number(None, visible=False)


def _default(info: ModelInfo, name: str):
    return (getattr(info, "defaults", None) or {}).get(name, "-")


def _sizes_note(info: ModelInfo) -> str:
    return f"the nearest size of the official table at about {info.resolution}×{info.resolution} pixels"


# -- the page following the model ---------------------------------------------------------------------


def family_outputs(w) -> list:
    """The widgets family_updates changes besides the class pickers (already a model change's outputs)."""
    return [w.gen_text, w.edit_prompt, w.guide_prompt, w.text_sampling, w.more_smooth, w.guidance, w.top_p,
            w.aspect_ratio, w.tau]


def family_updates(w, info: ModelInfo) -> dict:
    """What a model change does: the text widgets or the class pickers, and the model's own defaults."""
    text = is_text(info)
    out = {w.gen_text: gr.Column(visible=text), w.edit_prompt: gr.update(visible=text),
           w.guide_prompt: gr.update(visible=text), w.text_sampling: gr.Row(visible=text),
           w.more_smooth: gr.update(visible=not text), w.gen_class: gr.update(visible=not text),
           w.edit_class: gr.update(visible=not text), w.guide_class: gr.update(visible=not text),
           w.aspect_ratio: gr.update(info=_sizes_note(info)),
           w.tau: gr.update(info=f"empty or 0 = the model's ({_default(info, 'tau')})", value=None)}
    d = (getattr(info, "defaults", None) or {}) if text else {}
    out[w.guidance] = gr.update(value=d.get("guidance_scale", P.VAR_DEFAULTS["guidance_scale"]))
    out[w.top_p] = gr.update(value=d.get("top_p", P.VAR_DEFAULTS["top_p"]))
    return out


def apply_family(w, info: ModelInfo) -> None:
    """The page as first served: the widgets of the default model's kind, with its defaults."""
    text = is_text(info)
    for c in (w.gen_class, w.edit_class, w.guide_class, w.more_smooth):
        c.visible = not text
    if text:
        d = getattr(info, "defaults", None) or {}
        w.guidance.value = d.get("guidance_scale", w.guidance.value)
        w.top_p.value = d.get("top_p", w.top_p.value)
        w.top_k.value = min(int(d.get("top_k", w.top_k.value)), info.vocab_size)


def reuse_outputs(w) -> list:
    return [w.gen_prompt, w.negative_prompt, w.aspect_ratio, w.tau, w.edit_prompt, w.guide_prompt]


def reuse_updates(w, params: dict) -> dict:
    """A text-to-image PNG's prompt, negative prompt, shape and temperature back on the page."""
    if params.get("family") != "infinity":
        return {}
    prompt = str(params.get("prompt") or "")
    aspect = params.get("aspect_ratio")
    tau = params.get("tau")
    return {w.gen_prompt: prompt, w.edit_prompt: prompt, w.guide_prompt: prompt,
            w.negative_prompt: str(params.get("negative_prompt") or ""),
            w.aspect_ratio: aspect if aspect in P.ASPECT_RATIOS else SQUARE,
            w.tau: tau if isinstance(tau, (int, float)) else None}


def scale_text(u) -> str:
    """A scale's token grid in words: 16×16, or 11×22 (height × width) for Infinity's other shapes."""
    grid = tuple(getattr(u, "grid", ()) or ())
    return f"{grid[0]}×{grid[1]}" if len(grid) == 2 else f"{u.patch_num}×{u.patch_num}"


def caption(p: dict, limit: Optional[int] = 40) -> str:
    """What a result is of: its class, or the start of its prompt."""
    if p.get("family") == "infinity":
        text = str(p.get("prompt") or "")
        return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"
    return str(p.get("class_name", ""))
