"""'Reuse settings' on a selected result: the Generate settings always, the Control tab's own
settings (type, thresholds, strength, scale range) only when the image was made under control."""
import types

import gradio as gr
import pytest
from PIL import Image

from studio.pngmeta import encode_png
from studio.serve.ui import RANDOM_CLASS, Studio

SHARED = ["gen_class", "seed", "guidance", "top_k", "top_p", "more_smooth"]  # the Generate / Sampling widgets
CONTROL = ["control_class", "control_type", "canny_low", "canny_high", "control_strength", "control_start",
           "control_end", "preprocessor", "canny_row"]  # the Control tab's own


@pytest.fixture
def studio():
    s = object.__new__(Studio)  # no worker pool: reuse_settings only reads the PNG and the model's classes
    s.info = lambda model: types.SimpleNamespace(class_names=["alpine day", "volcanic"])
    s.w = types.SimpleNamespace(**{name: name for name in SHARED + CONTROL})  # widgets named by their names
    return s


def write(tmp_path, params):
    path = tmp_path / "result.png"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8)), params))
    return str(path)


def test_control_results_restore_the_control_settings(studio, tmp_path):
    path = write(tmp_path, dict(task="control", model="default", seed=7, class_name="volcanic", guidance_scale=3.0,
                                top_k=100, top_p=0.9, more_smooth=False, control_type="canny", canny_low=50.0,
                                canny_high=150.0, control_strength=0.6, control_guidance_start=0.1,
                                control_guidance_end=0.8))
    out = studio.reuse_settings(path)
    assert [out[k] for k in SHARED + CONTROL[:7]] == ["volcanic", 7, 3.0, 100, 0.9, False, "volcanic", "canny", 50.0,
                                                      150.0, 0.6, 0.1, 0.8]
    assert set(out) == set(SHARED + CONTROL)
    radio, canny_row = out["preprocessor"], out["canny_row"]  # the preprocessor choices follow the restored type
    assert radio.value == "canny" and [v for _, v in radio.choices] == ["canny", "none"] and canny_row.visible


def test_a_restored_control_type_brings_its_preprocessors(studio, tmp_path):
    path = write(tmp_path, dict(task="control", model="default", seed=1, control_type="depth", preprocessor="none"))
    out = studio.reuse_settings(path)
    radio, canny_row = out["preprocessor"], out["canny_row"]
    assert radio.value == "none" and [v for _, v in radio.choices] == ["world", "transformers", "none"]
    assert not canny_row.visible


def test_plain_results_leave_the_control_tab_alone(studio, tmp_path):
    path = write(tmp_path, dict(task="generate", model="default", seed=3, class_name="unknown class"))
    out = studio.reuse_settings(path)
    assert (out["gen_class"], out["seed"]) == (RANDOM_CLASS, 3)
    assert list(out) == SHARED  # no Control widget is in the answer: Gradio leaves them as they are


def test_an_image_without_parameters_is_refused(studio, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(gr.Error, match="no studio parameters"):
        studio.reuse_settings(str(path))
