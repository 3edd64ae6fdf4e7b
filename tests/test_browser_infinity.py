"""Infinity (text-to-image) in a real browser: with a tiny random Infinity model loaded, the Generate tab
shows a prompt box in place of the class; a prompt makes an image whose scales stream to the page (the
live preview changes at every scale before the result); in-painting a painted mask with a prompt keeps
the picture outside the mask; the PNGs hold their prompts and Reuse settings restores one. The API
takes a prompt and an aspect ratio, and refuses a class for this model."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.pngmeta import read_png_info
from test_app import start_app
from test_browser import ARTIFACTS, WATCH, brush_ready, stroke
from test_infinity_serve import SQUARE_SCALES, infinity_folder  # noqa: F401 (the fixture)
from test_worker import tiny_bundle  # noqa: F401 (the fixture)

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def app(infinity_folder, tiny_bundle, tmp_path_factory):  # noqa: F811
    # a tiny class-conditional VAR beside it (second in the menu): the API's left-out settings follow the model
    served = start_app(infinity_folder, tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.2",
                       "--model", str(tiny_bundle))
    yield served
    served.demo.close()
    served.pool.close()


@pytest.fixture
def page(app, open_page):
    return open_page(app.url, timeout_ms=90_000)


def _newest(outputs, kind: str) -> Path:
    files = list(Path(outputs).rglob(f"*_{kind}_*.png"))
    assert files, f"no {kind} result saved"
    return max(files, key=lambda p: p.stat().st_mtime)


def _wait_done(page, kind: str) -> None:
    page.wait_for_function(f"(t => (t.includes('_{kind}_') && t.includes('Done')) || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    status = page.locator("#status").inner_text()
    assert "Done" in status, status


def test_a_prompt_streams_its_scales_and_inpainting_keeps_the_outside(page, app):
    expect = playwright_api.expect
    expect(page.locator("#gen-prompt textarea")).to_be_visible()
    expect(page.locator("#gen-class")).to_be_hidden()  # no classes: a prompt in their place
    expect(page.locator("#aspect-ratio")).to_be_visible()
    page.fill("#gen-prompt textarea", "a red fox in the snow")
    page.fill("#negative-prompt textarea", "blue sky")
    page.evaluate(WATCH)
    page.click("#generate-btn")
    page.wait_for_function("window.__resultAt !== null")
    changes, result_at = page.evaluate("[window.__previews, window.__resultAt]")
    assert len([t for t in changes if t < result_at]) >= 5, (changes, result_at)  # scales arrive one by one
    _wait_done(page, "generate")
    expect(page.locator("#filmstrip img")).to_have_count(len(SQUARE_SCALES))
    assert "16×16" in page.locator("#filmstrip").inner_text()
    page.screenshot(path=ARTIFACTS / "infinity_01_generated.png", full_page=True)
    generated = _newest(app.outputs, "generate")
    params, bits = read_png_info(generated.read_bytes())
    assert params["prompt"] == "a red fox in the snow" and params["negative_prompt"] == "blue sky"
    assert params["family"] == "infinity" and bits is not None and len(bits) == len(SQUARE_SCALES)
    page.fill("#gen-prompt textarea", "something else")
    page.click("#reuse-btn")  # Reuse settings brings the picture's prompt back
    expect(page.locator("#gen-prompt textarea")).to_have_value("a red fox in the snow")
    expect(page.locator("#negative-prompt textarea")).to_have_value("blue sky")

    page.click("#send-edit")
    box = brush_ready(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    stroke(page, [(cx - 30, cy)] + [(cx + dx, cy) for dx in range(-30, 31, 6)])
    expect(page.locator("#edit-prompt textarea")).to_be_visible()
    page.fill("#edit-prompt textarea", "green hills")
    page.click("#inpaint-btn")
    _wait_done(page, "inpaint")
    page.screenshot(path=ARTIFACTS / "infinity_02_inpainted.png", full_page=True)
    edited = _newest(app.outputs, "inpaint")
    params, _ = read_png_info(edited.read_bytes())
    assert params["prompt"] == "green hills" and params["task"] == "inpaint"
    before = np.asarray(Image.open(generated).convert("RGB")).astype(int)
    after = np.asarray(Image.open(io.BytesIO(edited.read_bytes())).convert("RGB")).astype(int)
    assert after.shape == before.shape == (256, 256, 3)
    changed = np.abs(after - before).max(-1) > 0
    assert changed.any()  # the painted stroke was regenerated
    rows = np.flatnonzero(changed.any(1))
    assert rows.min() > 32 and rows.max() < 256 - 32, (rows.min(), rows.max())  # a band across the middle
    assert changed.mean() < 0.5  # the rest of the picture is the picture's, exactly
    assert not changed[:32].any() and not changed[-32:].any()


def test_the_api_takes_a_prompt_and_refuses_a_class(app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app.url, verbose=False, download_files=False)
    with pytest.raises(AppError, match="text-to-image .* no classes"):
        client.predict(prompt="a fox", class_name="volcano", api_name="/generate")
    with pytest.raises(AppError, match="write a prompt"):
        client.predict(api_name="/generate")
    final = client.predict(prompt="a dog at night", aspect_ratio="1:2", seed=4, preview="none", api_name="/generate")
    assert final[1].startswith("✓ Done"), final[1]
    selected = final[4]  # (preview, status, scales, result, selected, history, queue note)
    params, _ = read_png_info(Path(selected["path"] if isinstance(selected, dict) else selected).read_bytes())
    assert params["prompt"] == "a dog at night" and (params["height"], params["width"]) == (352, 176)

    # sampling settings left out take the chosen model's published defaults; given ones are kept
    def settings(final):
        selected = final[4]
        p, _ = read_png_info(Path(selected["path"] if isinstance(selected, dict) else selected).read_bytes())
        return p["guidance_scale"], p["top_k"], p["top_p"]

    assert settings(final) == (3.0, 2, 0.97)  # Infinity's (cfg 3, top-p 0.97; top-k 2 = both choices of a bit)
    given = client.predict(prompt="a dog", guidance_scale=4.0, top_p=0.5, seed=4, preview="none", api_name="/generate")
    assert settings(given) == (4.0, 2, 0.5)
    var = app.pool.model_specs[1].name  # the class-conditional model: VAR's defaults
    assert settings(client.predict(model=var, seed=1, preview="none", api_name="/generate")) == (4.0, 64, 0.95)
