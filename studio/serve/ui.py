"""VAR Studio in the browser: Gradio Blocks wired to the worker pool.

Read `build_ui` top to bottom: the left column holds the inputs (Generate / Edit / Guide / Control
tabs and the sampling settings), the right column the outputs (live preview, scale filmstrip,
result, re-roll, history). Every run button is also a named API endpoint (/generate, /inpaint,
/control_inpaint, /outpaint, /guide, /control, /reroll, /stop, and /preprocess for a control map alone; see
docs/api.md).

This module never imports torch or a model: `Studio` turns widget values into the typed job
parameters of studio.params (checked there, before they wait in the queue) for the worker pool, and
turns the pool's updates back into widget values, as dicts keyed by widget. Even a control map's
preview is a worker job ("preprocess"): the depth and segmentation preprocessors are networks.
The sliders take their defaults and bounds from studio.params, so the page, the worker and the API
docs agree.

Call `patch_gradio()` once at start-up (app.py does): it makes Gradio's updates of unchanged
outputs cheap while a job streams.

Why one module of ~650 lines: a job kind's tab, its handler and its endpoint stay together, so a new
kind touches this file, studio/params.py and the runner's table, and nothing else; the form helpers
that do not change per kind live in studio/serve/inputs.py.
"""
from __future__ import annotations

import collections
import copy
import functools
import io
import os
import random
import shutil
import tempfile
import threading
import time
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Set

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from studio import fullsize  # noqa: E402  (PIL and numpy: edits of huge uploads pasted into the original)
from studio.uploads import flatten  # noqa: E402
from studio import params as P  # noqa: E402
from studio.params import UserError  # noqa: E402
from studio.pngmeta import (PARAMETERS_CHUNK, decode_array, read_parameters_chunk, read_png_extras,  # noqa: E402
                            read_png_info)
from studio.serve.inputs import (NO_CLASS, RANDOM_CLASS, blank_layout, class_label, control_map_request,  # noqa: E402
                                 editor_background, editor_composite, editor_mask, editor_value,
                                 guard_uploads, png_bytes, read_upload, readable_inputs, sampling, seg_legend,
                                 upload_pixels, upload_size, api_model_defaults, model_defaults)
from studio.serve import controls as control_ui  # noqa: E402
from studio.serve import gradio_state  # noqa: E402
from studio.serve import security  # noqa: E402
from studio.serve import ui_infinity as text2img  # noqa: E402  (the prompt widgets of text-to-image models)
from studio.serve.outputs import SaveError, folder_problem, save_png  # noqa: E402
from studio.serve import history as output_history  # noqa: E402
from studio.serve.limits import Limits  # noqa: E402
from studio.serve.pool import Job, WorkerPool  # noqa: E402
from studio.serve.protocol import JobView, ModelInfo  # noqa: E402
from studio.world import SEG_PALETTE  # noqa: E402  (numpy only, no torch)

HISTORY_SIZE = 64
ORIGINALS_PER_SESSION = 4  # huge uploads kept per browser session (their files stay in the private temp folder)
# While a job streams, the preview goes out at every scale but the filmstrip at most this often (s): Gradio
# re-checks and re-copies every picture of a gallery each time it is sent. The last one is always complete.
FILMSTRIP_INTERVAL = 0.25
GUIDE_PALETTE = ["#8fc4ec", "#2f6fb0", "#f5f5f0", "#7d8c98", "#5a8f3c", "#2e5a27", "#c9b27c", "#8a5a3b",
                 "#e8853d", "#202830"]  # sky, water, snow/cloud, rock, grass, forest, sand, earth, sunset, night

CONTROL_PREPROCESSORS = P.PREPROCESSORS  # control type -> its preprocessors, the first the default
CONTROL_TYPES = [("Edges (canny)", "canny"), ("Depth", "depth"), ("Segmentation", "segmentation")]
PREPROCESSOR_LABELS = {"canny": "Canny edges", "world": "World net (in the model's bundle)",
                       "transformers": "Transformers (DPT / SegFormer, local cache)",
                       "none": "None: the image is the map"}
SEG_BRUSH = ["#%02x%02x%02x" % tuple(c) for c in SEG_PALETTE]  # paint a layout with the world's classes

CSS = """
#preview img { object-fit: contain; image-rendering: auto; }
.gradio-container { overflow: visible !important; }  /* (hidden would unstick the dock) */
/* the outputs column scrolls on its own beside the inputs: its top (the dock) stays in view while the page
   scrolls to a run button, and a run scrolls it back to the top */
#outputs { position: sticky; top: 0; align-self: flex-start; max-height: 100vh; overflow-y: auto; }
#dock { gap: 6px; }
#queue-note:empty, #queue-note p:empty { display: none; }
#filmstrip .grid-container { grid-auto-flow: column; grid-auto-columns: minmax(0, 1fr);
                             grid-template-columns: none !important; }
@media (max-width: 720px) {
  #outputs { position: static; max-height: none; overflow: visible; }
  #dock { position: fixed; top: auto; bottom: 0; left: 0; right: 0; padding: 4px 8px; z-index: 1000;  /* above the labels (40) */
          background: var(--background-fill-primary, #fff);
          box-shadow: 0 -2px 8px #0003; max-height: 40vh; overflow: auto; }
  #dock #preview { height: 120px !important; }
  #dock #preview img { max-height: 100px; }
  #dock #filmstrip { height: 56px !important; }
  body { padding-bottom: 40vh; }
  /* tiles of ~30 px: a caption covered the picture (the status line names the scales) */
  #dock #filmstrip .caption-label { display: none; }
  /* an editor's label ran under its toolbar (zoom, undo): it stops short of it */
  #editor [data-testid="block-label"], #guide [data-testid="block-label"],
  #control-editor [data-testid="block-label"] { max-width: calc(100% - 200px); overflow: hidden; white-space: nowrap; }
  html { scroll-padding-bottom: 41vh; }  /* a run button scrolled into view stays above the dock */
}
#status { min-height: 2.2em; }
body:not(.var-running) #stop-btn { background: var(--button-secondary-background-fill);
                                   color: var(--button-secondary-text-color);
                                   border-color: var(--button-secondary-border-color); }
#dice { align-self: center; }
#status p { margin: 0.3em 0; }
#filmstrip .thumbnail-item { min-width: 0; }
/* every scale a square tile of the same size that fits the strip's height (they were taller than the strip,
   cut at the bottom, and its label covered the first one: the status line names the scales) */
#filmstrip [data-testid="block-label"] { display: none; }
#filmstrip .grid-wrap { padding: 4px !important; }
#filmstrip .grid-container { padding-top: 0 !important; height: 100% !important;
                             grid-template-rows: 100% !important; grid-auto-rows: 100% !important; }
#filmstrip .thumbnail-item { height: auto !important; width: 100% !important; max-height: 100%;
                             aspect-ratio: 1 / 1; align-self: center; justify-self: center; }
#filmstrip .caption-label { font-size: 10px; line-height: 1.2; padding: 0 3px; max-width: 100%; bottom: 0; right: 0; }
.upload-row { align-items: center; }
.upload-note p { margin: 0; }
.seg-legend span.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.25em 0 0.6em;
                          vertical-align: -0.1em; border: 1px solid #8886; border-radius: 2px; }
"""

# Runs before Gradio's own scripts: notes each pixi application (the image editors' canvases) as it starts,
# through pixi's devtools hook (kept working for a devtools extension that set it first), so that PAGE_JS can ask
# an editor where its brush accepts a press.
HEAD = """<script>
(() => { const apps = window.__varPixiApps = [], before = window.__PIXI_APP_INIT__;
  window.__PIXI_APP_INIT__ = function (app) {
    for (let i = apps.length - 1; i >= 0; i--) if (!apps[i].renderer) apps.splice(i, 1);  // destroyed ones go
    apps.push(app);
    if (typeof before === 'function') return before.apply(this, arguments);
  };
})();
</script>"""

