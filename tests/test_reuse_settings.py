"""'Reuse settings' on a selected result: the Generate settings and the image count always, the Control
tab's own settings (type, thresholds, strength, scale range) only when the image was made under control;
a picture without studio parameters changes nothing and says why in the status line."""
import types

import pytest
from PIL import Image

from studio.pngmeta import encode_png
from studio.serve.protocol import ModelInfo
from studio.serve.ui import RANDOM_CLASS, Studio

SHARED = ["gen_class", "seed", "num_images", "guidance", "top_k", "top_p", "more_smooth",
          "status"]  # the Generate / Sampling widgets, and the line that says what was restored
CONTROL = ["control_class", "control_type", "canny_low", "canny_high", "control_strength", "control_start",
           "control_end", "preprocessor", "canny_row"]  # the Control tab's own
CONTROLVAR = ["type_guidance", "map_guidance"]  # ControlVAR's two guidance sliders, set only for its results


@pytest.fixture
def studio():
    s = object.__new__(Studio)  # no worker pool: reuse_settings only reads the PNG and the model's classes
    info = ModelInfo(name="default", source="test", class_names=["alpine day", "volcanic"], resolution=128,
                     patch_nums=[1, 2], vocab_size=16, controls=["canny", "depth", "segmentation"],
                     control_family="adapters")
    s.info = lambda model: info
    s.w = types.SimpleNamespace(**{name: name for name in SHARED + CONTROL + CONTROLVAR})  # widgets named by their names
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
    assert [out[k] for k in SHARED[:-1] + CONTROL[:7]] == ["volcanic", 7, 1, 3.0, 100, 0.9, False, "volcanic",
                                                           "canny", 50.0, 150.0, 0.6, 0.1, 0.8]
    assert set(out) == set(SHARED + CONTROL)
    radio, canny_row = out["preprocessor"], out["canny_row"]  # the preprocessor choices follow the restored type
    assert radio.value == "canny" and [v for _, v in radio.choices] == ["canny", "none"] and canny_row.visible


def test_controlvar_results_restore_their_guidance(studio, tmp_path):
    path = write(tmp_path, dict(task="control", model="default", seed=7, class_name="volcanic", control_type="canny",
                                type_guidance_scale=2.5, control_guidance_scale=6.0))
    out = studio.reuse_settings(path)
    assert (out["type_guidance"], out["map_guidance"], out["control_type"]) == (2.5, 6.0, "canny")


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


def test_an_image_of_a_batch_brings_back_the_batch(studio, tmp_path):
    """Image 3 of a batch of 4 made with seed 120 has seed 122: the page gets the batch back (seed 120, 4 images),
    and the status line says how to make the image alone."""
    path = write(tmp_path, dict(task="generate", model="default", seed=122, batch_seed=120, num_images=4,
                                index_in_batch=2, class_name="volcanic"))
    out = studio.reuse_settings(path)
    assert (out["seed"], out["num_images"], out["gen_class"]) == (120, 4, "volcanic")
    assert "seeds 120–123" in out["status"] and "Seed 122 and 1 image" in out["status"]


def test_an_image_without_parameters_changes_nothing_and_says_why(studio, tmp_path):
    """No exception: an error would put red Error badges on every output (the sliders) until closed."""
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    out = studio.reuse_settings(str(path))
    assert list(out) == ["status"] and "no studio parameters" in out["status"] and "nothing was changed" in out["status"]
