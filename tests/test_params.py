"""studio.params, the one definition of each job's parameters: what a user notices of it.

The page's sliders have the bounds and defaults the worker checks; a value over a bound is refused
with the parameter's name and bound; every job kind has its parameters, a handler in the runner and
an endpoint on the page."""
import dataclasses
import re
import types

import gradio as gr
import pytest

from studio import params as P
from studio.params import UserError


@pytest.fixture(scope="module")
def page():
    """The real page for a model with 6 scales and 64 tokens, without a worker pool."""
    from studio.serve.protocol import ModelInfo
    from studio.serve.ui import Studio, build_ui

    info = ModelInfo("m", "", [f"class {i}" for i in range(10)], 64, [1, 2, 3, 4, 6, 8], 64, ["canny"])
    studio = object.__new__(Studio)
    studio.models, studio.default_model, studio.w = {"m": info}, "m", types.SimpleNamespace()
    studio.pool = types.SimpleNamespace(preview="fast", devices=["cpu"])
    demo = build_ui(studio)
    return types.SimpleNamespace(studio=studio, demo=demo, w=studio.w, info=info)


SLIDERS = [  # (widget, dataclass, field, job kind, other values the field's maximum needs)
    ("num_images", P.Sampling, "num_images", "generate", {}),
    ("guidance", P.Sampling, "guidance_scale", "generate", {}),
    ("top_p", P.Sampling, "top_p", "generate", {}),
    ("mask_blur", P.InpaintParams, "mask_blur", "inpaint", {}),
    ("mask_grow", P.InpaintParams, "mask_grow", "inpaint", {}),
    ("padding", P.InpaintParams, "padding", "inpaint", {}),
    ("out_left", P.OutpaintParams, "left", "outpaint", {}),
    ("out_blur", P.OutpaintParams, "mask_blur", "outpaint", {"right": 8}),
    ("canny_low", P.ControlMapParams, "canny_low", "preprocess", {"canny_high": 500}),
    ("canny_high", P.ControlMapParams, "canny_high", "preprocess", {}),
    ("control_strength", P.ControlParams, "control_strength", "control", {}),
    ("control_start", P.ControlParams, "control_guidance_start", "control", {"control_guidance_end": 1.0,
                                                                             "control_guidance_start": 0.95}),
    ("control_end", P.ControlParams, "control_guidance_end", "control", {}),
]


@pytest.mark.parametrize("widget,cls,name,kind,others", SLIDERS)
def test_each_slider_has_the_bounds_and_default_the_worker_checks(page, widget, cls, name, kind, others):
    default, bounds = P.spec(cls, name)
    if name in P.MODEL_DEFAULTS:  # None in the dataclass: the model's own; the page shows its model's (VAR's)
        assert default is None
        default = P.VAR_DEFAULTS[name]
    slider = getattr(page.w, widget)
    assert (slider.minimum, slider.maximum, slider.value) == (bounds.minimum, bounds.maximum, default)
    job = {name: bounds.maximum, **others}
    if name != "control_guidance_start":
        P.parse(kind, job)  # the slider's end is a value the worker takes ...
    with pytest.raises(UserError, match=rf"\({name}\) must be"):
        P.parse(kind, {**job, name: bounds.maximum + 1})  # ... and one past it is refused, by name


def test_the_number_of_images_has_one_bound_on_the_page_in_the_worker_and_the_cli():
    default, bounds = P.spec(P.Sampling, "num_images")
    assert (default, bounds.minimum, bounds.maximum) == (1, 1, 8)
    with pytest.raises(UserError, match=r"Number of images \(num_images\) must be a whole number between 1 and 8, "
                                        r"got 9"):
        P.parse("generate", {"num_images": 9})
    from studio.generate import main

    assert main(["--num-images", "9"]) == 2  # refused before any model is loaded


