"""One typed definition of each job's parameters: defaults and bounds, written once.

    p = parse("generate", {"class_name": "volcano", "num_images": 2})   # -> GenerateParams, checked
    spec(Sampling, "num_images")     # (default 1, Bounds(1, 8, ...)): the UI's slider, the worker's check

Every job kind is a frozen dataclass here, registered in JOBS. Its fields carry their defaults and
bounds (`_number`, `_choice`); `check()` enforces them and the rules between fields, raising
UserError with the parameter's name and bound in a user's words. The UI builds its sliders from the
fields and checks a form before it queues it; the worker checks the job again (a program can call
the pool directly); the pipeline takes its defaults and its sampling checks from here, the CLI its
flags' defaults. Bounds that depend on the model (keep_scales up to its number of scales, top_k up
to its vocabulary, class names) are checked against the model by the worker and the UI
(`kept_scales`, `find_class`).

Plain Python: the UI process imports it and never imports torch.

Adding a job kind: its dataclass and a JOBS entry here, its handler in the runner's table
(studio.serve.runner.HANDLERS), its tab and endpoint in studio.serve.ui.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
import typing
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Type

# the preprocessors of each control type, the first being the default (studio.preprocess runs them)
PREPROCESSORS: Dict[str, Tuple[str, ...]] = {"canny": ("canny", "none"), "depth": ("world", "transformers", "none"),
                                             "segmentation": ("world", "transformers", "none")}
# the same for the published control weights (CAR adapters, ControlVAR models), which read a condition
# picture (studio.preprocess.picture_map): the authors' annotators, ControlVAR's entity layouts, or the
# picture as it is ("none")
PICTURE_PREPROCESSORS: Dict[str, Tuple[str, ...]] = {
    "canny": ("canny", "none"), "hed": ("hed", "none"), "sketch": ("sketch", "none"), "normal": ("normal", "none"),
    "depth": ("transformers", "none"), "segmentation": ("entities", "none")}
CONTROL_TYPES: Tuple[str, ...] = ("canny", "depth", "segmentation", "hed", "sketch", "normal")  # every family's


def control_preprocessors(control_type: str, pictures: bool = False) -> Tuple[str, ...]:
    """The preprocessors of a control type: an adapter's of ours (PREPROCESSORS), or, for a model
    whose controls read pictures (CAR, ControlVAR), PICTURE_PREPROCESSORS; the first is the default."""
    table = PICTURE_PREPROCESSORS if pictures or control_type not in PREPROCESSORS else PREPROCESSORS
    return table.get(control_type, ())


def _any_preprocessors() -> Dict[str, Tuple[str, ...]]:
    return {t: tuple(dict.fromkeys(PREPROCESSORS.get(t, ()) + PICTURE_PREPROCESSORS.get(t, ()))) for t in CONTROL_TYPES}
PREVIEW_MODES = ("full", "fast", "none")  # "none": no picture per scale (status only)
INPAINT_AREAS = ("masked", "whole")
MAX_SEED = 2 ** 63 - 1
MAX_PIXELS = 64_000_000  # the largest image (or out-painted canvas) a job may make or read
MAX_PROMPT = 2000  # characters; T5 reads at most 512 tokens of it
_ASPECT = re.compile(r"^\d+(\.\d+)?:\d+(\.\d+)?$")
# the aspect ratios of Infinity's official size table, as width:height (studio.infinity.RATIO_SCALES)
ASPECT_RATIOS = ("1:1", "5:4", "4:5", "4:3", "3:4", "3:2", "2:3", "7:4", "4:7", "2:1", "1:2", "5:2", "2:5",
                 "3:1", "1:3")
FAMILIES = ("var", "infinity")  # class-conditional next-scale models, text-to-image ones
# VAR's published sampling settings (its demo: cfg 4, top-k 900, top-p 0.95). A job that leaves one of these
# out (None) gets the published settings of the model it runs on (Sampling.with_defaults, where the worker
# binds the job to its model): these for a class-conditional model (top-k at most its vocabulary),
# Infinity's own (cfg 3, top-k 2, top-p 0.97) for a text-to-image one.
VAR_DEFAULTS = {"guidance_scale": 4.0, "top_k": 900, "top_p": 0.95}
# ControlVAR's published val runs (its sampler's defaults): cfg 4 (class, type and map), top_k 900, top_p 0.96
CONTROLVAR_DEFAULTS = {**VAR_DEFAULTS, "top_p": 0.96}
MODEL_DEFAULTS = tuple(VAR_DEFAULTS)  # the Sampling fields whose default is the model's own


def published_defaults(defaults: Optional[dict] = None) -> dict:
    """The MODEL_DEFAULTS settings of a model: `defaults`' (its published ones, ModelInfo.defaults), each
    one it lacks VAR's (VAR_DEFAULTS)."""
    given = defaults or {}
    return {name: given.get(name, VAR_DEFAULTS[name]) for name in MODEL_DEFAULTS}