# The page's own script (runs once on load):
# - a file dropped on an editor goes to that editor's upload button, whose handler checks and shows it
#   (the editors' own drop kept the old canvas and sent that);
# - Ctrl+Enter (Cmd+Enter) presses the run button of the tab in view, Escape presses Stop.
PAGE_JS = r"""
() => {
    const EDITORS = ['editor', 'guide', 'control-editor'];
    const editorOf = el => { for (const id of EDITORS) { const e = document.getElementById(id);
                                                      if (e && e.contains(el)) return id; } return null; };
    const hasFiles = ev => ev.dataTransfer && [...(ev.dataTransfer.types || [])].includes('Files');
    document.addEventListener('dragover', ev => {
        if (editorOf(ev.target) && hasFiles(ev)) { ev.preventDefault(); ev.stopPropagation(); }
    }, true);
    document.addEventListener('drop', ev => {
        const id = editorOf(ev.target);
        if (!id || !hasFiles(ev)) return;
        ev.preventDefault(); ev.stopPropagation();
        const button = document.getElementById(id + '-upload');  // Gradio puts its file input just before it
        const input = button && button.parentElement.querySelector('input[type=file]');
        if (!input) return;
        const dt = new DataTransfer(); dt.items.add(ev.dataTransfer.files[0]);
        input.files = dt.files;
        input.dispatchEvent(new Event('change', {bubbles: true}));
    }, true);
    const RUNS = ['generate-btn', 'inpaint-btn', 'control-inpaint-btn', 'outpaint-btn', 'guide-btn', 'control-btn',
                  'reroll-btn'];
    document.addEventListener('click', ev => {  // a run starts: the outputs column shows its top (the dock)
        if (RUNS.some(id => { const b = document.getElementById(id); return b && b.contains(ev.target); })) {
            const out = document.getElementById('outputs');
            if (out) out.scrollTo({top: 0});
        }
    }, true);
    document.addEventListener('keydown', ev => {
        if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
            const run = RUNS.map(id => document.getElementById(id)).find(b => b && b.offsetParent !== null);
            if (run) { ev.preventDefault(); run.click(); }
        } else if (ev.key === 'Escape') {
            const stop = document.getElementById('stop-btn');
            if (stop) stop.click();
        }
    }, true);  // (capture: an editor's canvas keeps its keys to itself)
    // Stop is red only while a run is on (the status line says so: queued, starting, a scale, stopping);
    // once it is done, stopped or failed it is a plain button again
    const RUNNING = /^(⏳|Stopping|(window \d+ · )?Scale \d+\/\d+)/;
    const running = () => { const s = document.getElementById('status');
                            return !!s && RUNNING.test((s.innerText || '').trim()); };
    // a stroke that starts beside the picture was dropped: the editor's brush starts a stroke only at a press
    // inside its picture's bounds (Gradio's BrushTool.on_pointer_down asks brush_cursor.is_over_image(), set
    // from image_container.getBounds() at each move). Such a press now starts its stroke where the pointer
    // crosses into those bounds, ON the edge (column 0 when it enters from the left), as if pressed there.
    // The bounds are the editor's own (its pixi application, noted by the HEAD script as it starts); without
    // them (another Gradio) nothing is done. (The canvas's CSS cursor is no guide: it changes ~20 picture
    // pixels in.)
    const gate = canvas => {
        const app = (window.__varPixiApps || []).find(a => a && a.canvas === canvas && a.stage);
        const images = app && app.stage.children.find(c => c.sortableChildren);  // Gradio's image_container
        if (!images) return null;
        const b = images.getBounds(), r = canvas.getBoundingClientRect();
        const k = r.width / (app.screen.width || r.width);  // CSS pixels per pixi screen pixel
        return {left: r.left + b.x * k, top: r.top + b.y * k, right: r.left + (b.x + b.width) * k,
                bottom: r.top + (b.y + b.height) * k};
    };
    const inside = (g, x, y) => x >= g.left && x <= g.right && y >= g.top && y <= g.bottom;
    const entry = (g, [x0, y0], [x1, y1]) => {  // where the segment from outside to inside crosses the bounds
        let t = 0;
        if (x0 < g.left) t = Math.max(t, (g.left - x0) / (x1 - x0));
        if (x0 > g.right) t = Math.max(t, (g.right - x0) / (x1 - x0));
        if (y0 < g.top) t = Math.max(t, (g.top - y0) / (y1 - y0));
        if (y0 > g.bottom) t = Math.max(t, (g.bottom - y0) / (y1 - y0));
        const x = x0 + (x1 - x0) * t, y = y0 + (y1 - y0) * t;
        return [Math.min(Math.max(x, g.left + 0.5), g.right - 0.5), Math.min(Math.max(y, g.top + 0.5), g.bottom - 0.5)];
    };
    let beside = null;  // a press the editor refused: {canvas, last: [x, y]}
    document.addEventListener('pointerdown', ev => {
        beside = null;
        if (!ev.isTrusted || ev.button !== 0 || ev.target.tagName !== 'CANVAS' || !editorOf(ev.target)) return;
        const g = gate(ev.target);
        if (g && !inside(g, ev.clientX, ev.clientY)) beside = {canvas: ev.target, last: [ev.clientX, ev.clientY]};
    }, true);
    document.addEventListener('pointermove', ev => {
        const press = beside;
        if (!press || !ev.isTrusted) return;
        if (!(ev.buttons & 1)) { beside = null; return; }
        const g = gate(press.canvas);
        if (!g) { beside = null; return; }
        if (!inside(g, ev.clientX, ev.clientY)) { press.last = [ev.clientX, ev.clientY]; return; }
        beside = null;
        const [x, y] = entry(g, press.last, [ev.clientX, ev.clientY]);
        const event = (type, cx, cy) => new PointerEvent(type, {
            bubbles: true, cancelable: true, composed: true, clientX: cx, clientY: cy, pointerId: ev.pointerId,
            pointerType: ev.pointerType, isPrimary: true, button: type === 'pointermove' ? -1 : 0,
            buttons: type === 'pointerup' ? 0 : 1});
        const at = releases;
        setTimeout(() => {  // after the editor has seen this move (the pointer is over its picture now)
            press.canvas.dispatchEvent(event('pointerdown', x, y));  // pressed on the edge ...
            press.canvas.dispatchEvent(event('pointermove', ev.clientX, ev.clientY));  // ... and drawn to here
            if (releases !== at) press.canvas.dispatchEvent(event('pointerup', ev.clientX, ev.clientY));  // (let go)
        }, 0);
    }, true);
    let releases = 0;
    document.addEventListener('pointerup', () => { beside = null; releases += 1; }, true);
    const mark = () => document.body.classList.toggle('var-running', running());
    new MutationObserver(mark).observe(document.body, {subtree: true, childList: true, characterData: true});
    mark();
}
"""


def patch_gradio() -> None:
    """Make an unchanged output cheap in streamed events (call once, before serving; idempotent).

    Gradio answers every output a handler leaves out of its dict (a skip) by building that component
    anew, and its config with it, JSON schemas included (pydantic: milliseconds each, three per
    component). A run event leaves out 3 to 5 of its outputs at every scale, so the schemas were most
    of an event's cost. A component's schema depends only on its data model: compute it once per model
    and give every new component a copy (what Gradio's own per-instance cache holds)."""
    component = gr.components.Component
    original = component.api_info
    if getattr(original, "schema_once", False):
        return

    @functools.lru_cache(maxsize=None)
    def schema(data_model) -> dict:
        out = data_model.model_json_schema()
        out["additional_description"] = out.pop("description", None)
        return out

    @functools.wraps(original)
    def api_info(self):
        if getattr(self, "_api_info_cache", None) is None and self.data_model is not None:
            self._api_info_cache = copy.deepcopy(schema(self.data_model))
        return original(self)

    api_info.schema_once = True
    component.api_info = api_info


def _errors_in_status(endpoint):
    """A failing run also says why in the status line (besides Gradio's pop-up and the API error);
    bad input (studio.params.UserError) becomes a gr.Error with its message."""

    @functools.wraps(endpoint)
    def run(self, *args, **kwargs):
        try:
            yield from endpoint(self, *args, **kwargs)
        except UserError as e:
            yield {self.w.status: f"⚠️ {e}"}
            raise gr.Error(str(e)) from e
        except gr.Error as e:
            yield {self.w.status: f"⚠️ {e.message}"}
            raise

    return run


def slider(cls: type, name: str, label: Optional[str] = None, **kwargs) -> gr.Slider:
    """A slider for a field of a studio.params dataclass: its bounds and default (unless given)."""
    default, bounds = P.spec(cls, name)
    kwargs.setdefault("value", default)
    kwargs.setdefault("maximum", bounds.maximum)
    return gr.Slider(bounds.minimum, step=bounds.step, label=label or bounds.words + bounds.note, **kwargs)


