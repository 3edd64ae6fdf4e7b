"""The Control tab in a real browser with a published control model loaded: a small random ControlVAR
model in the released format (tests/tiny_controlvar.py). The tab lists ControlVAR's four types and its
two guidance sliders (not the adapters' strength and range); Preview map shows the condition picture
beside what the model reads; Generate with control streams every scale and returns an image whose PNG
carries the control (type, guidance weights, the map); Reuse settings brings the guidance back; the result sent
to Edit and painted over is in-painted under the Control tab's map (issue 16); a normal map asked of a picture
on a machine without its annotator says what works instead."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import start_app
from test_browser import ARTIFACTS, WATCH, inpaint_under_control, open_tab, picture_file, upload
from tiny_controlvar import PATCH_NUMS, write_tiny_controlvar

from studio.pngmeta import decode_picture, read_png_extras, read_png_parameters

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def cv_app(tmp_path_factory):
    folder = write_tiny_controlvar(tmp_path_factory.mktemp("controlvar"))
    served = start_app(folder, tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.25")
    yield served
    served.demo.close()
    served.pool.close()


@pytest.fixture
def page(cv_app, open_page):
    return open_page(cv_app.url)


def test_controlvar_in_the_control_tab(page, cv_app, tmp_path):
    expect = playwright_api.expect
    open_tab(page, "Control", "control-editor")
    expect(page.locator("#control-note")).to_contain_text("ControlVAR")
    labels = [t.strip() for t in page.locator("#control-type label").all_inner_texts()]
    assert labels == ["Segmentation", "Edges (canny)", "Depth", "Normal map"], labels
    expect(page.locator("#controlvar-row")).to_be_visible()
    expect(page.get_by_label("Control strength")).to_be_hidden()  # the adapters' slider is not ControlVAR's

    upload(page, "control-editor", picture_file(tmp_path, "photo.png", (120, 90), 5))
    expect(page.locator("#control-editor-note")).to_contain_text("photo.png: 120×90", timeout=60_000)
    page.click("#map-btn")
    shown = page.locator("#control-map img")
    expect(shown).to_be_visible(timeout=60_000)
    preview = Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body()))
    assert preview.size == (128, 64)  # the edge picture, and beside it the map as the model's VQVAE reads it
    edges = np.asarray(preview.convert("RGB"))[:, :64]
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255

    guidance = page.locator("#type-guidance input[type=number]")
    guidance.fill("2.5")
    guidance.press("Tab")
    page.evaluate(WATCH)
    page.click("#control-btn")
    page.wait_for_function("(t => t.includes('_control_') || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    assert "Done" in page.locator("#status").inner_text(), page.locator("#status").inner_text()
    changes, result_at = page.evaluate("[window.__previews, window.__resultAt]")
    assert len([t for t in changes if t < result_at]) >= len(PATCH_NUMS) - 1, (changes, result_at)  # streamed
    made = list(Path(cv_app.outputs).rglob("*_control_*.png"))
    assert len(made) == 1
    params = read_png_parameters(made[0])
    assert params["control_type"] == "canny" and params["preprocessor"] == "canny"
    assert (params["type_guidance_scale"], params["control_guidance_scale"]) == (2.5, 4.0)
    stored = np.asarray(decode_picture(read_png_extras(made[0].read_bytes())["control"]["picture"]))
    assert np.array_equal(stored, edges)  # the map the preview showed is the one it was made with
    page.screenshot(path=ARTIFACTS / "20_controlvar.png", full_page=True)

    guidance.fill("1")
    guidance.press("Tab")
    page.click("#reuse-btn")
    expect(page.locator("#status")).to_contain_text("Settings reused", timeout=30_000)
    expect(guidance).to_have_value("2.5")

    # in-painting under control (issue 16), in this page and studio: the result in Edit, a stroke over it; the
    # Control tab's picture (its canny map, previewed above) steers the redrawn part, the outside stays
    page.click("#send-edit")
    made, picture = inpaint_under_control(page, cv_app.outputs)
    assert picture.size == (64, 64)  # the result sent to Edit, at the model's size
    params = read_png_parameters(made)
    assert (params["task"], params["control_type"], params["preprocessor"]) == ("control_inpaint", "canny", "canny")
    assert params["map_from"] == "control picture" and params["type_guidance_scale"] == 2.5
    stored = np.asarray(decode_picture(read_png_extras(made.read_bytes())["control"]["picture"]))
    assert np.array_equal(stored, edges)  # the map the Control tab previewed
    page.screenshot(path=ARTIFACTS / "21_controlvar_inpaint.png", full_page=True)

    open_tab(page, "Control", "control-editor")  # back from Edit
    page.locator("#control-type label", has_text="Normal map").click()
    page.click("#map-btn")
    expect(page.get_by_text("normal maps cannot be made from a picture on this machine").first).to_be_visible(
        timeout=60_000)
    expect(page.get_by_text("made from a picture here: segmentation, canny").first).to_be_visible()
