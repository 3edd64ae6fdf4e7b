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
from test_browser import ARGS, ARTIFACTS, WATCH, chromium, open_tab, picture_file  # noqa: F401 (chromium: fixture)
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
def page(car_app, chromium):  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(car_app.url)
        page.wait_for_selector("#generate-btn")
        yield page
        browser.close()


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

    with page.expect_file_chooser() as chooser:
        page.click("#control-editor-upload")
    chooser.value.set_files(str(picture_file(tmp_path, "photo.png", (120, 90), 7)))
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