class Studio:
    """Between the widgets and the worker pool: check, submit, follow. No model code.

    `w` holds the page's widgets (build_ui sets it): handlers answer {widget: value}, and a widget
    left out keeps its value."""

    limits = Limits()  # the defaults, unless the studio is given its own (app.py's --max-* flags)

    def __init__(self, pool: WorkerPool, limits: Optional[Limits] = None):
        self.pool = pool
        self.limits = limits or Limits()
        self.models: Dict[str, ModelInfo] = dict(pool.models)
        self.default_model = next(iter(self.models))
        # this instance's own Gradio temp folder (uploads, previews, result copies): no other studio
        # serves or reads it, and it goes when the process exits (studio.serve.security)
        self.temp_dir = security.private_temp_dir()
        weakref.finalize(self, shutil.rmtree, str(self.temp_dir), True)
        # the previews are written outside it: Gradio serves its own copies, so a job may remove its files
        self.preview_dir = Path(tempfile.mkdtemp(prefix="var-studio-previews-"))
        weakref.finalize(self, shutil.rmtree, str(self.preview_dir), True)
        self._sessions: Dict[str, Set[Job]] = {}
        self._lock = threading.Lock()
        # per browser session, the huge uploads it downscaled on arrival: an edit of the downscaled picture
        # is pasted into the original at full resolution (studio.fullsize)
        self._originals: Dict[str, collections.deque] = {}
        self.w = SimpleNamespace()

    def uploaded(self, path, request: gr.Request = None):
        """An editor's upload (see _uploaded); a picture downscaled to the working size is kept whole: an
        in- or out-painting of it is pasted into it at full resolution."""
        value, note = _uploaded(self.limits, path)
        if isinstance(value, dict) and "background" in value:  # (not a skip: a picture arrived)
            picture = value["background"]
            with Image.open(path) as opened:
                size = opened.size  # (the header only)
            if size != picture.size:
                self.keep_original(request, path, size, picture)
                note += "; in-painting and out-painting paste their result into the original, full size"
        return value, note

    def info(self, model: Optional[str]) -> ModelInfo:
        if not model:
            return self.models[self.default_model]
        if model not in self.models:
            raise gr.Error(f"Unknown model {model!r}; choose one of: {', '.join(self.models)}")
        return self.models[model]

    # -- the run endpoints --------------------------------------------------------------------------
    @_errors_in_status
    def generate(self, model, class_name, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview,
                 history, prompt, negative_prompt, aspect_ratio, tau=None, request: gr.Request = None):
        info = self.info(model)
        values = dict(class_name=class_label(class_name, info),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview),
                      **text2img.text_values(info, prompt, negative_prompt, aspect_ratio, tau))
        yield from self._run("generate", model, values, history, request)

    @_errors_in_status
    def inpaint(self, model, image, mask, invert_mask, mask_blur, mask_grow, inpaint_area, padding, class_name, seed,
                guidance_scale, top_k, top_p, more_smooth, num_images, preview, history, prompt, negative_prompt,
                tau=None, request: gr.Request = None):
        info = self.info(model)
        text = text2img.text_values(info, prompt, negative_prompt, tau=tau)
        with self.limits.heavy(upload_pixels(image, mask)):  # decoded here: one of few big jobs at once
            sizes = {"image": upload_size(image)}
            self._checked("inpaint", sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images,
                                              preview), info, sizes)  # its cost, before decoding anything
            picture = editor_background(image)
            painted = editor_mask(image, mask, picture.size, bool(invert_mask))
            values = dict(image=png_bytes(picture), mask=png_bytes(painted), mask_blur=mask_blur,
                          mask_grow=mask_grow, inpaint_area=inpaint_area, padding=padding,
                          class_name=class_label(class_name, info), **text,
                          **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
            original = self.original_of(request, picture)
            del picture, painted
            yield from self._run("inpaint", model, values, history, request, sizes, original)

    @_errors_in_status
    def outpaint(self, model, image, left, right, top, bottom, mask_blur, class_name, seed, guidance_scale, top_k,
                 top_p, more_smooth, preview, history, prompt, negative_prompt, tau=None, request: gr.Request = None):
        info = self.info(model)
        text = text2img.text_values(info, prompt, negative_prompt, tau=tau)
        with self.limits.heavy(upload_pixels(image)):
            sides = dict(mask_blur=mask_blur, left=left, right=right, top=top, bottom=bottom)
            sizes = {"image": upload_size(image)}
            self._checked("outpaint", dict(sides, **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth,
                                                              1, preview)), info, sizes)  # windows, before decoding
            picture = editor_background(image)
            values = dict(image=png_bytes(picture), class_name=class_label(class_name, info),
                          **sides, **text,
                          **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, 1, preview))
            original = self.original_of(request, picture)
            del picture
            yield from self._run("outpaint", model, values, history, request, sizes, original)

    @_errors_in_status
    def guide(self, model, guide_image, keep_scales, class_name, seed, guidance_scale, top_k, top_p, more_smooth,
              num_images, preview, history, prompt, negative_prompt, tau=None, request: gr.Request = None):
        info = self.info(model)
        text = text2img.text_values(info, prompt, negative_prompt, tau=tau)
        with self.limits.heavy(upload_pixels(guide_image)):
            values = dict(image=png_bytes(editor_composite(guide_image)), keep_scales=keep_scales,
                          class_name=class_label(class_name, info), **text,
                          **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
            yield from self._run("guide", model, values, history, request)

    @_errors_in_status
    def control(self, model, image, control_type, preprocessor, canny_low, canny_high, control_strength,
                control_guidance_start, control_guidance_end, class_name, seed, guidance_scale, top_k, top_p,
                more_smooth, num_images, preview, history, type_guidance_scale=None, control_guidance_scale=None,
                request: gr.Request = None):
        info = self.info(model)
        with self.limits.heavy(upload_pixels(image)):
            values = dict(control_map_request(image, control_type, preprocessor, canny_low, canny_high),
                          control_strength=control_strength, control_guidance_start=control_guidance_start,
                          control_guidance_end=control_guidance_end, class_name=class_label(class_name, info),
                          **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
            if control_ui.is_controlvar(info):  # its type and map guidance (the adapters' sliders do not apply)
                values.update(type_guidance_scale=type_guidance_scale, control_guidance_scale=control_guidance_scale)
            yield from self._run("control", model, values, history, request)

    @_errors_in_status
    def control_inpaint(self, model, image, mask, invert_mask, mask_blur, mask_grow, inpaint_area, padding,
                        control_image, control_type, preprocessor, canny_low, canny_high, control_strength,
                        control_guidance_start, control_guidance_end, type_guidance_scale, control_guidance_scale,
                        class_name, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview, history,
                        request: gr.Request = None):
        """In-paint the Edit tab's picture under the Control tab's control (its map: the Control tab's picture,
        or the edited picture's own when that tab is empty; studio.serve.controls.inpaint_control)."""
        info = self.info(model)
        with self.limits.heavy(upload_pixels(image, mask, control_image)):
            sizes = {"image": upload_size(image)}
            edit = dict(mask_blur=mask_blur, mask_grow=mask_grow, inpaint_area=inpaint_area, padding=padding)
            self._checked("control_inpaint", dict(edit, **sampling(info, seed, guidance_scale, top_k, top_p,
                                                                   more_smooth, num_images, preview)), info, sizes)
            picture = editor_background(image)
            values = dict(edit, image=png_bytes(picture),
                          mask=png_bytes(editor_mask(image, mask, picture.size, bool(invert_mask))),
                          class_name=class_label(class_name, info),
                          **control_ui.inpaint_control(info, control_image, control_type, preprocessor, canny_low,
                                                       canny_high, control_strength, control_guidance_start,
                                                       control_guidance_end, type_guidance_scale,
                                                       control_guidance_scale),
                          **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
            del picture
            yield from self._run("control_inpaint", model, values, history, request, sizes)

    def preprocess(self, model, image, control_type, preprocessor, canny_low, canny_high):
        """The control map the worker extracts from the image (what /control would use), as a picture."""
        info = self.info(model)
        try:
            with self.limits.heavy(upload_pixels(image)):
                values = control_map_request(image, control_type, preprocessor, canny_low, canny_high)
                job = self._submit("preprocess", model, self._checked("preprocess", values, info))
                job.wait()
        except UserError as e:
            raise gr.Error(str(e)) from e
        view = job.view()
        if view.status != "done":
            raise gr.Error(view.error or f"the map could not be made ({view.status})")
        return Image.open(io.BytesIO(view.result.images[0]))

    @_errors_in_status
    def reroll(self, model, image, keep_scales, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview,
               history, prompt, negative_prompt, tau=None, request: gr.Request = None):
        """Text-to-image pictures re-roll with the prompt stored in them unless a prompt is given."""
        info = self.info(model)
        if not image:
            raise gr.Error("Select a result first (click one in Result or History), or drop a studio PNG there.")
        if (read_parameters_chunk(image) or {}).get("working_result"):  # (its header only: it may be huge)
            raise gr.Error("This is the full-size copy of an edit, which keeps no token pyramid: re-roll its "
                           f"working-size result ({read_parameters_chunk(image)['working_result']}, beside it in "
                           "Result and History).")
        values = dict(source_png=Path(image).read_bytes(), keep_scales=keep_scales,  # checked: an image, in bounds
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview),
                      **text2img.text_values(info, prompt, negative_prompt, tau=tau))
        yield from self._run("reroll", model, values, history, request)

    def stop(self, request: gr.Request) -> str:
        with self._lock:
            jobs = [j for j in self._sessions.get(_session(request), ()) if not j.finished]
        for job in jobs:
            job.cancel()
        # a queued job (or one at a scale's end) stops at once and its run says "Stopped": this answer, which
        # can arrive after that, must not put "Stopping…" back over it
        if not jobs or all(job.wait(1.0) for job in jobs):
            return gr.skip()
        return "Stopping…"

    # -- following a job ---------------------------------------------------------------------------------
    def _checked(self, kind: str, values: dict, info: ModelInfo, sizes: Optional[dict] = None) -> P.JobParams:
        """The form as the kind's typed parameters, checked (also against the model, and its cost against
        the limits: studio.serve.limits) before it is queued."""
        try:
            p = P.parse(kind, values)
            p.check_model(info.num_scales)
            P.check_conditioning(p, info.family)  # a prompt for a class-conditional model, a class for Infinity
            self.limits.check_job(kind, p, {k: v for k, v in (sizes or {}).items() if v})
        except UserError as e:
            raise gr.Error(str(e)) from e
        return p.with_seed() if isinstance(p, P.Sampling) else p  # the seed is known before the job runs

    def _run(self, kind: str, model, values: dict, history, request, sizes: Optional[dict] = None,
             original: Optional["Original"] = None):
        """Check the form, submit it and stream the job's state (preview, status, filmstrip, result,
        selected, history) until it ends. Outputs are saved by the worker before they arrive here. An edit
        of a huge upload's downscaled picture (`original`) is then pasted into the original, full size."""
        p = self._checked(kind, values, self.info(model), sizes)
        problem = folder_problem(self.pool.outputs)  # before the work, not after it
        if problem:
            raise gr.Error(f"Results cannot be saved right now ({problem}); nothing was started. "
                           "Tell the studio's operator.")
        session = _session(request)
        job = self._submit(kind, model, p, session)
        with self._lock:
            mine = self._sessions.setdefault(session, set())
            behind = len(mine)  # this tab's runs already queued or running: this one waits for them
            mine.add(job)
        folder = self.preview_dir / job.id
        folder.mkdir()
        try:
            strip_sent, shown, noted = -FILMSTRIP_INTERVAL, None, False
            for view in job.updates():
                if behind and view.status == "queued":  # the run in view keeps the status line
                    if not noted:
                        noted = True
                        yield {self.w.queue_note: f"⏳ Queued: {behind} run{'s' * (behind > 1)} of yours ahead; this "
                                                  f"{kind} starts when {'they end' if behind > 1 else 'it ends'}."}
                    continue
                if noted:
                    noted = False
                    yield {self.w.queue_note: ""}
                # a stale scale may be skipped, never the last one: it can arrive together with the result
                if not view.finished or (view.latest is not None and view.latest is not shown):
                    with_strip = time.monotonic() - strip_sent >= FILMSTRIP_INTERVAL
                    if with_strip and view.latest is not None:
                        strip_sent = time.monotonic()
                    shown = view.latest
                    yield self._progress(view, folder, with_strip)
            yield from self._finish(job.view(), folder, list(history or []), original, session, _user(request))
        finally:
            job.cancel()  # a closed tab or a cancelled event: the worker stops at the next scale
            with self._lock:
                self._sessions.get(session, set()).discard(job)
            shutil.rmtree(folder, ignore_errors=True)
            gradio_state.forget_orphans(getattr(request, "session_hash", None))  # Gradio's copies of skipped outputs

    def _submit(self, kind: str, model, p: P.JobParams, session: str = "") -> Job:
        try:  # sessions take turns in the pool's queue, each with a limit on waiting jobs
            return self.pool.submit(kind, p, model or self.default_model, session=session)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e))

    def _progress(self, view: JobView, folder: Path, with_strip: bool = True) -> dict:
        w = self.w
        if view.status == "queued":
            wait = f", about {view.wait_estimate:.0f} s to go" if view.wait_estimate is not None else ""
            return {w.status: (f"⏳ Waiting in the queue: position **{view.position}** ({self.pool.queue_length} "
                               f"waiting, {view.elapsed:.0f} s{wait})" if view.position else "⏳ Starting…")}
        if view.latest is None:
            return {w.status: "⏳ Running…"}
        u = view.latest
        where = f"window {u.window} · " if u.window else ""
        text = (f"{where}Scale **{u.scale_index + 1}/{u.num_scales}** · {text2img.scale_text(u)} tokens · "
                f"{u.seconds * 1000:.0f} ms (preview {u.preview_seconds * 1000:.0f} ms) · {view.elapsed:.1f} s")
        out = {w.status: text}
        if u.preview:
            out[w.preview] = self._preview_file(u, folder)
        strip = self._strip(view, folder) if with_strip else None
        if strip:
            out[w.filmstrip] = strip
        if view.canvas is not None:  # out-painting: the canvas so far goes to the result panel
            path = folder / f"canvas_{u.window}.jpg"
            if not path.exists():
                path.write_bytes(view.canvas)
            out[w.results] = [(str(path), "canvas so far")]
        return out

    @staticmethod
    def _preview_file(u, folder: Path) -> str:
        path = folder / f"w{u.window}_s{u.scale_index:02d}.jpg"
        if not path.exists():
            path.write_bytes(u.preview)
        return str(path)

    def _strip(self, view: JobView, folder: Path) -> list:
        return [(self._preview_file(u, folder), f"{u.scale_index + 1} · {text2img.scale_text(u)}")
                for u in view.scales if u.preview]  # previews off: no pictures, status only

    def _finish(self, view: JobView, folder: Path, history: List[str], original: Optional["Original"] = None,
                session: str = "", user: Optional[str] = None):
        w = self.w
        strip = self._strip(view, folder)
        out = {w.filmstrip: strip} if strip else {}
        if view.status == "cancelled":
            yield {**out, w.status: f"⏹ Stopped ({view.error or 'cancelled'})."}
            return
        if view.status == "failed":
            if out:  # (an empty dict would not be read as "no change" by Gradio)
                yield out
            raise gr.Error(view.error or "the job failed")
        res = view.result
        p0 = res.params[0]
        # an image that could not be saved is still shown (and can be downloaded) from the temp folder
        paths = [p or self._unsaved_file(res.job_id, i, data) for i, (p, data) in enumerate(zip(res.paths, res.images))]
        captions = [f"seed {p['seed']} · {text2img.caption(p)}" for p in res.params]
        full, full_note = [], ""
        if original is not None:  # each result pasted into the huge original: a step of its own, with its line
            for i, (path, data) in enumerate(zip(paths, res.images)):
                yield {**out, w.status: f"⏳ Pasting result {i + 1} of {len(paths)} into the {original.size[0]}×"
                                        f"{original.size[1]} original (full resolution)…"}
                try:
                    full.append(self._full_size(original, path, data, res.params[i], session))
                except SaveError as e:  # the outputs folder's trouble, in a user's words
                    full_note = f" · ⚠️ the full-size copy could not be saved ({e})"
                    break
                except (OSError, ValueError, KeyError) as e:  # the original gone, a result without its edit record
                    logging.getLogger(__name__).exception("full-size paste-back failed")
                    full_note = f" · ⚠️ the full-size copy could not be made ({type(e).__name__})"
                    break
            if full:
                full_note = (f" · full size {original.size[0]}×{original.size[1]}: `{_short(full[0][0])}`"
                             + (f" (+{len(full) - 1} more)" if len(full) > 1 else ""))
        history = (list(paths) + [h for h in history if h not in paths])[:HISTORY_SIZE]
        if user is not None:  # under --auth: these results are this user's (their history lists theirs alone)
            try:
                output_history.record_owner(self.pool.outputs, user, [p for p in res.paths if p] + [p for p, _ in full])
            except OSError:
                logging.getLogger(__name__).exception("the results' owner could not be noted")
        page = self.history_page(0, user=user)  # the outputs on disk, this run's first (its page line follows: .change)
        page.pop(w.history_label)
        seeds = (f"seed {p0['seed']}" if len({p['seed'] for p in res.params}) == 1 else
                 f"seeds {p0['seed']}–{res.params[-1]['seed']}")  # image i has seed + i
        if res.save_error:
            saved = sum(1 for p in res.paths if p)
            text = (f"⚠️ Done in {view.elapsed:.1f} s, but {len(paths) - saved} of {len(paths)} image(s) could not be "
                    f"saved ({res.save_error}): they are shown here only, download them now.")
        else:
            text = (f"✓ Done in {view.elapsed:.1f} s · {seeds} · {text2img.caption(p0)} · saved "
                    f"`{_short(paths[0])}`" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""))
        results = list(zip(paths, captions))  # a full-size copy is offered as a download (full_copy_of), not shown
        yield {**out, w.preview: paths[0], w.status: text + full_note, w.results: results,
               w.selected: paths[0], w.history_state: history, **page}

    # -- huge uploads: kept, and each edit of them pasted into them at full resolution ---------------------------
    def keep_original(self, request, path: str, size, picture: Image.Image) -> None:
        """Remember that `picture` (what the editor got) is the upload at `path` (of `size`) downscaled."""
        session = _session(request)
        with self._lock:
            kept = self._originals.setdefault(session, collections.deque(maxlen=ORIGINALS_PER_SESSION))
            kept.appendleft(Original(str(path), tuple(size), picture.size, fullsize.thumbnail(picture)))

    def original_of(self, request, picture: Image.Image) -> Optional["Original"]:
        """The huge upload of this session that `picture` (an editor's, as sent) is the downscaled copy of."""
        with self._lock:
            kept = list(self._originals.get(_session(request), ()))
        if not kept:
            return None
        candidates = [o for o in kept if o.working == picture.size]
        if not candidates:
            return None
        thumb = fullsize.thumbnail(picture)
        return next((o for o in candidates if fullsize.same_picture(o.thumb, thumb) and Path(o.path).is_file()), None)

    def forget_session(self, request: gr.Request = None) -> None:
        """A closed tab: its kept originals go (their files too: they are its uploads)."""
        with self._lock:
            kept = self._originals.pop(_session(request), ())
        for o in kept:
            if Path(o.path).resolve().is_relative_to(self.temp_dir):
                Path(o.path).unlink(missing_ok=True)

    def _full_size(self, original: "Original", path: str, data: bytes, params: dict, session: str):
        """One edit's result (PNG bytes at the working size) pasted into the original; saved beside it as
        `..._full_i.png` with its parameters. -> (its path, its size). The new picture becomes an original
        too: an edit of this result, sent to Edit, is pasted into the full-size copy."""
        working = Image.open(io.BytesIO(data))
        working.load()
        with Image.open(original.path) as opened:
            big = flatten(opened)
        if params.get("task") == "outpaint":
            out = fullsize.paste_outpaint(big, working, int(params.get("left", 0)), int(params.get("right", 0)),
                                          int(params.get("top", 0)), int(params.get("bottom", 0)), original.working)
        else:
            alpha = decode_array(read_png_extras(data)["edit"]["alpha"]).astype("float32") / 255.0
            out = fullsize.paste_inpaint(big, working, alpha)
        del big
        meta = dict(params, full_size=list(out.size), working_size=list(working.size),
                    working_result=Path(path).name, original_size=list(original.size))
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_CHUNK, json.dumps(meta, sort_keys=True))
        buf = io.BytesIO()
        out.save(buf, format="PNG", pnginfo=info, compress_level=3)  # no tokens: its working copy re-rolls
        stem = Path(path).stem
        folder = Path(path).parent if Path(path).resolve().is_relative_to(self.pool.outputs) else self.pool.outputs
        saved = save_png(folder, f"{stem}_full", buf.getvalue())  # SaveError says why in a user's words
        del buf
        with self._lock:
            kept = self._originals.setdefault(session, collections.deque(maxlen=ORIGINALS_PER_SESSION))
            kept.appendleft(Original(str(saved), out.size, working.size, fullsize.thumbnail(working)))
        return str(saved), out.size

    def history_page(self, index=0, request: gr.Request = None, user: Optional[str] = None) -> dict:
        """The History panel at page `index` of the outputs folder (newest first): the pictures with a
        caption each, the page line, the page number. Under --auth, of the signed-in user's results alone."""
        page = output_history.history_page(self.pool.outputs, index, user=user or _user(request))
        w = self.w
        return {w.history: [(p, output_history.caption(params, p)) for p, params in page.items],
                w.history_label: page.label, w.history_page: page.index}

    def _unsaved_file(self, job_id: str, index: int, data: bytes) -> str:
        folder = self.temp_dir / "unsaved"
        folder.mkdir(exist_ok=True)
        path = folder / f"{job_id}_{index}.png"
        path.write_bytes(data)
        return str(path)

    # -- small helpers for the wiring -----------------------------------------------------------------------
    def model_changed(self, model) -> dict:
        info, w = self.info(model), self.w
        S = info.num_scales
        return {w.gen_class: gr.update(choices=[RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS),
                w.edit_class: gr.update(choices=[NO_CLASS] + info.class_names, value=NO_CLASS),
                w.guide_class: gr.update(choices=[NO_CLASS] + info.class_names, value=NO_CLASS),
                w.control_class: gr.update(choices=[RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS),
                w.control_note: control_ui.note(info),
                w.keep_scales: gr.update(maximum=S, value=P.GuideParams().kept_scales(S)),
                w.reroll_keep: gr.update(maximum=S, value=P.RerollParams().kept_scales(S)),
                w.top_k: gr.update(maximum=info.vocab_size,
                                   value=min(model_defaults(info)["top_k"], info.vocab_size))}

    def model_and_family_changed(self, model) -> dict:
        """model_changed, and the prompts or the class pickers as the model's family takes them."""
        out = self.model_changed(model)
        for widget, update in text2img.family_updates(self.w, self.info(model)).items():
            out[widget] = {**out[widget], **update} if widget in out else update
        return out

    @staticmethod
    def parameters_of(path):
        if not path:
            return None
        try:
            params, tokens = read_png_info(Path(path).read_bytes())
        except (Exception, RecursionError) as e:  # a damaged chunk, JSON nested too deep, not an image
            return {"note": f"this image's studio parameters cannot be read ({type(e).__name__})"}
        if not isinstance(params, dict):
            return {"note": "this image's 'parameters' chunk is not the studio's"}
        return dict(params, tokens_stored=tokens is not None) if params else {"note": "no studio parameters"}

    def full_copy_of(self, path, request: gr.Request = None):
        """The download of the selected result's full-size copy (an edit of a huge upload pasted into the
        original): its size in words; hidden for any other picture. Under --auth, of the user's own alone."""
        full = output_history.full_copy(self.pool.outputs, Path(path).name, _user(request)) if path else None
        if full is None:
            return gr.File(value=None, visible=False)
        try:
            size = (read_parameters_chunk(full) or {}).get("full_size")  # the header alone (PIL's guard: no say)
            nbytes = os.stat(full).st_size
        except OSError:  # gone meanwhile
            return gr.File(value=None, visible=False)
        if not (isinstance(size, list) and len(size) == 2):
            return gr.File(value=None, visible=False)
        return gr.File(value=full, visible=True,
                       label=f"Full size {size[0]}×{size[1]} px · {_in_words(nbytes)} · the edit pasted into the "
                             f"original (shown above at working size)")

    def reuse_settings(self, path) -> dict:
        """The selected PNG's settings back on the page: the sampling settings and the image count
        always (the seed of its batch's first image: Generate makes the same batch again, this image
        included), the Control tab's own settings only when it was made under control. An image
        without studio parameters changes nothing and says so in the status line."""
        w = self.w
        params = self.parameters_of(path) or {}
        if "seed" not in params:
            why = ("Select a result first (click one in Result or History)." if not path else
                   "This picture has no studio parameters to reuse (it was not made by VAR Studio, or its "
                   "metadata was stripped): nothing was changed.")
            gr.Warning(why)
            return {w.status: f"⚠️ {why}"}
        name = params.get("class_name")
        # a class drawn at random was drawn from the image's generator: asking for it by name draws other tokens
        cls = (name if name in self.info(params.get("model")).class_names and not params.get("random_class")
               else RANDOM_CLASS)
        S, C, V = P.Sampling, P.ControlParams, P.VAR_DEFAULTS  # (a PNG without them: VAR's, as they were then)
        index = int(params.get("index_in_batch") or 0)
        count = int(params.get("num_images") or 1)
        first = int(params.get("batch_seed", params["seed"]))  # (older PNGs: every image said the batch's seed)
        out = {w.gen_class: cls, w.seed: first, w.num_images: count,
               w.guidance: params.get("guidance_scale", V["guidance_scale"]), w.top_k: params.get("top_k", V["top_k"]),
               w.top_p: params.get("top_p", V["top_p"]), w.more_smooth: bool(params.get("more_smooth", S.more_smooth))}
        out.update(text2img.reuse_updates(w, params))
        text = params.get("family") == "infinity"
        what = f"prompt “{text2img.caption(params)}”" if text else params.get("class_name") or "no class"
        if text and "batch_seed" not in params:  # an older Infinity PNG: one generator drew its whole batch
            out[w.status] = (f"♻️ Settings reused: seed {params['seed']}"
                             + (f", a batch of {count} (this image is number {index + 1})" if count > 1 else "")
                             + f", {what}.")
        elif count > 1:
            out[w.status] = (f"♻️ Settings of a batch of {count} (seeds {first}–{first + count - 1}); this image is "
                             f"number {index + 1}, seed {params['seed']}: set Seed {params['seed']} and 1 image "
                             "to make it alone" + (f"; {what}." if text else "."))
        else:
            out[w.status] = f"♻️ Settings reused: seed {params['seed']}, {what}."
        if "control_type" in params:
            ctype = params["control_type"]
            out.update({w.control_class: cls, w.control_type: ctype,
                        w.canny_low: params.get("canny_low", C.canny_low),
                        w.canny_high: params.get("canny_high", C.canny_high),
                        w.control_strength: params.get("control_strength", C.control_strength),
                        w.control_start: params.get("control_guidance_start", C.control_guidance_start),
                        w.control_end: params.get("control_guidance_end", C.control_guidance_end)})
            for name, slider_ in (("type_guidance_scale", w.type_guidance), ("control_guidance_scale", w.map_guidance)):
                if params.get(name) is not None:  # a ControlVAR result's guidance weights
                    out[slider_] = params[name]
            # a type set by the program fires no .input: its preprocessors come along here
            out[w.preprocessor], out[w.canny_row] = control_ui.type_changed(self.info(params.get("model")), ctype,
                                                                   params.get("preprocessor"))
        return out


@dataclass
class Original:
    """A huge upload, downscaled on arrival: its file (in the instance's private temp folder, or a full-size
    result in the outputs folder), its size, the size it was edited at, and that picture's thumbnail."""

    path: str
    size: tuple
    working: tuple
    thumb: object  # numpy (studio.fullsize.THUMB, THUMB, 3)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _user(request) -> Optional[str]:
    """The signed-in user under --auth; None without a login (a single-user studio: every result is theirs)."""
    name = getattr(request, "username", None)
    return str(name) if name else None


def _in_words(nbytes: int) -> str:
    """A file's size as people say it, as Gradio's file list beside it says it: 586.4 KB, 61.2 MB."""
    size, units = float(nbytes), ["B", "KB", "MB", "GB", "TB"]
    unit = 0
    while size > 1024 and unit < len(units) - 1:
        size /= 1024
        unit += 1
    return f"{nbytes} B" if unit == 0 else f"{size:.1f} {units[unit]}"


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


# ---------------------------------------------------------------------------------------------
# the page: build_ui lays it out top to bottom (one function per part) and wires it


def build_ui(studio: Studio) -> gr.Blocks:
    info = studio.info(None)
    w = studio.w
    with gr.Blocks(title="VAR Studio", delete_cache=(3600, security.FILE_LIFETIME_S)) as demo:
        w.history_state = gr.State([])
        gr.Markdown("## VAR Studio\nA VAR model paints coarse to fine: 1×1 tokens, then 2×2, 3×3 … up to "
                    f"{info.patch_nums[-1]}×{info.patch_nums[-1]}. Watch every scale arrive, stop it, "
                    "re-roll from any scale, repaint or extend an image.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):  # the inputs
                names = list(studio.models)
                w.model = gr.Dropdown(names, value=studio.default_model, label="Model", interactive=len(names) > 1)
                with gr.Tabs() as w.tabs:
                    _generate_tab(w, info)
                    _edit_tab(w, info)
                    _guide_tab(w, info)
                    _control_tab(w, info)
                _sampling_settings(w, info, studio.pool.preview)
            with gr.Column(scale=7, min_width=340, elem_id="outputs"):  # the outputs
                _outputs(w, info)
        text2img.apply_family(w, info)  # a text-to-image model: prompts in place of the classes
        _wire_runs(w, studio)
        _wire_helpers(w, studio, info, demo)
        readable_inputs({c for fn in demo.fns.values() for c in fn.inputs})
        api_model_defaults(demo, [w.guidance, w.top_k, w.top_p])  # left out by an API caller: the model's own
    return demo


def _generate_tab(w, info: ModelInfo) -> None:
    with gr.Tab("Generate", id="generate"):
        w.gen_class = gr.Dropdown([RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS, label="Class",
                                  allow_custom_value=True, elem_id="gen-class")
        text2img.generate_widgets(w, info)
        w.generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")


# The editors show a picture the page gives them as PNG (format="png"): Gradio's default, WebP at quality 80,
# was lossy, so an uploaded picture reached the model changed (mean error 16/255 on a noisy photo).


def _edit_tab(w, info: ModelInfo) -> None:
    with gr.Tab("Edit", id="edit"):
        w.edit_upload, w.edit_note = _upload_row("editor")
        w.editor = gr.ImageEditor(
            label="Image · paint over what to regenerate", type="pil", image_mode="RGBA", format="png",
            sources=(), transforms=(), layers=False, height=420,
            brush=gr.Brush(colors=[("#ff2d78", 0.7)], default_size=12, color_mode="fixed"),
            eraser=gr.Eraser(default_size=16), elem_id="editor")
        w.edit_class = gr.Dropdown([NO_CLASS] + info.class_names, value=NO_CLASS, allow_custom_value=True,
                                   label="Class", info="(none): repaint from the surroundings alone")
        text2img.edit_widgets(w, info)
        with gr.Accordion("In-paint (regenerate the painted area)", open=True):
            # "only the masked area" crops around the mask at the model's resolution: on a picture no larger
            # than the model it is the whole picture, so the choice is shown only for larger pictures
            with gr.Row(visible=False, elem_id="area-row") as w.area_row:
                w.inpaint_area = gr.Radio([("Only masked area", "masked"), ("Whole image", "whole")],
                                          value=P.InpaintParams.inpaint_area, label="In-paint area",
                                          info=f"the picture is larger than the model's {info.resolution} px: "
                                               "'only masked area' works on a crop around the mask at full detail")
                w.padding = slider(P.InpaintParams, "padding", info="context around the mask, 'only masked area'")
            with gr.Row():
                w.mask_blur = slider(P.InpaintParams, "mask_blur")
                w.mask_grow = slider(P.InpaintParams, "mask_grow")
                w.invert_mask = gr.Checkbox(False, label="Invert mask")
            with gr.Accordion("Upload a mask instead of painting", open=False):
                w.mask_upload = gr.Image(None, label="Mask · white = regenerate", type="pil", image_mode=None,
                                         sources=["upload", "clipboard"], height=140)
            w.inpaint_btn = gr.Button("In-paint", variant="primary", elem_id="inpaint-btn")
            w.control_inpaint_btn = gr.Button("In-paint under control", elem_id="control-inpaint-btn")
            gr.Markdown(control_ui.INPAINT_NOTE, elem_classes="upload-note")
        with gr.Accordion("Out-paint (extend the image)", open=False):
            with gr.Row():
                w.out_left = slider(P.OutpaintParams, "left")
                # the page suggests 64 px to the right; a job that adds nothing anywhere is refused
                w.out_right = slider(P.OutpaintParams, "right", value=64)
            with gr.Row():
                w.out_top = slider(P.OutpaintParams, "top")
                w.out_bottom = slider(P.OutpaintParams, "bottom")
            w.out_blur = slider(P.OutpaintParams, "mask_blur")
            w.outpaint_btn = gr.Button("Out-paint", variant="primary", elem_id="outpaint-btn")


def _guide_tab(w, info: ModelInfo) -> None:
    with gr.Tab("Guide", id="guide"):
        gr.Markdown("Paint a rough colour layout, or upload a picture. The model keeps the first "
                    "scales of its token pyramid (the layout) and paints the finer ones.")
        w.guide_upload, w.guide_note = _upload_row("guide")
        w.guide_editor = gr.ImageEditor(
            value=Image.new("RGB", (info.resolution,) * 2, "#cfd8df"), label="Guide image", format="png",
            type="pil", image_mode="RGB", sources=(), transforms=(), layers=False,
            height=360, brush=gr.Brush(colors=GUIDE_PALETTE, default_size=max(2, info.resolution // 12)),
            elem_id="guide")
        w.keep_scales = slider(P.GuideParams, "keep_scales", "Keep scales 1..k", maximum=info.num_scales,
                               value=P.GuideParams().kept_scales(info.num_scales),
                               info="more scales: closer to the guide")
        w.guide_class = gr.Dropdown([NO_CLASS] + info.class_names, value=NO_CLASS, label="Class",
                                    allow_custom_value=True)
        text2img.guide_widgets(w, info)
        w.guide_btn = gr.Button("Paint from guide", variant="primary", elem_id="guide-btn")


def _control_tab(w, info: ModelInfo) -> None:
    with gr.Tab("Control", id="control"):
        w.control_note = gr.Markdown(control_ui.note(info), elem_id="control-note")
        w.control_upload, w.control_upload_note = _upload_row("control-editor")
        # it opens empty with edges selected: upload a picture, or "New segmentation layout" to paint one
        w.control_editor = gr.ImageEditor(
            value=None, label="Control image · a picture, or a map", format="png",
            type="pil", image_mode="RGB", sources=(), transforms=(),
            layers=False, height=360, elem_id="control-editor",
            brush=gr.Brush(colors=SEG_BRUSH, default_size=max(2, info.resolution // 16), color_mode="fixed"))
        gr.HTML(seg_legend(), elem_classes="seg-legend", padding=False)
        default_type = control_ui.default_type(info)  # the types of the loaded model (studio.serve.controls)
        with gr.Row():
            w.control_type = gr.Radio(control_ui.type_choices(info), value=default_type, label="Control",
                                      elem_id="control-type")
            # every preprocessor is a valid input (API calls); the page offers those of the type
            w.preprocessor = gr.Radio([(v, k) for k, v in control_ui.PREPROCESSOR_LABELS.items()],
                                      value=control_ui.preprocessors(info, default_type)[0],
                                      label="Preprocessor", elem_id="preprocessor")
        with gr.Row(visible=default_type == "canny") as w.canny_row:
            w.canny_low = slider(P.ControlMapParams, "canny_low")
            w.canny_high = slider(P.ControlMapParams, "canny_high")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=120):
                w.map_btn = gr.Button("Preview map", size="sm", elem_id="map-btn")
                w.layout_btn = gr.Button("New segmentation layout", size="sm")
            w.control_map = gr.Image(None, label="Control map", format="png", interactive=False,
                                     height=180, scale=2, elem_id="control-map")
        with gr.Row(visible=not control_ui.is_controlvar(info)) as w.adapter_row:
            w.control_strength = slider(P.ControlParams, "control_strength",
                                        info="1 = as trained; depth: try 1.5-2")
            w.control_start = slider(P.ControlParams, "control_guidance_start", info="fraction of the scales")
            w.control_end = slider(P.ControlParams, "control_guidance_end")
        with gr.Row(visible=control_ui.is_controlvar(info), elem_id="controlvar-row") as w.controlvar_row:
            w.type_guidance = slider(P.ControlParams, "type_guidance_scale", "Type guidance", value=4.0,
                                     info="towards the condition type", elem_id="type-guidance")
            w.map_guidance = slider(P.ControlParams, "control_guidance_scale", "Map guidance", value=4.0,
                                    info="towards the map", elem_id="map-guidance")
        w.control_class = gr.Dropdown([RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS,
                                      label="Class", allow_custom_value=True)
        w.control_btn = gr.Button("Generate with control", variant="primary", elem_id="control-btn")


def _upload_row(editor_id: str):
    """An editor's own upload: a button (the page's script sends files dropped on the canvas to it too)
    and a line that says what arrived, or why it could not be read. The editors' built-in upload is
    off: it kept showing a picture while sending the canvas it replaced (issue 15)."""
    with gr.Row(equal_height=True, elem_classes="upload-row"):
        button = gr.UploadButton("Upload a picture…", type="filepath", file_count="single", size="sm", scale=0,
                                 min_width=170, elem_id=f"{editor_id}-upload")
        note = gr.Markdown("or drop one on the canvas", elem_id=f"{editor_id}-note", elem_classes="upload-note")
    return button, note


def _sampling_settings(w, info: ModelInfo, preview: str) -> None:
    S = P.Sampling
    with gr.Accordion("Sampling", open=True):
        with gr.Row():
            _, seed = P.spec(S, "seed")
            w.seed = gr.Number(S.seed, label=seed.words + seed.note, precision=0, scale=4)
            w.dice = gr.Button("Random", scale=1, min_width=70, size="sm", elem_id="dice")
            w.num_images = slider(S, "num_images", "Images", scale=4, elem_id="num-images")
        d = model_defaults(info)  # the first model's published settings (a model change sets its own)
        w.guidance = slider(S, "guidance_scale", "Guidance (classifier-free, ramped over the scales)",
                            value=d["guidance_scale"])
        with gr.Row():
            w.top_k = slider(S, "top_k", maximum=info.vocab_size, value=min(d["top_k"], info.vocab_size))
            w.top_p = slider(S, "top_p", value=d["top_p"])
        with gr.Row():
            w.more_smooth = gr.Checkbox(S.more_smooth, label="More smooth", info="soft codes: smoother images")
            w.preview_mode = gr.Radio([("Full decode", "full"), ("Fast (latent→RGB)", "fast"), ("Off", "none")],
                                      value=preview, label="Live preview")
        text2img.sampling_widgets(w, info)


def _outputs(w, info: ModelInfo) -> None:
    S = info.num_scales
    # the dock: what a run shows (status, Stop, live preview, every scale) stays in view while the page
    # scrolls to a run button (sticky beside the inputs; pinned to the bottom of a phone's screen). The
    # preview is at most twice the model's size: larger only magnifies its blur.
    with gr.Column(elem_id="dock"):
        with gr.Row(equal_height=True):
            w.status = gr.Markdown("Ready.", label="Status", elem_id="status")
            w.stop_btn = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="stop-btn")
        w.queue_note = gr.Markdown("", elem_id="queue-note")
        w.preview = gr.Image(None, label="Live preview", format="jpeg", interactive=False,
                             height=min(2 * info.resolution, 320), elem_id="preview", buttons=["download", "fullscreen"])
        # no buttons: the strip's download button sat over its last tile (a scale's picture is in the preview)
        w.filmstrip = gr.Gallery(label="Scales", columns=S, rows=1, height=76, object_fit="contain", buttons=[],
                                 allow_preview=False, format="jpeg", fit_columns=False, elem_id="filmstrip")
    w.results = gr.Gallery(label="Result", format="png", columns=4, height=220, object_fit="contain",
                           fit_columns=False, elem_id="results")
    # an edit of a huge upload: its result at working size above, its full-size copy here (a download)
    w.full_file = gr.File(None, label="Full size", visible=False, interactive=False, elem_id="full-file")
    with gr.Row(equal_height=False):
        w.selected = gr.Image(None, label="Selected", type="filepath", image_mode=None, format="png",
                              height=220, sources=["upload"], elem_id="selected", scale=2)
        with gr.Column(scale=3):
            w.reroll_keep = slider(P.RerollParams, "keep_scales", "Re-roll: keep scales 1..k", maximum=S,
                                   value=P.RerollParams().kept_scales(S),
                                   info="resample the finer scales with a new seed; click a scale above to pick k")
            w.reroll_seed = gr.Number(P.Sampling.seed, precision=0, visible=False)
            text2img.reroll_widgets(w)
            w.reroll_btn = gr.Button("Re-roll", variant="primary", elem_id="reroll-btn")
            with gr.Row():
                w.send_edit = gr.Button("Send to Edit", size="sm", elem_id="send-edit")
                w.send_guide = gr.Button("Send to Guide", size="sm", elem_id="send-guide")
                w.send_control = gr.Button("Send to Control", size="sm", elem_id="send-control")
                w.reuse = gr.Button("Reuse settings", size="sm", elem_id="reuse-btn")
    with gr.Accordion("Parameters stored in the selected PNG", open=False):
        w.params_view = gr.JSON(label="Parameters", elem_id="params-view")
    _history(w)


def _wire_runs(w, studio: Studio) -> None:
    """The run buttons: each a streamed, named API endpoint (docs/api.md)."""
    guard_uploads(studio.limits, image=w.editor, mask=w.mask_upload, guide_image=w.guide_editor,
                  control_image=w.control_editor, selected_image=w.selected)
    run_outputs = [w.preview, w.status, w.filmstrip, w.results, w.selected, w.history, w.history_state, w.queue_note,
                   w.history_page]
    sample = [w.seed, w.guidance, w.top_k, w.top_p, w.more_smooth]
    after = [w.preview_mode, w.history_state]
    # no limit of Gradio's own on job events: every job goes straight into the pool's fair queue, whose
    # position the page shows from the first moment (a Gradio queue would hold it without a word);
    # the pool limits each session's waiting jobs, and demo.queue(max_size) the events at once.
    # A second click during a run is queued (and says so), not dropped.
    run = dict(outputs=run_outputs, show_progress="hidden", concurrency_id="jobs", concurrency_limit=None,
               trigger_mode="multiple")
    text = [w.negative_prompt, w.tau]  # text-to-image models (studio.serve.ui_infinity); the prompt is the tab's
    w.generate_btn.click(studio.generate, [w.model, w.gen_class, *sample, w.num_images, *after, w.gen_prompt,
                                           w.negative_prompt, w.aspect_ratio, w.tau],
                         api_name="generate", **run)
    w.inpaint_btn.click(studio.inpaint, [w.model, w.editor, w.mask_upload, w.invert_mask, w.mask_blur, w.mask_grow,
                                         w.inpaint_area, w.padding, w.edit_class, *sample, w.num_images, *after,
                                         w.edit_prompt, *text],
                        api_name="inpaint", **run)
    w.outpaint_btn.click(studio.outpaint, [w.model, w.editor, w.out_left, w.out_right, w.out_top, w.out_bottom,
                                           w.out_blur, w.edit_class, *sample, *after, w.edit_prompt, *text],
                         api_name="outpaint", **run)
    w.guide_btn.click(studio.guide, [w.model, w.guide_editor, w.keep_scales, w.guide_class, *sample, w.num_images,
                                     *after, w.guide_prompt, *text], api_name="guide", **run)
    control_map_inputs = [w.control_editor, w.control_type, w.preprocessor, w.canny_low, w.canny_high]
    w.control_btn.click(studio.control, [w.model, *control_map_inputs, w.control_strength, w.control_start,
                                         w.control_end, w.control_class, *sample, w.num_images, *after,
                                         w.type_guidance, w.map_guidance], api_name="control", **run)
    w.control_inpaint_btn.click(studio.control_inpaint, [w.model, w.editor, w.mask_upload, w.invert_mask, w.mask_blur,
                                                         w.mask_grow, w.inpaint_area, w.padding, *control_map_inputs,
                                                         w.control_strength, w.control_start, w.control_end,
                                                         w.type_guidance, w.map_guidance, w.edit_class, *sample,
                                                         w.num_images, *after],
                                api_name="control_inpaint", **run)
    w.map_btn.click(studio.preprocess, [w.model, *control_map_inputs], w.control_map, api_name="preprocess",
                    concurrency_id="maps", concurrency_limit=4)
    w.reroll_btn.click(studio.reroll, [w.model, w.selected, w.reroll_keep, w.reroll_seed, w.guidance, w.top_k,
                                       w.top_p, w.more_smooth, w.num_images, *after, w.reroll_prompt,
                                       w.reroll_negative, w.reroll_tau], api_name="reroll", **run)
    w.stop_btn.click(studio.stop, None, w.status, api_name="stop", queue=False, show_progress="hidden")


def _wire_helpers(w, studio: Studio, info: ModelInfo, demo: gr.Blocks) -> None:
    """The page's own events (not API endpoints)."""
    private = dict(api_visibility="private", queue=False)
    w.dice.click(lambda: random.randrange(2 ** 31), None, w.seed, **private)
    model_outputs = [w.gen_class, w.edit_class, w.guide_class, w.control_class, w.control_note, w.keep_scales,
                     w.reroll_keep, w.top_k, *text2img.family_outputs(w)]
    w.model.change(studio.model_and_family_changed, w.model, model_outputs, api_visibility="private")
    type_changed = lambda model, ctype, pre=None: control_ui.type_changed(studio.info(model), ctype, pre)  # noqa: E731
    w.control_type.input(type_changed, [w.model, w.control_type], [w.preprocessor, w.canny_row], **private)
    demo.load(type_changed, [w.model, w.control_type, w.preprocessor], [w.preprocessor, w.canny_row], **private)
    w.model.change(lambda model: control_ui.model_changed(studio.info(model)), w.model,
                   [w.control_type, w.preprocessor, w.canny_row, w.adapter_row, w.controlvar_row], **private)
    w.layout_btn.click(lambda model: (blank_layout(studio.info(model).resolution), "segmentation",
                                      *control_ui.type_changed(studio.info(model), "segmentation",
                                                      control_ui.layout_preprocessor(studio.info(model)))),
                       w.model, [w.control_editor, w.control_type, w.preprocessor, w.canny_row], **private)
    w.filmstrip.select(_scale_picked, None, w.reroll_keep, **private)
    w.results.select(_selected_path, None, w.selected, **private)
    w.history.select(_selected_path, None, w.selected, **private)
    w.selected.change(studio.parameters_of, w.selected, w.params_view, **private)
    # (no spinner over the download: a look-up by name; a spinner left over it blocked a click under load)
    w.selected.change(studio.full_copy_of, w.selected, w.full_file, show_progress="hidden", **private)
    w.reuse.click(studio.reuse_settings, w.selected,
                  [w.gen_class, w.seed, w.num_images, w.guidance, w.top_k, w.top_p, w.more_smooth, w.status,
                   w.control_class, w.control_type, w.canny_low, w.canny_high, w.control_strength, w.control_start,
                   w.control_end, w.preprocessor, w.canny_row, w.type_guidance, w.map_guidance,
                   *text2img.reuse_outputs(w)], **private)
    area = functools.partial(_area_row, info.resolution)
    uploaded = studio.uploaded
    w.edit_upload.upload(uploaded, w.edit_upload, [w.editor, w.edit_note], **private).then(
        area, w.editor, w.area_row, **private)
    for button, editor, note in ((w.guide_upload, w.guide_editor, w.guide_note),
                                 (w.control_upload, w.control_editor, w.control_upload_note)):
        button.upload(uploaded, button, [editor, note], **private)
    for button, editor, tab in ((w.send_edit, w.editor, "edit"), (w.send_guide, w.guide_editor, "guide"),
                                (w.send_control, w.control_editor, "control")):
        sent = button.click(_to_editor, w.selected, editor, **private).then(_show_tab(tab), None, w.tabs, **private)
        if editor is w.editor:
            sent.then(area, w.editor, w.area_row, **private)
    _wire_history(w, studio, demo)
    demo.unload(studio.forget_session)  # a closed tab: the huge uploads it kept go


def _history(w) -> None:
    """The outputs folder, newest first, a page at a time (studio.serve.history): it survives a reload.
    A picture clicked here is the Selected one: its parameters below, and Re-roll, Send to Edit / Guide /
    Control and Reuse settings act on it."""
    w.history_page = gr.State(0)
    w.history = gr.Gallery(label="History (saved results)", columns=8, height=170, object_fit="contain",
                           format="png", fit_columns=False, allow_preview=False, elem_id="history")
    with gr.Row(equal_height=True, elem_id="history-pager"):
        w.history_newer = gr.Button("◀ Newer", size="sm", scale=0, min_width=90, elem_id="history-newer")
        w.history_label = gr.Markdown("", elem_id="history-label")
        w.history_older = gr.Button("Older ▶", size="sm", scale=0, min_width=90, elem_id="history-older")
        w.history_refresh = gr.Button("↻", size="sm", scale=0, min_width=40, elem_id="history-refresh")


def _wire_history(w, studio: Studio, demo: gr.Blocks) -> None:
    private = dict(api_visibility="private", queue=False)
    shown = [w.history, w.history_label, w.history_page]
    # (each with the request: under --auth a user's history holds their results alone)
    def first(request: gr.Request):
        return studio.history_page(0, request)

    def newer(i, request: gr.Request):
        return studio.history_page(i - 1, request)

    def older(i, request: gr.Request):
        return studio.history_page(i + 1, request)

    def label(i, request: gr.Request):  # a run shows page 1 (its results first): the page line follows
        return output_history.history_page(studio.pool.outputs, i, user=_user(request)).label

    demo.load(first, None, shown, **private)
    w.history_newer.click(newer, w.history_page, shown, **private)
    w.history_older.click(older, w.history_page, shown, **private)
    w.history_refresh.click(studio.history_page, w.history_page, shown, **private)
    w.history.change(label, w.history_page, w.history_label, **private)




def _uploaded(limits: Limits, path):
    """A file from an editor's upload button (or dropped on its canvas) -> the editor's picture and a line;
    it is checked from its header against the studio's limits before it is decoded, and a file that is
    not a picture (or over the limits) leaves the editor as it was and says why."""
    try:
        picture, line = read_upload(path, limits)
    except UserError as e:
        text = str(e)
        return gr.skip(), f"⚠️ {text[:1].upper()}{text[1:]}"
    return editor_value(picture), f"✓ {line}"


def _area_row(resolution: int, value):
    """The in-paint area choice, shown only when the Edit picture is larger than the model."""
    size = upload_size(value)  # from the header check: nothing decoded
    return gr.Row(visible=size is not None and max(size) > resolution)


def _scale_picked(evt: gr.SelectData):
    return evt.index + 1 if isinstance(evt.index, int) else gr.skip()


def _selected_path(evt: gr.SelectData):
    value = evt.value or {}
    image = value.get("image") if isinstance(value, dict) else None
    path = (image or {}).get("path") if isinstance(image, dict) else None
    return path or gr.skip()


def _show_tab(tab: str):
    return lambda: gr.Tabs(selected=tab)


def _to_editor(path):
    if not path:
        raise gr.Error("Select a result first.")
    return {"background": path, "layers": [], "composite": path}


def launch(demo: gr.Blocks, studio: Studio, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Start serving (loopback by default). The guards of studio.serve.security wrap Gradio's app: on
    loopback only Host: localhost is served, and the file route serves only this instance's images.
    Gradio refuses an upload over the byte limit before storing it (max_file_size). `auth` (a list of
    (user, password)) turns on Gradio's login."""
    demo.queue(max_size=64)
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                *security.middleware(host, studio.temp_dir)]
    # the outputs folder is "allowed" only so Gradio copies results into the temp folder; FileGuard
    # serves none of it directly
    return demo.launch(server_name=host, server_port=port, show_error=True,
                       allowed_paths=[str(studio.pool.outputs)], max_file_size=studio.limits.max_upload_bytes,
                       app_kwargs=app_kwargs, theme=gr.themes.Default(primary_hue="indigo"),
                       css=CSS, js=PAGE_JS, head=HEAD, footer_links=["api"], **kwargs)
