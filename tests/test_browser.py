"""The studio in a real browser: Playwright driving Debian's Chromium against the app on loopback.

Generate (the live preview must change at every scale before the result appears), send the result
to Edit, paint a mask with the brush, in-paint; send it to Control, preview its edge map, generate
under that control. Screenshots go to tests/artifacts/.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_app import start_app
from test_worker import TINY_PATCH_NUMS, tiny_bundle  # noqa: F401 (the fixture)

playwright_api = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

# records every new src of the live preview, and when the first result image appears
WATCH = """() => {
    window.__previews = []; window.__resultAt = null;
    const seen = new Set();
    const look = () => {
        const img = document.querySelector('#preview img');
        if (img && img.src && !seen.has(img.src)) { seen.add(img.src); window.__previews.push(performance.now()); }
        if (window.__resultAt === null && document.querySelector('#results img')) window.__resultAt = performance.now();
    };
    new MutationObserver(look).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                       attributeFilter: ['src']});
}"""


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium; installed with apt-get when missing (skips only if that fails)."""
    if not os.path.exists(CHROMIUM):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            if shutil.which("apt-get") is None:
                raise RuntimeError("apt-get is not available")
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                           timeout=900, env=env)
        except Exception as e:  # no root, no network to the package mirror ...
            pytest.skip(f"Chromium is not installed at {CHROMIUM} and `apt-get install chromium` failed: {e}")
    return CHROMIUM


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):  # noqa: F811
    served = start_app(tiny_bundle, tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.25")
    yield served
    served.demo.close()
    served.pool.close()


@pytest.fixture
def page(app, chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app.url)
        page.wait_for_selector("#generate-btn")
        yield page
        browser.close()


def test_generate_streams_previews_then_inpaint_a_painted_mask(page, app):
    page.screenshot(path=ARTIFACTS / "01_start.png", full_page=True)
    page.evaluate(WATCH)
    page.click("#generate-btn")
    page.wait_for_function("window.__resultAt !== null")
    changes, result_at = page.evaluate("[window.__previews, window.__resultAt]")
    before = [t for t in changes if t < result_at]
    assert len(before) >= min(5, len(TINY_PATCH_NUMS)), (changes, result_at)
    expect = playwright_api.expect
    expect(page.locator("#status")).to_contain_text("Done")
    expect(page.locator("#filmstrip img")).to_have_count(len(TINY_PATCH_NUMS))
    page.screenshot(path=ARTIFACTS / "02_generated.png", full_page=True)

    page.click("#send-edit")
    canvas = page.locator("#editor canvas").first
    expect(canvas).to_be_visible(timeout=30_000)  # a loaded machine can take more than the default 5 s
    page.wait_for_timeout(500)  # the editor lays out its background
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.locator("#editor button[aria-label='Brush']").click()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 40, cy - 20)
    page.mouse.down()
    for dx in range(-40, 41, 8):
        page.mouse.move(cx + dx, cy - 20 + abs(dx) / 2, steps=2)
    page.mouse.up()
    page.screenshot(path=ARTIFACTS / "03_mask_painted.png", full_page=True)

    first_result = page.locator("#results img").first.get_attribute("src")
    page.click("#inpaint-btn")
    page.wait_for_function("(t => t.includes('_inpaint_') || t.includes('⚠️'))"  # the saved file's name, or an error
                           "(document.querySelector('#status').innerText)")
    status = page.locator("#status").inner_text()
    assert "Done" in status, status
    assert page.locator("#results img").first.get_attribute("src") != first_result
    assert len(list(Path(app.outputs).rglob("*_inpaint_*.png"))) == 1
    page.screenshot(path=ARTIFACTS / "04_inpainted.png", full_page=True)

    page.click("#send-control")
    expect(page.locator("#control-editor canvas").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(500)  # the editor lays out its background
    page.click("#map-btn")
    expect(page.locator("#control-map img")).to_be_visible(timeout=30_000)
    page.click("#control-btn")
    page.wait_for_function("(t => t.includes('_control_') || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    status = page.locator("#status").inner_text()
    assert "Done" in status, status
    assert len(list(Path(app.outputs).rglob("*_control_*.png"))) == 1
    page.screenshot(path=ARTIFACTS / "05_control.png", full_page=True)
