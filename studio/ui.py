"""VAR Studio in the browser: Gradio Blocks wired to the worker pool.

Read `build_ui` top to bottom: the left column holds the inputs (Generate / Edit / Guide / Control
tabs and the sampling settings), the right column the outputs (live preview, scale filmstrip,
result, re-roll, history). Every run button is also a named API endpoint (/generate, /inpaint,
/outpaint, /guide, /control, /reroll, /stop, and /preprocess for a control map alone; see
docs/api.md).

This module never imports torch or a model: `Studio` turns widget values into plain job
descriptions (numbers, strings, PNG bytes) for the worker pool and turns the pool's updates back
into widget values. Even a control map's preview is a worker job ("preprocess"): the depth and
segmentation preprocessors are networks.
"""
from __future__ import annotations

import copy
import functools
import io
import os
import random
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Set

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from studio.worker import Job, JobView, ModelInfo, WorkerPool, read_png_info  # noqa: E402
from studio.world import SEG_CLASSES, SEG_PALETTE  # noqa: E402  (numpy only, no torch)

RANDOM_CLASS = "(random)"  # Generate without a class: each image gets a random one
NO_CLASS = "(none)"  # Edit / Guide without a class: the unconditional model
HISTORY_SIZE = 64
# While a job streams, the preview goes out at every scale but the filmstrip at most this often (s): Gradio
# re-checks and re-copies every picture of a gallery each time it is sent. The last one is always complete.
FILMSTRIP_INTERVAL = 0.25
GUIDE_PALETTE = ["#8fc4ec", "#2f6fb0", "#f5f5f0", "#7d8c98", "#5a8f3c", "#2e5a27", "#c9b27c", "#8a5a3b",
                 "#e8853d", "#202830"]  # sky, water, snow/cloud, rock, grass, forest, sand, earth, sunset, night

# the same as studio.preprocess.PREPROCESSORS (that module imports torch; a test keeps them equal)
CONTROL_PREPROCESSORS = {"canny": ("canny", "none"), "depth": ("world", "transformers", "none"),
                         "segmentation": ("world", "transformers", "none")}
CONTROL_TYPES = [("Edges (canny)", "canny"), ("Depth", "depth"), ("Segmentation", "segmentation")]
PREPROCESSOR_LABELS = {"canny": "Canny edges", "world": "World net (in the model's bundle)",
                       "transformers": "Transformers (DPT / SegFormer, local cache)",
                       "none": "None: the image is the map"}
SEG_BRUSH = ["#%02x%02x%02x" % tuple(c) for c in SEG_PALETTE]  # paint a layout with the world's classes

CSS = """
#preview img { object-fit: contain; image-rendering: auto; }
#status { min-height: 2.2em; }
#dice { align-self: center; }
#status p { margin: 0.3em 0; }
#filmstrip .thumbnail-item { min-width: 56px; }
.seg-legend span.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.25em 0 0.6em;
                          vertical-align: -0.1em; border: 1px solid #8886; border-radius: 2px; }
"""