class UserError(ValueError):
    """Bad input: the message is for the person (or program) who sent it and names the parameter.

    A ValueError, so API callers that catch ValueError keep working; the worker shows its message
    and treats every other exception as an internal error."""


@dataclass(frozen=True)
class Bounds:
    minimum: Optional[float]
    maximum: Optional[float]  # None: the model sets it (top_k <= vocabulary, keep_scales <= scales)
    words: str  # what a user calls the parameter
    integer: bool = False
    step: Optional[float] = None  # the slider's step
    note: str = ""  # e.g. " (0 = off)"

    def check(self, name: str, value) -> None:
        if value is None:
            return
        lo, hi = self.minimum, self.maximum
        if not ((lo is None or value >= lo) and (hi is None or value <= hi)):  # NaN fails here too
            whole = "a whole number " if self.integer else ""
            if lo is not None and hi is not None:
                rule = f"must be {whole}between {_num(lo)} and {_num(hi)}"
            elif lo is not None:
                rule = f"must be {whole}at least {_num(lo)}"
            else:
                rule = f"must be {whole}at most {_num(hi)}"
            raise UserError(f"{self.words} ({name}) {rule}{self.note}, got {_num(value)}")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _number(default, minimum, maximum, words, *, integer=False, step=None, note=""):
    return field(default=default, metadata={"bounds": Bounds(minimum, maximum, words, integer, step, note)})


def _choice(default, choices: Sequence[str], words: str):
    return field(default=default, metadata={"choices": tuple(choices), "words": words})