def test_the_ui_refuses_a_form_over_a_bound_before_it_is_queued(page):
    with pytest.raises(gr.Error, match=r"num_images"):
        page.studio._checked("generate", dict(num_images=12), page.info)
    with pytest.raises(gr.Error, match=r"Keep scales \(keep_scales\) must be between 1 and 6 for this model"):
        page.studio._checked("guide", dict(image=b"png", keep_scales=7), page.info)
    p = page.studio._checked("generate", dict(seed=-1), page.info)
    assert p.seed >= 0  # a random seed is drawn before the job is queued, so the PNG can say it


def test_model_dependent_sliders_follow_the_model(page):
    w, S = page.w, page.info.num_scales
    assert (w.keep_scales.maximum, w.keep_scales.value) == (S, P.GuideParams().kept_scales(S))
    assert (w.reroll_keep.minimum, w.reroll_keep.maximum, w.reroll_keep.value) == (0, S, S // 2)
    assert (w.top_k.maximum, w.top_k.value) == (64, 64)  # the model's vocabulary: top-k off


def test_every_job_kind_has_parameters_a_handler_and_an_endpoint(page):
    from studio.serve.runner import HANDLERS

    assert set(HANDLERS) == set(P.JOBS)
    endpoints = {fn.api_name for fn in page.demo.fns.values() if fn.api_name}
    assert set(P.JOBS) <= endpoints


def test_bad_values_are_refused_naming_the_parameter():
    cases = {
        "Top-p (top_p) must be between 0 and 1 (0 = off), got 3": ("generate", {"top_p": 3.0}),
        "Guidance (guidance_scale) must be between 0 and 10": ("generate", {"guidance_scale": float("nan")}),
        "Seed (seed) must be a whole number between -1 and": ("generate", {"seed": -2}),
        "Top-k (top_k) must be a whole number, got 2.5": ("generate", {"top_k": 2.5}),
        "a generate job has no parameter 'steps'": ("generate", {"steps": 50}),
        "In-paint area (inpaint_area) must be one of 'masked', 'whole'": ("inpaint", {"inpaint_area": "all"}),
        "Choose how many pixels to add": ("outpaint", {}),
        "Control strength (control_strength) must be between 0 and 2": ("control", {"control_strength": 3}),
        "must start before it ends": ("control", {"control_guidance_start": 0.5, "control_guidance_end": 0.5}),
        "the depth control has preprocessors world, transformers, none, not 'canny'": (
            "preprocess", {"control_type": "depth", "preprocessor": "canny"}),
        "unknown job kind 'paint'": ("paint", {}),
    }
    for message, (kind, values) in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            P.parse(kind, values)


def test_a_dict_and_the_dataclass_are_the_same_job():
    as_dict = P.parse("control", {"control_type": "segmentation", "canny_low": 10, "seed": 3, "more_smooth": 1})
    typed = P.parse("control", P.ControlParams(control_type="segmentation", canny_low=10.0, seed=3, more_smooth=True))
    assert as_dict == typed and isinstance(as_dict.canny_low, float) and as_dict.more_smooth is True
    assert dataclasses.replace(typed, seed=-1).with_seed().seed >= 0


def test_classes_are_found_by_id_or_name_and_refused_with_the_near_names():
    names = ["alpine day", "alpine dusk", "volcanic"]
    assert P.find_class("Alpine Dusk", names) == 1 and P.find_class("2", names) == 2 and P.find_class(0, names) == 0
    with pytest.raises(UserError, match=r"unknown class name 'alpine'; did you mean 'alpine day', 'alpine dusk'"):
        P.find_class("alpine", names)
    with pytest.raises(UserError, match=r"class 3 is out of range: this model has classes 0..2"):
        P.find_class(3, names)


def test_the_sampling_defaults_are_the_pipelines_and_the_clis():
    import inspect

    from studio.pipeline import VARPipeline

    call = inspect.signature(VARPipeline.__call__).parameters
    for name in ("guidance_scale", "top_k"):
        assert call[name].default == P.VAR_DEFAULTS[name]
    assert call["top_p"].default is None  # the model's own (VARPipeline.default_sampling): VAR's or ControlVAR's
    assert call["more_smooth"].default == P.Sampling.more_smooth
    assert P.VAR_DEFAULTS == {"guidance_scale": 4.0, "top_k": 900, "top_p": 0.95}
    assert P.CONTROLVAR_DEFAULTS == {"guidance_scale": 4.0, "top_k": 900, "top_p": 0.96}


def test_importing_the_ui_changes_nothing_in_gradio():
    """The schema cache is installed by ui.patch_gradio() at start-up (app.py), not by an import."""
    import subprocess
    import sys

    check = ("import gradio as gr; import studio.serve.ui as ui; "
             "f = lambda: getattr(gr.components.Component.api_info, 'schema_once', False); "
             "before = f(); ui.patch_gradio(); print(before, f())")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_a_dataclass_built_in_python_is_checked_like_a_dict():
    with pytest.raises(UserError, match=r"Number of images \(num_images\) must be a whole number, got '3'"):
        P.parse("generate", P.GenerateParams(num_images="3"))
    with pytest.raises(UserError, match=r"Control strength \(control_strength\) must be a number, got None"):
        P.parse("control", P.ControlParams(control_strength=None))
    with pytest.raises(UserError, match=r"Guidance \(guidance_scale\) must be a number, got '4'"):
        P.parse("generate", P.GenerateParams(guidance_scale="4"))


def test_sampling_settings_left_out_are_the_models_own():
    """guidance_scale, top_k and top_p left out are None until the job is bound to its model: then the
    model's published settings (Infinity's from its ModelInfo.defaults, VAR's otherwise); given ones stay."""
    p = P.parse("generate", P.GenerateParams(prompt="a fox"))
    assert (p.guidance_scale, p.top_k, p.top_p) == (None, None, None)
    infinity = dict(guidance_scale=3.0, tau=0.5, top_k=2, top_p=0.97)
    bound = p.with_defaults(infinity)
    assert (bound.guidance_scale, bound.top_k, bound.top_p, bound.tau) == (3.0, 2, 0.97, None)  # tau: the model's
    assert p.with_defaults(None).sampling_kwargs() == dict(P.VAR_DEFAULTS, more_smooth=False)
    given = P.parse("generate", {"top_k": 5, "guidance_scale": 0.0}).with_defaults(infinity)
    assert (given.guidance_scale, given.top_k, given.top_p) == (0.0, 5, 0.97)


def test_the_api_docs_state_the_defaults_and_bounds_of_studio_params():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    default, b = P.spec(P.Sampling, "num_images")
    assert f"| `num_images` | `{default}` ({b.minimum:g}..{b.maximum:g}) |" in doc
    for name, more in (("guidance_scale", ""), ("top_p", f", ControlVAR `{P.CONTROLVAR_DEFAULTS['top_p']}`")):
        b = P.spec(P.Sampling, name)[1]
        assert (f"| `{name}` | the model's; VAR `{P.VAR_DEFAULTS[name]}`{more} ({b.minimum:g}..{b.maximum:g}) |"
                in doc), name
    assert f"| `top_k` | the model's; VAR `{P.VAR_DEFAULTS['top_k']}` (0..the vocabulary) |" in doc
    for cls, name, unit in ((P.InpaintParams, "mask_blur", " px"), (P.InpaintParams, "mask_grow", " px"),
                            (P.InpaintParams, "padding", " px"), (P.ControlParams, "control_strength", "")):
        default, b = P.spec(cls, name)
        assert f"`{name}={default}` ({b.minimum:g}..{b.maximum:g}{unit}" in doc, name


def test_an_unknown_class_of_a_small_model_lists_the_valid_names():
    names = ["alpine day", "alpine dusk", "volcanic"]
    with pytest.raises(UserError, match=r"This model's classes: alpine day, alpine dusk, volcanic \(or an id 0..2\)"):
        P.find_class("zebra", names)