def _schemas_once_per_data_model() -> None:
    """Make gr.skip() cheap in streamed events. Gradio answers every skip of an output by building that
    component anew, and its config with it, JSON schemas included (pydantic: milliseconds each, three
    per component). A run event skips 3 to 5 of its outputs at every scale, so the schemas were most of
    an event's cost. A component's schema depends only on its data model: compute it once per model
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


_schemas_once_per_data_model()


def _errors_in_status(endpoint):
    """A failing run also says why in the status line (besides Gradio's pop-up and the API error)."""

    @functools.wraps(endpoint)
    def run(*args, **kwargs):
        try:
            yield from endpoint(*args, **kwargs)
        except gr.Error as e:
            yield (gr.skip(), f"⚠️ {e.message}", *[gr.skip()] * 5)
            raise

    return run


class Studio:
    """Between the widgets and the worker pool: validate, submit, follow. No model code."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.models: Dict[str, ModelInfo] = dict(pool.models)
        self.default_model = next(iter(self.models))
        self.preview_dir = Path(tempfile.mkdtemp(prefix="var-studio-previews-"))
        weakref.finalize(self, shutil.rmtree, str(self.preview_dir), True)
        self._sessions: Dict[str, Set[Job]] = {}
        self._lock = threading.Lock()

    def info(self, model: Optional[str]) -> ModelInfo:
        if not model:
            return self.models[self.default_model]
        if model not in self.models:
            raise gr.Error(f"Unknown model {model!r}; choose one of: {', '.join(self.models)}")
        return self.models[model]

    # -- the run endpoints --------------------------------------------------------------------------
    @_errors_in_status
    def generate(self, model, class_name, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview,
                 history, request: gr.Request):
        info = self.info(model)
        params = dict(class_name=class_label(class_name, info, RANDOM_CLASS),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
        yield from self._run("generate", model, params, history, request)

    @_errors_in_status
    def inpaint(self, model, image, mask, invert_mask, mask_blur, mask_grow, inpaint_area, padding, class_name, seed,
                guidance_scale, top_k, top_p, more_smooth, num_images, preview, history, request: gr.Request):
        info = self.info(model)
        picture = editor_background(image)
        painted = editor_mask(image, mask, picture.size, bool(invert_mask))
        params = dict(image=png_bytes(picture), mask=png_bytes(painted), mask_blur=int(mask_blur),
                      mask_grow=int(mask_grow), inpaint_area=inpaint_area, padding=int(padding),
                      class_name=class_label(class_name, info, NO_CLASS),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
        yield from self._run("inpaint", model, params, history, request)

    @_errors_in_status
    def outpaint(self, model, image, left, right, top, bottom, mask_blur, class_name, seed, guidance_scale, top_k,
                 top_p, more_smooth, preview, history, request: gr.Request):
        info = self.info(model)
        sides = dict(left=int(left), right=int(right), top=int(top), bottom=int(bottom))
        if min(sides.values()) < 0 or not any(sides.values()):
            raise gr.Error("Choose how many pixels to add on at least one side (left, right, top or bottom).")
        params = dict(image=png_bytes(editor_background(image)), mask_blur=int(mask_blur), **sides,
                      class_name=class_label(class_name, info, NO_CLASS),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, 1, preview))
        yield from self._run("outpaint", model, params, history, request)

    @_errors_in_status
    def guide(self, model, guide_image, keep_scales, class_name, seed, guidance_scale, top_k, top_p, more_smooth,
              num_images, preview, history, request: gr.Request):
        info = self.info(model)
        keep = int(keep_scales)
        if not 1 <= keep <= info.num_scales:
            raise gr.Error(f"Keep scales must be between 1 and {info.num_scales}.")
        params = dict(image=png_bytes(editor_composite(guide_image)), keep_scales=keep,
                      class_name=class_label(class_name, info, NO_CLASS),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
        yield from self._run("guide", model, params, history, request)

    @_errors_in_status
    def control(self, model, image, control_type, preprocessor, canny_low, canny_high, control_strength,
                control_guidance_start, control_guidance_end, class_name, seed, guidance_scale, top_k, top_p,
                more_smooth, num_images, preview, history, request: gr.Request):
        info = self.info(model)  # the sliders' bounds are checked by Gradio (strength 0..2, start and end 0..1)
        start, end = float(control_guidance_start), float(control_guidance_end)
        if not start < end:
            raise gr.Error(f"The control must start before it ends (a fraction of the scales); got from {start:g} "
                           f"until {end:g}.")
        params = dict(control_map_request(image, control_type, preprocessor, canny_low, canny_high),
                      control_strength=float(control_strength), control_guidance_start=start,
                      control_guidance_end=end,
                      class_name=class_label(class_name, info, RANDOM_CLASS),
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
        yield from self._run("control", model, params, history, request)

    def preprocess(self, model, image, control_type, preprocessor, canny_low, canny_high):
        """The control map the worker extracts from the image (what /control would use), as a picture."""
        self.info(model)
        job = self._submit("preprocess", model, control_map_request(image, control_type, preprocessor, canny_low,
                                                                    canny_high))
        job.wait()
        view = job.view()
        if view.status != "done":
            raise gr.Error(view.error or f"the map could not be made ({view.status})")
        return Image.open(io.BytesIO(view.result.images[0]))

    @_errors_in_status
    def reroll(self, model, image, keep_scales, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview,
               history, request: gr.Request):
        info = self.info(model)
        if not image:
            raise gr.Error("Select a result first (click one in Result or History), or drop a studio PNG there.")
        keep = int(keep_scales)
        if not 0 <= keep <= info.num_scales:
            raise gr.Error(f"Keep scales must be between 0 and {info.num_scales}.")
        params = dict(source_png=Path(image).read_bytes(), keep_scales=keep,
                      **sampling(info, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview))
        yield from self._run("reroll", model, params, history, request)

    def stop(self, request: gr.Request) -> str:
        with self._lock:
            jobs = list(self._sessions.get(_session(request), ()))
        for job in jobs:
            job.cancel()
        return "Stopping…" if jobs else gr.skip()

    # -- following a job ---------------------------------------------------------------------------------
    def _run(self, kind: str, model, params: dict, history, request):
        """Submit a job and stream its state as (preview, status, filmstrip, result, selected, history,
        history_state) until it ends. Outputs are saved by the worker before they arrive here."""
        job = self._submit(kind, model, params)
        session = _session(request)
        with self._lock:
            self._sessions.setdefault(session, set()).add(job)
        folder = self.preview_dir / job.id
        folder.mkdir()
        try:
            strip_sent, shown = -FILMSTRIP_INTERVAL, None
            for view in job.updates():
                # a stale scale may be skipped, never the last one: it can arrive together with the result
                if not view.finished or (view.latest is not None and view.latest is not shown):
                    with_strip = time.monotonic() - strip_sent >= FILMSTRIP_INTERVAL
                    if with_strip and view.latest is not None:
                        strip_sent = time.monotonic()
                    shown = view.latest
                    yield self._progress(view, folder, with_strip)
            yield from self._finish(job.view(), folder, list(history or []))
        finally:
            job.cancel()  # a closed tab or a cancelled event: the worker stops at the next scale
            with self._lock:
                self._sessions.get(session, set()).discard(job)
            shutil.rmtree(folder, ignore_errors=True)

    def _submit(self, kind: str, model, params: dict) -> Job:
        try:
            return self.pool.submit(kind, params, model or self.default_model)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e))

    def _progress(self, view: JobView, folder: Path, with_strip: bool = True):
        skip = gr.skip()
        if view.status == "queued":
            text = (f"⏳ Waiting in the queue: position **{view.position}** ({self.pool.queue_length} waiting, "
                    f"{view.elapsed:.0f} s)" if view.position else "⏳ Starting…")
            return skip, text, skip, skip, skip, skip, skip
        if view.latest is None:
            return skip, "⏳ Running…", skip, skip, skip, skip, skip
        strip = self._strip(view, folder) if with_strip else skip
        u = view.latest
        where = f"window {u.window} · " if u.window else ""
        text = (f"{where}Scale **{u.scale_index + 1}/{u.num_scales}** · {u.patch_num}×{u.patch_num} tokens · "
                f"{u.seconds * 1000:.0f} ms (preview {u.preview_seconds * 1000:.0f} ms) · {view.elapsed:.1f} s")
        canvas = skip
        if view.canvas is not None:  # out-painting: the canvas so far goes to the result panel
            path = folder / f"canvas_{u.window}.jpg"
            if not path.exists():
                path.write_bytes(view.canvas)
            canvas = [(str(path), "canvas so far")]
        return self._preview_file(u, folder) if u.preview else skip, text, strip, canvas, skip, skip, skip

    @staticmethod
    def _preview_file(u, folder: Path) -> str:
        path = folder / f"w{u.window}_s{u.scale_index:02d}.jpg"
        if not path.exists():
            path.write_bytes(u.preview)
        return str(path)

    def _strip(self, view: JobView, folder: Path):
        return [(self._preview_file(u, folder), f"{u.scale_index + 1} · {u.patch_num}×{u.patch_num}")
                for u in view.scales if u.preview] or gr.skip()  # previews off: no pictures, status only

    def _finish(self, view: JobView, folder: Path, history: List[str]):
        skip = gr.skip()
        strip = self._strip(view, folder)
        if view.status == "cancelled":
            yield skip, f"⏹ Stopped ({view.error or 'cancelled'}).", strip, skip, skip, skip, skip
            return
        if view.status == "failed":
            yield skip, skip, strip, skip, skip, skip, skip
            raise gr.Error(view.error or "the job failed")
        res = view.result
        p0 = res.params[0]
        captions = [f"seed {p['seed']} · {p.get('class_name', '')}" for p in res.params]
        history = (list(res.paths) + [h for h in history if h not in res.paths])[:HISTORY_SIZE]
        text = (f"✓ Done in {view.elapsed:.1f} s · seed {p0['seed']} · {p0.get('class_name', '')} · saved "
                f"`{_short(res.paths[0])}`" + (f" (+{len(res.paths) - 1} more)" if len(res.paths) > 1 else ""))
        yield (res.paths[0], text, strip, list(zip(res.paths, captions)), res.paths[0], history, history)

    # -- small helpers for the wiring -----------------------------------------------------------------------
    def model_changed(self, model):
        info = self.info(model)
        s = info.num_scales
        return (gr.update(choices=[RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS),
                gr.update(choices=[NO_CLASS] + info.class_names, value=NO_CLASS),
                gr.update(choices=[NO_CLASS] + info.class_names, value=NO_CLASS),
                gr.update(choices=[RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS),
                controls_note(info),
                gr.update(maximum=s, value=default_guide_scales(s)),
                gr.update(maximum=s - 1, value=s // 2),
                gr.update(maximum=info.vocab_size, value=min(900, info.vocab_size)))

    @staticmethod
    def parameters_of(path):
        if not path:
            return None
        try:
            params, tokens = read_png_info(Path(path).read_bytes())
        except Exception:
            return {"note": "no studio parameters in this image"}
        return dict(params, tokens_stored=tokens is not None) if params else {"note": "no studio parameters"}

    def reuse_settings(self, path):
        params = self.parameters_of(path) or {}
        if "seed" not in params:
            raise gr.Error("The selected image has no studio parameters to reuse.")
        name = params.get("class_name")
        cls = name if name in self.info(params.get("model")).class_names else RANDOM_CLASS
        shared = (cls, params["seed"], params.get("guidance_scale", 4.0), params.get("top_k", 900),
                  params.get("top_p", 0.95), bool(params.get("more_smooth", False)))
        if "control_type" not in params:  # the Control tab's own settings stay as they are
            return shared + (gr.skip(),) * 9
        ctype = params["control_type"]
        return shared + (cls, ctype, params.get("canny_low", 100.0), params.get("canny_high", 200.0),
                         params.get("control_strength", 1.0), params.get("control_guidance_start", 0.0),
                         params.get("control_guidance_end", 1.0),
                         # a type set by the program fires no .input: its preprocessors come along here
                         *_control_type_changed(ctype, params.get("preprocessor")))


# ---------------------------------------------------------------------------------------------
# input checks and conversions (plain Python + PIL)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def class_label(name, info: ModelInfo, none_label: str) -> str:
    """The dropdown's value -> a class name for the worker ('' = no class); ids are accepted too."""
    if name is None or str(name).strip() in ("", none_label, RANDOM_CLASS, NO_CLASS):
        return ""
    text = str(name).strip()
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(info.class_names):
            raise gr.Error(f"Unknown class {i}: this model has classes 0..{len(info.class_names) - 1}.")
        return info.class_names[i]
    for c in info.class_names:
        if c.lower() == text.lower():
            return c
    close = [c for c in info.class_names if text.lower() in c.lower()][:5]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise gr.Error(f"Unknown class {text!r}.{hint}")


def sampling(info: ModelInfo, seed, guidance_scale, top_k, top_p, more_smooth, num_images, preview) -> dict:
    seed = -1 if seed is None else int(seed)
    if seed < 0:
        seed = random.randrange(2 ** 31)
    if guidance_scale is None or not 0 <= float(guidance_scale) <= 100:
        raise gr.Error(f"Guidance must be between 0 and 100, got {guidance_scale}.")
    if top_k is None or int(top_k) != top_k or int(top_k) < 0:
        raise gr.Error(f"Top-k must be a whole number ≥ 0 (0 = off), got {top_k}.")
    if top_p is None or not 0 <= float(top_p) <= 1:
        raise gr.Error(f"Top-p must be between 0 and 1 (0 = off), got {top_p}.")
    if num_images is None or not 1 <= int(num_images) <= 16:
        raise gr.Error(f"Number of images must be between 1 and 16, got {num_images}.")
    if preview not in (None, "", "full", "fast", "none"):
        raise gr.Error(f"Preview must be 'full', 'fast' or 'none', got {preview!r}.")
    return dict(seed=seed, guidance_scale=float(guidance_scale), top_k=min(int(top_k), info.vocab_size),
                top_p=float(top_p), more_smooth=bool(more_smooth), num_images=int(num_images),
                preview=preview or None)


def default_guide_scales(num_scales: int) -> int:
    return max(1, round(num_scales * 0.4))


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
    how to read it. The worker checks everything again; checked here, a mistake does not wait in the queue."""
    if control_type not in CONTROL_PREPROCESSORS:
        raise gr.Error(f"Unknown control type {control_type!r}; choose one of: {', '.join(CONTROL_PREPROCESSORS)}.")
    choices = CONTROL_PREPROCESSORS[control_type]
    preprocessor = preprocessor or choices[0]
    if preprocessor not in choices:
        raise gr.Error(f"The {control_type} control has the preprocessors {', '.join(choices)}, "
                       f"not {preprocessor!r}.")
    low, high = (None if v is None else float(v) for v in (canny_low, canny_high))
    if preprocessor == "canny" and (low is None or high is None or not 0 <= low <= high):
        raise gr.Error(f"Canny thresholds need 0 ≤ low ≤ high, got {canny_low} and {canny_high}.")
    image = editor_composite(image, "Upload a picture or a map, or paint a segmentation layout, first.")
    return dict(image=png_bytes(image), control_type=control_type, preprocessor=preprocessor,
                **(dict(low=low, high=high) if preprocessor == "canny" else {}))


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


# ---------------------------------------------------------------------------------------------
# the page


def build_ui(studio: Studio) -> gr.Blocks:
    info = studio.info(None)
    S = info.num_scales
    names = list(studio.models)
    with gr.Blocks(title="VAR Studio", delete_cache=(3600, 86400)) as demo:
        history_state = gr.State([])
        gr.Markdown("## VAR Studio\nA VAR model paints coarse to fine: 1×1 tokens, then 2×2, 3×3 … up to "
                    f"{info.patch_nums[-1]}×{info.patch_nums[-1]}. Watch every scale arrive, stop it, "
                    "re-roll from any scale, repaint or extend an image.")
        with gr.Row(equal_height=False):
            # ---------------- inputs ----------------
            with gr.Column(scale=5, min_width=340):
                model = gr.Dropdown(names, value=studio.default_model, label="Model", interactive=len(names) > 1)
                with gr.Tabs() as tabs:
                    with gr.Tab("Generate", id="generate"):
                        gen_class = gr.Dropdown([RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS,
                                                label="Class", allow_custom_value=True, elem_id="gen-class")
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    with gr.Tab("Edit", id="edit"):
                        editor = gr.ImageEditor(
                            label="Image · paint over what to regenerate", type="pil", image_mode="RGBA",
                            sources=("upload", "clipboard"), transforms=(), layers=False, height=420,
                            brush=gr.Brush(colors=[("#ff2d78", 0.7)], default_size=12, color_mode="fixed"),
                            eraser=gr.Eraser(default_size=16), elem_id="editor")
                        edit_class = gr.Dropdown([NO_CLASS] + info.class_names, value=NO_CLASS, allow_custom_value=True,
                                                 label="Class", info="(none): repaint from the surroundings alone")
                        with gr.Accordion("In-paint (regenerate the painted area)", open=True):
                            with gr.Row():
                                inpaint_area = gr.Radio([("Only masked area", "masked"), ("Whole image", "whole")],
                                                        value="masked", label="In-paint area")
                                invert_mask = gr.Checkbox(False, label="Invert mask")
                            with gr.Row():
                                mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (px)")
                                mask_grow = gr.Slider(-32, 32, value=0, step=1, label="Mask grow (px)")
                                padding = gr.Slider(0, 256, value=32, step=4, label="Padding (px)",
                                                    info="context around the mask, 'only masked area'")
                            with gr.Accordion("Upload a mask instead of painting", open=False):
                                mask_upload = gr.Image(None, label="Mask · white = regenerate", type="pil",
                                                       image_mode=None, sources=["upload", "clipboard"], height=140)
                            inpaint_btn = gr.Button("In-paint", variant="primary", elem_id="inpaint-btn")
                        with gr.Accordion("Out-paint (extend the image)", open=False):
                            with gr.Row():
                                out_left = gr.Slider(0, 512, value=0, step=8, label="Left (px)")
                                out_right = gr.Slider(0, 512, value=64, step=8, label="Right (px)")
                            with gr.Row():
                                out_top = gr.Slider(0, 512, value=0, step=8, label="Top (px)")
                                out_bottom = gr.Slider(0, 512, value=0, step=8, label="Bottom (px)")
                            out_blur = gr.Slider(0, 64, value=8, step=1, label="Seam feather (px)")
                            outpaint_btn = gr.Button("Out-paint", variant="primary", elem_id="outpaint-btn")
                    with gr.Tab("Guide", id="guide"):
                        gr.Markdown("Paint a rough colour layout, or upload a picture. The model keeps the first "
                                    "scales of its token pyramid (the layout) and paints the finer ones.")
                        guide_editor = gr.ImageEditor(
                            value=Image.new("RGB", (info.resolution,) * 2, "#cfd8df"), label="Guide image",
                            type="pil", image_mode="RGB", sources=("upload", "clipboard"), transforms=(), layers=False,
                            height=360, brush=gr.Brush(colors=GUIDE_PALETTE, default_size="auto"), elem_id="guide")
                        keep_scales = gr.Slider(1, S, value=default_guide_scales(S), step=1, label="Keep scales 1..k",
                                                info="more scales: closer to the guide")
                        guide_class = gr.Dropdown([NO_CLASS] + info.class_names, value=NO_CLASS, label="Class",
                                                  allow_custom_value=True)
                        guide_btn = gr.Button("Paint from guide", variant="primary", elem_id="guide-btn")
                    with gr.Tab("Control", id="control"):
                        control_note = gr.Markdown(controls_note(info))
                        control_editor = gr.ImageEditor(
                            value=blank_layout(info.resolution), label="Control image · a picture, or a map",
                            type="pil", image_mode="RGB", sources=("upload", "clipboard"), transforms=(),
                            layers=False, height=360, elem_id="control-editor",
                            brush=gr.Brush(colors=SEG_BRUSH, default_size="auto", color_mode="fixed"))
                        gr.HTML(seg_legend(), elem_classes="seg-legend", padding=False)
                        default_type = info.controls[0] if info.controls else "canny"
                        with gr.Row():
                            control_type = gr.Radio(CONTROL_TYPES, value=default_type, label="Control")
                            # every preprocessor is a valid input (API calls); the page offers those of the type
                            preprocessor = gr.Radio([(v, k) for k, v in PREPROCESSOR_LABELS.items()],
                                                    value=CONTROL_PREPROCESSORS[default_type][0],
                                                    label="Preprocessor", elem_id="preprocessor")
                        with gr.Row(visible=default_type == "canny") as canny_row:
                            canny_low = gr.Slider(0, 500, value=100, step=1, label="Canny low threshold")
                            canny_high = gr.Slider(0, 500, value=200, step=1, label="Canny high threshold")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=1, min_width=120):
                                map_btn = gr.Button("Preview map", size="sm", elem_id="map-btn")
                                layout_btn = gr.Button("New segmentation layout", size="sm")
                            control_map = gr.Image(None, label="Control map", format="png", interactive=False,
                                                   height=180, scale=2, elem_id="control-map")
                        with gr.Row():
                            control_strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Control strength",
                                                         info="1 = as trained; depth: try 1.5-2")
                            control_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Control from",
                                                      info="fraction of the scales")
                            control_end = gr.Slider(0, 1, value=1.0, step=0.05, label="Control until")
                        control_class = gr.Dropdown([RANDOM_CLASS] + info.class_names, value=RANDOM_CLASS,
                                                    label="Class", allow_custom_value=True)
                        control_btn = gr.Button("Generate with control", variant="primary", elem_id="control-btn")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, scale=4)
                        dice = gr.Button("Random", scale=1, min_width=70, size="sm", elem_id="dice")
                        num_images = gr.Slider(1, 8, value=1, step=1, label="Images", scale=4)
                    guidance = gr.Slider(0, 10, value=4.0, step=0.25, label="Guidance (classifier-free, ramped over "
                                         "the scales)")
                    with gr.Row():
                        top_k = gr.Slider(0, info.vocab_size, value=min(900, info.vocab_size), step=1,
                                          label="Top-k (0 = off)")
                        top_p = gr.Slider(0, 1, value=0.95, step=0.01, label="Top-p (0 = off)")
                    with gr.Row():
                        more_smooth = gr.Checkbox(False, label="More smooth", info="soft codes: smoother images")
                        preview_mode = gr.Radio([("Full decode", "full"), ("Fast (latent→RGB)", "fast"),
                                                 ("Off", "none")], value=studio.pool.preview, label="Live preview")
            # ---------------- outputs ----------------
            with gr.Column(scale=7, min_width=400):
                preview = gr.Image(None, label="Live preview", format="jpeg", interactive=False, height=460,
                                   elem_id="preview", buttons=["download", "fullscreen"])
                with gr.Row(equal_height=True):
                    status = gr.Markdown("Ready.", label="Status", elem_id="status")
                    stop_btn = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="stop-btn")
                filmstrip = gr.Gallery(label="Scales", columns=S, rows=1, height=120, object_fit="contain",
                                       allow_preview=False, format="jpeg", fit_columns=False, elem_id="filmstrip")
                results = gr.Gallery(label="Result", format="png", columns=4, height=220, object_fit="contain",
                                     fit_columns=False, elem_id="results")
                with gr.Row(equal_height=False):
                    selected = gr.Image(None, label="Selected", type="filepath", image_mode=None, format="png",
                                        height=220, sources=["upload"], elem_id="selected", scale=2)
                    with gr.Column(scale=3):
                        reroll_keep = gr.Slider(0, S - 1, value=S // 2, step=1, label="Re-roll: keep scales 1..k",
                                                info="resample the finer scales with a new seed; "
                                                     "click a scale above to pick k")
                        reroll_seed = gr.Number(-1, precision=0, visible=False)
                        reroll_btn = gr.Button("Re-roll", variant="primary", elem_id="reroll-btn")
                        with gr.Row():
                            send_edit = gr.Button("Send to Edit", size="sm", elem_id="send-edit")
                            send_guide = gr.Button("Send to Guide", size="sm")
                            send_control = gr.Button("Send to Control", size="sm", elem_id="send-control")
                            reuse = gr.Button("Reuse settings", size="sm")
                with gr.Accordion("Parameters stored in the selected PNG", open=False):
                    params_view = gr.JSON(label="Parameters")
                history = gr.Gallery(label="History", columns=8, height=170, object_fit="contain", format="png",
                                     fit_columns=False, elem_id="history")

        # ---------------- wiring ----------------
        readable_upload_errors(image=editor, mask=mask_upload, guide_image=guide_editor, control_image=control_editor,
                               selected_image=selected)
        run_outputs = [preview, status, filmstrip, results, selected, history, history_state]
        sample = [seed, guidance, top_k, top_p, more_smooth]
        run = dict(outputs=run_outputs, show_progress="hidden", concurrency_id="jobs",
                   concurrency_limit=8 * len(studio.pool.devices))
        generate_btn.click(studio.generate, [model, gen_class, *sample, num_images, preview_mode, history_state],
                           api_name="generate", **run)
        inpaint_btn.click(studio.inpaint, [model, editor, mask_upload, invert_mask, mask_blur, mask_grow, inpaint_area,
                                           padding, edit_class, *sample, num_images, preview_mode, history_state],
                          api_name="inpaint", **run)
        outpaint_btn.click(studio.outpaint, [model, editor, out_left, out_right, out_top, out_bottom, out_blur,
                                             edit_class, *sample, preview_mode, history_state],
                           api_name="outpaint", **run)
        guide_btn.click(studio.guide, [model, guide_editor, keep_scales, guide_class, *sample, num_images,
                                       preview_mode, history_state], api_name="guide", **run)
        control_map_inputs = [control_editor, control_type, preprocessor, canny_low, canny_high]
        control_btn.click(studio.control, [model, *control_map_inputs, control_strength, control_start, control_end,
                                           control_class, *sample, num_images, preview_mode, history_state],
                          api_name="control", **run)
        map_btn.click(studio.preprocess, [model, *control_map_inputs], control_map, api_name="preprocess",
                      concurrency_id="maps", concurrency_limit=4)
        reroll_btn.click(studio.reroll, [model, selected, reroll_keep, reroll_seed, guidance, top_k, top_p,
                                         more_smooth, num_images, preview_mode, history_state],
                         api_name="reroll", **run)
        stop_btn.click(studio.stop, None, status, api_name="stop", queue=False, show_progress="hidden")

        dice.click(lambda: random.randrange(2 ** 31), None, seed, queue=False, api_visibility="private")
        model.change(studio.model_changed, model, [gen_class, edit_class, guide_class, control_class, control_note,
                                                    keep_scales, reroll_keep, top_k], api_visibility="private")
        control_type.input(_control_type_changed, control_type, [preprocessor, canny_row], api_visibility="private",
                           queue=False)
        demo.load(_control_type_changed, [control_type, preprocessor], [preprocessor, canny_row],
                  api_visibility="private", queue=False)
        layout_btn.click(lambda: (blank_layout(info.resolution), "segmentation",
                                  *_control_type_changed("segmentation", "none")),
                         None, [control_editor, control_type, preprocessor, canny_row], api_visibility="private",
                         queue=False)
        filmstrip.select(_scale_picked, None, reroll_keep, api_visibility="private", queue=False)
        results.select(_selected_path, None, selected, api_visibility="private", queue=False)
        history.select(_selected_path, None, selected, api_visibility="private", queue=False)
        selected.change(studio.parameters_of, selected, params_view, api_visibility="private", queue=False)
        reuse.click(studio.reuse_settings, selected, [gen_class, seed, guidance, top_k, top_p, more_smooth,
                                                      control_class, control_type, canny_low, canny_high,
                                                      control_strength, control_start, control_end,
                                                      preprocessor, canny_row],
                    api_visibility="private", queue=False)
        send_edit.click(_to_editor, selected, editor, api_visibility="private", queue=False).then(
            lambda: gr.Tabs(selected="edit"), None, tabs, api_visibility="private", queue=False)
        send_guide.click(_to_editor, selected, guide_editor, api_visibility="private", queue=False).then(
            lambda: gr.Tabs(selected="guide"), None, tabs, api_visibility="private", queue=False)
        send_control.click(_to_editor, selected, control_editor, api_visibility="private", queue=False).then(
            lambda: gr.Tabs(selected="control"), None, tabs, api_visibility="private", queue=False)
    return demo


def preprocessor_choices(control_type: str) -> list:
    return [(PREPROCESSOR_LABELS[c], c) for c in CONTROL_PREPROCESSORS[control_type]]


def _control_type_changed(control_type, preprocessor=None):
    """The preprocessors of a control type (the first chosen unless told) and the canny thresholds' visibility."""
    return (gr.Radio(choices=preprocessor_choices(control_type),
                     value=preprocessor or CONTROL_PREPROCESSORS[control_type][0]),
            gr.Row(visible=control_type == "canny"))


def _scale_picked(evt: gr.SelectData):
    return evt.index + 1 if isinstance(evt.index, int) else gr.skip()


def _selected_path(evt: gr.SelectData):
    value = evt.value or {}
    image = value.get("image") if isinstance(value, dict) else None
    path = (image or {}).get("path") if isinstance(image, dict) else None
    return path or gr.skip()


def _to_editor(path):
    if not path:
        raise gr.Error("Select a result first.")
    return {"background": path, "layers": [], "composite": path}


def launch(demo: gr.Blocks, studio: Studio, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Start serving (loopback by default); outputs are served only from the outputs folder."""
    demo.queue(max_size=64)
    return demo.launch(server_name=host, server_port=port, show_error=True,
                       allowed_paths=[str(studio.pool.outputs)], theme=gr.themes.Default(primary_hue="indigo"),
                       css=CSS, footer_links=["api"], **kwargs)
