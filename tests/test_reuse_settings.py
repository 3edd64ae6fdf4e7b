"""'Reuse settings' on a selected result: the Generate settings always, the Control tab's own
settings (type, thresholds, strength, scale range) only when the image was made under control."""
import types

import gradio as gr
import pytest
from PIL import Image

from studio.ui import RANDOM_CLASS, Studio
from studio.worker import encode_png


@pytest.fixture
def studio():
    s = object.__new__(Studio)  # no worker pool: reuse_settings only reads the PNG and the model's classes
    s.info = lambda model: types.SimpleNamespace(class_names=["alpine day", "volcanic"])
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
    assert out[:13] == ("volcanic", 7, 3.0, 100, 0.9, False, "volcanic", "canny", 50.0, 150.0, 0.6, 0.1, 0.8)
    radio, canny_row = out[13:]  # the preprocessor choices follow the restored type
    assert radio.value == "canny" and [v for _, v in radio.choices] == ["canny", "none"] and canny_row.visible


def test_a_restored_control_type_brings_its_preprocessors(studio, tmp_path):
    path = write(tmp_path, dict(task="control", model="default", seed=1, control_type="depth", preprocessor="none"))
    radio, canny_row = studio.reuse_settings(path)[13:]
    assert radio.value == "none" and [v for _, v in radio.choices] == ["world", "transformers", "none"]
    assert not canny_row.visible


def test_plain_results_leave_the_control_tab_alone(studio, tmp_path):
    path = write(tmp_path, dict(task="generate", model="default", seed=3, class_name="unknown class"))
    out = studio.reuse_settings(path)
    assert out[:2] == (RANDOM_CLASS, 3)
    skip = gr.skip()
    assert all(type(v) is type(skip) and v == skip for v in out[6:]) and len(out) == 15


def test_an_image_without_parameters_is_refused(studio, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(gr.Error, match="no studio parameters"):
        studio.reuse_settings(str(path))
