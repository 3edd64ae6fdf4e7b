"""The Control tab in a real browser with a CAR file loaded: `app.py --model car_canny_d2.pth`, a small
random VAR folder (var_d2.pth and the VQVAE) with a CAR adapter beside it in the released format
(tests/tiny_controlvar.py). The tab says CAR and lists the file's type with the adapters' strength and
range (not ControlVAR's guidance); Preview map shows the condition picture; Generate with control
streams every scale and stores the control (type, strength, the map) in the PNG; Re-roll steers with the
stored map again. One studio start for the module."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import start_app
from test_browser import ARTIFACTS, WATCH, inpaint_under_control, open_tab, picture_file, upload
from tiny_controlvar import PATCH_NUMS, write_tiny_car

from studio.pngmeta import decode_picture, read_png_extras, read_png_parameters

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def car_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("car")
    served = start_app(write_tiny_car(folder, "canny"), tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.2")
    yield served
    served.demo.close()
    served.pool.close()


@pytest.fixture
def page(car_app, open_page):
    return open_page(car_app.url)  # a fresh page (its own session) per test


def wait_for_file(page, part: str) -> None:
    """Until the status names the saved file (`part` in its name) or says what went wrong; then it must be done."""
    page.wait_for_function(f"(t => (t.includes('{part}') && t.includes('Done')) || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    status = page.locator("#status").inner_text()
    assert "Done" in status, status


def newest(outputs, part: str) -> Path:
    return max(Path(outputs).rglob(f"*{part}*.png"), key=lambda p: p.stat().st_mtime)


def stored_picture(path: Path) -> np.ndarray:
    return np.asarray(decode_picture(read_png_extras(path.read_bytes())["control"]["picture"]))


def test_a_car_file_in_the_control_tab(page, car_app, tmp_path):
    expect = playwright_api.expect
    open_tab(page, "Control", "control-editor")
    expect(page.locator("#control-note")).to_contain_text("CAR")
    labels = [t.strip() for t in page.locator("#control-type label").all_inner_texts()]
    assert labels == ["Edges (canny)"], labels
    page.locator("#control-type label", has_text="Edges (canny)").click()
    strength = page.get_by_label("number input for Control strength")
    expect(strength).to_be_visible()  # the adapters' sliders, not ControlVAR's guidance
    expect(page.locator("#controlvar-row")).to_be_hidden()

    upload(page, "control-editor", picture_file(tmp_path, "photo.png", (120, 90), 7))
    expect(page.locator("#control-editor-note")).to_contain_text("photo.png: 120×90", timeout=60_000)
    page.click("#map-btn")
    shown = page.locator("#control-map img")
    expect(shown).to_be_visible(timeout=60_000)
    preview = np.asarray(Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("RGB"))
    assert preview.shape == (64, 64, 3)  # CAR reads the condition picture itself: no second panel
    assert set(np.unique(preview)) == {0, 255}  # canny edges, white on black

    strength.fill("0.8")
    strength.press("Tab")
    page.evaluate(WATCH)
    page.click("#control-btn")
    wait_for_file(page, "_control_")
    changes, result_at = page.evaluate("[window.__previews, window.__resultAt]")
    assert len([t for t in changes if t < result_at]) >= len(PATCH_NUMS) - 1, (changes, result_at)  # streamed
    made = newest(car_app.outputs, "_control_")
    params = read_png_parameters(made)
    assert (params["control_type"], params["preprocessor"], params["control_strength"]) == ("canny", "canny", 0.8)
    assert np.array_equal(stored_picture(made), preview)  # the map the preview showed is the one it was made with
    page.screenshot(path=ARTIFACTS / "22_car_control.png", full_page=True)

    page.click("#reroll-btn")
    wait_for_file(page, "_reroll_")
    again = newest(car_app.outputs, "_reroll_")
    params = read_png_parameters(again)
    assert (params["control_type"], params["control_strength"]) == ("canny", 0.8)
    assert np.array_equal(stored_picture(again), preview)  # re-rolled under the same map


def test_inpainting_under_control_from_the_edit_tab(page, car_app, tmp_path):
    """Issue 16, editing under control: a picture in Edit, a stroke painted over it, an edge picture in Control
    read as it is (preprocessor none); "In-paint under control" redraws the painted part under that map with
    the CAR adapter: outside the edit every pixel stays, the PNG keeps the task, the control and the map."""
    expect = playwright_api.expect
    edges = np.zeros((96, 96, 3), np.uint8)
    edges[20:76:8] = 255  # horizontal lines: a map unlike the picture's own edges
    Image.fromarray(edges).save(tmp_path / "edges.png")
    open_tab(page, "Control", "control-editor")
    upload(page, "control-editor", tmp_path / "edges.png")
    expect(page.locator("#control-editor-note")).to_contain_text("edges.png: 96×96", timeout=60_000)
    page.locator("#preprocessor label", has_text="None: the image is the map").click()
    page.click("#map-btn")
    shown = page.locator("#control-map img")
    expect(shown).to_be_visible(timeout=60_000)
    preview = np.asarray(Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("RGB"))
    read = np.asarray(Image.fromarray(edges).resize((64, 64), Image.Resampling.LANCZOS))  # "none" at 64 px
    assert np.abs(preview.astype(int) - read).mean() < 8  # the lines, as the editor sends them (its own encoding)

    photo = picture_file(tmp_path, "photo.png", (96, 96), 3)
    open_tab(page, "Edit", "editor")
    upload(page, "editor", photo)
    expect(page.locator("#editor-note")).to_contain_text("photo.png: 96×96", timeout=60_000)
    made, picture = inpaint_under_control(page, car_app.outputs)
    assert picture.size == (96, 96)  # the uploaded photo (the editor re-encodes it: WebP)
    params = read_png_parameters(made)
    assert (params["task"], params["control_type"], params["preprocessor"]) == ("control_inpaint", "canny", "none")
    assert params["map_from"] == "control picture" and params["control_strength"] == 1.0
    assert np.array_equal(stored_picture(made), preview)  # the Control tab's map steered it
    page.screenshot(path=ARTIFACTS / "23_car_control_inpaint.png", full_page=True)