def spec(cls: type, name: str) -> tuple:
    """(default, Bounds) of a numeric field: what a slider and a check need."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default, f.metadata["bounds"]


@dataclass(frozen=True)
class JobParams:
    """The base of every job's parameters: `check()` enforces each field's bounds and choices;
    subclasses add their rules between fields (and call super().check())."""

    def check(self) -> "JobParams":
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _convert(_named(f), value, hints[f.name])  # its type: GenerateParams(num_images="3") is refused
            if "bounds" in f.metadata:
                f.metadata["bounds"].check(f.name, value)
            if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
                raise UserError(f"{f.metadata['words']} ({f.name}) must be one of "
                                f"{', '.join(map(repr, f.metadata['choices']))}, not {value!r}")
        return self

    def check_model(self, num_scales: int) -> None:
        """The bounds that depend on the model (its number of scales); none unless a kind has some."""


# ---------------------------------------------------------------------------------------------
# the pieces jobs share


@dataclass(frozen=True)
class Sampling(JobParams):
    """How every generating job samples (VARPipeline.__call__'s arguments). guidance_scale, top_k and
    top_p None (left out): the published settings of the model the job runs on (with_defaults)."""

    seed: int = _number(-1, -1, MAX_SEED, "Seed", integer=True, note=" (-1 = random)")
    guidance_scale: Optional[float] = _number(None, 0.0, 10.0, "Guidance", step=0.25)
    top_k: Optional[int] = _number(None, 0, None, "Top-k", integer=True, step=1, note=" (0 = off)")
    top_p: Optional[float] = _number(None, 0.0, 1.0, "Top-p", step=0.01, note=" (0 = off)")
    more_smooth: bool = False
    # 8: the slider's bound, and what a worker batches in one job without starving the queue
    num_images: int = _number(1, 1, 8, "Number of images", integer=True, step=1)
    preview: Optional[str] = _choice(None, PREVIEW_MODES, "Preview")  # None: the server's --preview
    # a class name or id; "": no class (Generate and Control: a random class per image; the edits:
    # unconditional, from the surroundings; Re-roll: the class stored in the PNG)
    class_name: str = ""
    # text-to-image models (Infinity): the prompt, a negative prompt, the picture's shape (width:height,
    # snapped to the nearest size of the official table; "": the model's square size) and the temperature
    # (None: the model's own). A class-conditional model refuses a prompt, Infinity refuses a class.
    prompt: str = ""
    negative_prompt: str = ""
    aspect_ratio: str = ""
    tau: Optional[float] = _number(None, 0.01, 5.0, "Temperature (tau)", step=0.05, note=" (empty = the model's)")

    def with_seed(self) -> "Sampling":
        """A copy with a concrete seed (-1 draws one), so the PNG can say which seed made it."""
        return self if self.seed >= 0 else dataclasses.replace(self, seed=random.randrange(2 ** 31))

    def with_defaults(self, defaults: Optional[dict] = None) -> "Sampling":
        """The job bound to its model: a copy whose guidance_scale, top_k and top_p left out (None) are
        `defaults`' (the model's published settings, ModelInfo.defaults), else VAR's (VAR_DEFAULTS).
        Values given stay as they are."""
        missing = {n: v for n, v in published_defaults(defaults).items() if getattr(self, n) is None}
        return dataclasses.replace(self, **missing) if missing else self

    def sampling_kwargs(self) -> dict:
        """The pipeline's sampling arguments (the generator is the caller's: it needs torch)."""
        return dict(guidance_scale=self.guidance_scale, top_k=self.top_k, top_p=self.top_p,
                    more_smooth=self.more_smooth)

    def check(self) -> "Sampling":
        super().check()
        if self.aspect_ratio and not _ASPECT.match(self.aspect_ratio.strip()):
            raise UserError(f"Aspect ratio (aspect_ratio) is width:height, e.g. 16:9 or 1:1, not {self.aspect_ratio!r}")
        if len(self.prompt) > MAX_PROMPT or len(self.negative_prompt) > MAX_PROMPT:
            raise UserError(f"a prompt (prompt, negative_prompt) may have at most {MAX_PROMPT} characters")
        return self

    def text_kwargs(self) -> dict:
        """A text-to-image pipeline's arguments (InfinityPipeline): prompt, negative prompt, temperature."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt or None, tau=self.tau)


@dataclass(frozen=True)
class ControlMapParams(JobParams):
    """A control map from the user's picture: the "preprocess" job (the map alone), and part of "control"."""

    image: Optional[bytes] = None
    control_type: str = _choice("canny", CONTROL_TYPES, "Control type")
    preprocessor: Optional[str] = None  # None: the model's default for the type (control_preprocessors)
    canny_low: float = _number(100.0, 0.0, 500.0, "Canny low threshold", step=1)
    canny_high: float = _number(200.0, 0.0, 500.0, "Canny high threshold", step=1)

    def check(self) -> "ControlMapParams":
        if self.control_type not in CONTROL_TYPES:
            raise UserError(f"unknown control type {self.control_type!r} (control_type): one of "
                            f"{', '.join(CONTROL_TYPES)}")
        super().check()
        options = _any_preprocessors()[self.control_type]  # the worker checks them against its model's family
        if self.preprocessor is not None and self.preprocessor not in options:
            raise UserError(f"the {self.control_type} control has preprocessors {', '.join(options)}, "
                            f"not {self.preprocessor!r} (preprocessor)")
        if self.preprocessor_or_default == "canny" and not self.canny_low <= self.canny_high:
            raise UserError(f"Canny thresholds need 0 ≤ low ≤ high (canny_low, canny_high), got {self.canny_low:g} "
                            f"and {self.canny_high:g}")
        return self

    @property
    def preprocessor_or_default(self) -> str:
        return self.preprocessor or control_preprocessors(self.control_type)[0]


# ---------------------------------------------------------------------------------------------
# the job kinds


@dataclass(frozen=True)
class GenerateParams(Sampling):
    pass  # the sampling settings and the class are all it takes


@dataclass(frozen=True)
class InpaintParams(Sampling):
    image: Optional[bytes] = None
    mask: Optional[bytes] = None  # white = regenerate; the image's size
    mask_blur: int = _number(4, 0, 64, "Mask blur (px)", integer=True, step=1)
    mask_grow: int = _number(0, -32, 32, "Mask grow (px)", integer=True, step=1)
    inpaint_area: str = _choice("masked", INPAINT_AREAS, "In-paint area")
    padding: int = _number(32, 0, 256, "Padding (px)", integer=True, step=4)


@dataclass(frozen=True)
class OutpaintParams(Sampling):
    image: Optional[bytes] = None
    left: int = _number(0, 0, 512, "Left (px)", integer=True, step=8)
    right: int = _number(0, 0, 512, "Right (px)", integer=True, step=8)
    top: int = _number(0, 0, 512, "Top (px)", integer=True, step=8)
    bottom: int = _number(0, 0, 512, "Bottom (px)", integer=True, step=8)
    mask_blur: int = _number(8, 0, 64, "Seam feather (px)", integer=True, step=1)

    def check(self) -> "OutpaintParams":
        super().check()
        if not any(self.sides.values()):
            raise UserError("Choose how many pixels to add on at least one side (left, right, top or bottom).")
        return self

    @property
    def sides(self) -> dict:
        return dict(left=self.left, right=self.right, top=self.top, bottom=self.bottom)


@dataclass(frozen=True)
class GuideParams(Sampling):
    image: Optional[bytes] = None  # a colour layout or a picture
    keep_scales: Optional[int] = _number(None, 1, None, "Keep scales", integer=True, step=1)  # None: 40% of them

    def kept_scales(self, num_scales: int) -> int:
        return kept_scales(self.keep_scales, max(1, round(num_scales * 0.4)), 1, num_scales)

    def check_model(self, num_scales: int) -> None:
        self.kept_scales(num_scales)


@dataclass(frozen=True)
class RerollParams(Sampling):
    source_png: Optional[bytes] = None  # a PNG the studio made (it holds the token pyramid)
    keep_scales: Optional[int] = _number(None, 0, None, "Re-roll: keep scales", integer=True, step=1)  # None: half

    def kept_scales(self, num_scales: int) -> int:
        return kept_scales(self.keep_scales, num_scales // 2, 0, num_scales)

    def check_model(self, num_scales: int) -> None:
        self.kept_scales(num_scales)


@dataclass(frozen=True)
class ControlParams(Sampling, ControlMapParams):
    control_strength: float = _number(1.0, 0.0, 2.0, "Control strength", step=0.05)
    control_guidance_start: float = _number(0.0, 0.0, 1.0, "Control from", step=0.05)
    control_guidance_end: float = _number(1.0, 0.0, 1.0, "Control until", step=0.05)
    # ControlVAR's second and third guidance weights (condition type, map); None: guidance_scale, as published
    type_guidance_scale: Optional[float] = _number(None, 0.0, 10.0, "Type guidance", step=0.25)
    control_guidance_scale: Optional[float] = _number(None, 0.0, 10.0, "Map guidance", step=0.25)

    def check(self) -> "ControlParams":
        super().check()
        if not self.control_guidance_start < self.control_guidance_end:
            raise UserError(f"The control must start before it ends (control_guidance_start < control_guidance_end, "
                            f"fractions of the scales), got {self.control_guidance_start:g} and "
                            f"{self.control_guidance_end:g}")
        return self


@dataclass(frozen=True)
class ControlInpaintParams(InpaintParams, ControlParams):
    """In-painting under control: `image` and `mask` as for "inpaint" (outside the mask the picture is
    kept exactly), the control as for "control" (type, preprocessor, strength and range, or ControlVAR's
    guidance). The map covers the whole picture and is made from `control_image`, or from `image` itself
    when it is None (the picture's own edges, depth ...)."""

    control_image: Optional[bytes] = None

    def map_params(self) -> ControlMapParams:
        """The control map's own request (the "preprocess" job's), from control_image or the picture."""
        return ControlMapParams(image=self.control_image or self.image, control_type=self.control_type,
                                preprocessor=self.preprocessor, canny_low=self.canny_low, canny_high=self.canny_high)


JOBS: Dict[str, Type[JobParams]] = {
    "generate": GenerateParams,
    "inpaint": InpaintParams,
    "outpaint": OutpaintParams,
    "guide": GuideParams,
    "reroll": RerollParams,
    "control": ControlParams,
    "control_inpaint": ControlInpaintParams,
    "preprocess": ControlMapParams,
}


# ---------------------------------------------------------------------------------------------
# from the wire, and the checks that need the model


def parse(kind: str, raw) -> JobParams:
    """A job's parameters, checked: its dataclass as it is, or a dict of its fields (values are
    converted to the fields' types; an unknown or unreadable one is a UserError naming it)."""
    if kind not in JOBS:
        raise UserError(f"unknown job kind {kind!r}; one of {', '.join(JOBS)}")
    cls = JOBS[kind]
    if isinstance(raw, cls):
        return raw.check()
    if not isinstance(raw, dict):
        raise TypeError(f"the parameters of a {kind} job are a {cls.__name__} or a dict, not {type(raw).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise UserError(f"a {kind} job has no parameter {', '.join(map(repr, unknown))}; it takes "
                        f"{', '.join(hints)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: _convert(_named(fields[k]), v, hints[k]) for k, v in raw.items()}).check()


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _named(f: dataclasses.Field) -> str:
    """How a message names a field: its words and its name, "Top-p (top_p)"."""
    words = f.metadata["bounds"].words if "bounds" in f.metadata else f.metadata.get("words")
    return f"{words} ({f.name})" if words else f.name


def _convert(name: str, value, hint):
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    try:
        if kind is bool and isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        if kind is int and isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value:
            return int(value)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is bytes and isinstance(value, (bytes, bytearray)):
            return bytes(value)
    except (OverflowError, ValueError):  # int(inf), int(nan)
        pass
    what = {bool: "true or false", int: "a whole number", float: "a number", str: "text", bytes: "a file's bytes"}
    shown = repr(value) if len(repr(value)) < 40 else type(value).__name__
    raise UserError(f"{name} must be {what.get(kind, kind)}, got {shown}")


def kept_scales(value: Optional[int], default: int, lowest: int, num_scales: int) -> int:
    """keep_scales for a model with `num_scales` scales (None: `default`), checked."""
    keep = default if value is None else value
    if not lowest <= keep <= num_scales:
        raise UserError(f"Keep scales (keep_scales) must be between {lowest} and {num_scales} for this model, "
                        f"got {keep}")
    return keep


def find_class(label, class_names: Sequence[str]) -> int:
    """A class id (int, or digits as text) or a class name (any case) -> its index; raises UserError
    naming the class (and the near names) when the model has no such class."""
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise UserError(f"a class is an id or a name, not {label!r}")
    text = label.strip() if isinstance(label, str) else str(label)
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(class_names):
            raise UserError(f"class {i} is out of range: this model has classes 0..{len(class_names) - 1}")
        return i
    key = text.lower()
    for i, name in enumerate(class_names):
        if name.lower() == key:
            return i
    close = [n for n in class_names if key and key in n.lower()][:5]
    if not close:
        import difflib

        close = difflib.get_close_matches(key, [n.lower() for n in class_names], n=5, cutoff=0.6)
        close = [n for n in class_names if n.lower() in close]
    if len(class_names) <= 30:  # a small model: every valid name fits in the message
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"unknown class name {text!r}{hint} This model's classes: {', '.join(class_names)} "
                        f"(or an id 0..{len(class_names) - 1})")
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
        f" (this model has {len(class_names)} classes: type part of a name to see them, or give an id "
        f"0..{len(class_names) - 1})")
    raise UserError(f"unknown class name {text!r}{hint}")


def check_conditioning(p: JobParams, family: str, class_name: str = "") -> None:
    """A prompt goes to a text-to-image model, a class to a class-conditional one: anything else is
    refused in words (the UI before queueing, the worker again for programs that call the pool)."""
    if not isinstance(p, Sampling):
        return
    cls = (class_name if class_name else p.class_name).strip()
    text = bool(p.prompt.strip() or p.negative_prompt.strip() or p.aspect_ratio.strip() or p.tau is not None)
    if family == "infinity":
        if cls:
            raise UserError(f"this model is text-to-image (Infinity): it has no classes; describe the picture in "
                            f"a prompt (prompt) instead of a class ({cls!r})")
    elif text:
        given = [n for n in ("prompt", "negative_prompt", "aspect_ratio", "tau") if
                 (getattr(p, n) is not None if n == "tau" else getattr(p, n).strip())]
        raise UserError(f"this model is class-conditional (no text encoder): it takes a class (class_name), not "
                        f"{', '.join(given)}; load an Infinity model for prompts")
