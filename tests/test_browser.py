"""The studio in a real browser: Playwright driving Debian's Chromium against the app on loopback.

Generate (the live preview must change at every scale before the result appears), send the result
to Edit, paint a mask with the brush, in-paint; send it to Control, preview its edge map, generate
under that control. Screenshots go to tests/artifacts/.
"""
import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ARTIFACTS  # noqa: F401 (the other browser tests take it from here)
from test_app import start_app
from test_worker import TINY_PATCH_NUMS, tiny_bundle  # noqa: F401 (the fixture)

playwright_api = pytest.importorskip("playwright.sync_api")

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


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):  # noqa: F811
    served = start_app(tiny_bundle, tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.25")
    yield served
    served.demo.close()
    served.pool.close()


@pytest.fixture
def page(app, open_page):
    return open_page(app.url)


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
    box = brush_ready(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    stroke(page, [(cx - 40, cy - 20)] + [(cx + dx, cy - 20 + abs(dx) / 2) for dx in range(-40, 41, 8)])
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

    # issue 15, item 5: an in-painting re-rolls (inside its mask, pasted back)
    page.click("#reroll-btn")
    page.wait_for_function("(t => t.includes('_reroll_') || t.includes('⚠️'))(document.querySelector('#status').innerText)")
    assert "Done" in page.locator("#status").inner_text(), page.locator("#status").inner_text()
    from studio.pngmeta import read_png_parameters
    rerolled = list(Path(app.outputs).rglob("*_reroll_*.png"))
    assert len(rerolled) == 1 and read_png_parameters(rerolled[0])["rerolled_edit"] == "inpaint"

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
    # ... and a control result re-rolls under its control
    page.click("#reroll-btn")
    page.wait_for_function("(t => (t.includes('_reroll_') && t.includes('Done')) || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    assert "Done" in page.locator("#status").inner_text(), page.locator("#status").inner_text()
    newest = max(Path(app.outputs).rglob("*_reroll_*.png"), key=lambda p: p.stat().st_mtime)
    assert read_png_parameters(newest)["control_type"] == "canny"


# -- issue 15: what the editors send, batches, reuse, queueing, the layout ------------------------------------

JOINS = """() => { window.__joins = [];
    const send = XMLHttpRequest.prototype.send, fetch0 = window.fetch;
    window.fetch = function(url, opts) {
        if (String(url).includes('queue/join') && opts && opts.body) window.__joins.push(JSON.parse(opts.body));
        return fetch0.apply(this, arguments); };
}"""


def picture_file(tmp_path, name, size, seed):
    """A noisy picture of a size no editor starts with."""
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def drop(page, selector, path, mime="image/png"):
    """Drop a file on an element as a person dragging it from the desktop would."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    page.evaluate("""([sel, b64, name, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime}));
        const el = document.querySelector(sel);
        for (const t of ['dragenter', 'dragover', 'drop'])
            el.dispatchEvent(new DragEvent(t, {bubbles: true, cancelable: true, dataTransfer: dt}));
    }""", [selector, data, Path(path).name, mime])


def sent_editor(page, fn_name_check=None):
    """The editor value of the last run request: (background size, composite size, composite's std, layers)."""
    page.wait_for_function("window.__joins.length > 0")
    body = page.evaluate("window.__joins.pop()")
    value = next(v for v in body["data"] if isinstance(v, dict) and "background" in v)
    bg = Image.open(value["background"]["path"])
    comp = Image.open(value["composite"]["path"])
    layers = [np.asarray(Image.open(layer["path"]).convert("RGBA"))[..., 3] for layer in value.get("layers") or []]
    return bg.size, comp.size, float(np.asarray(comp.convert("RGB"), np.float32).std()), layers


def brush_ready(page, editor="editor", settle_ms=500):
    """Wait for an editor's picture to be shown and laid out, scroll to it and pick the brush; its box."""
    canvas = page.locator(f"#{editor} canvas").first
    playwright_api.expect(canvas).to_be_visible(timeout=30_000)  # a loaded machine can take more than 5 s
    page.wait_for_timeout(settle_ms)  # the editor lays out its background
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.locator(f"#{editor} button[aria-label='Brush']").click()
    return box


def stroke(page, points, steps=2):
    """Press at the first (x, y) point, move through the others, release."""
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(x, y, steps=steps)
    page.mouse.up()


def upload(page, editor, path):
    """Pick a file with an editor's Upload button, as a person would."""
    with page.expect_file_chooser() as chooser:
        page.click(f"#{editor}-upload")
    chooser.value.set_files(str(path))


def open_tab(page, name, editor):
    page.get_by_role("tab", name=name).click()
    playwright_api.expect(page.locator(f"#{editor}-upload")).to_be_visible(timeout=30_000)
    page.wait_for_timeout(500)  # the editor lays out


def inpaint_under_control(page, outputs) -> tuple:
    """Issue 16, editing under control: a stroke across the middle of the Edit tab's picture, then "In-paint
    under control". The result keeps every pixel of the picture the editor sent outside the edit (the stroke
    and its feather, as the PNG records them) and changes inside. Returns the result PNG and that picture."""
    from studio.editing import InpaintPlan
    from studio.pngmeta import read_png_extras

    box = brush_ready(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    stroke(page, [(cx - 30, cy), (cx + 30, cy)], steps=8)
    page.evaluate(JOINS)
    page.click("#control-inpaint-btn")
    page.wait_for_function("window.__joins.length > 0")
    sent = next(v for v in page.evaluate("window.__joins.pop()")["data"] if isinstance(v, dict) and "background" in v)
    page.wait_for_function("(t => (t.includes('_control_inpaint_') && t.includes('Done')) || t.includes('⚠️'))"
                           "(document.querySelector('#status').innerText)")
    assert "Done" in page.locator("#status").inner_text(), page.locator("#status").inner_text()
    made = max(Path(outputs).rglob("*_control_inpaint_*.png"), key=lambda p: p.stat().st_mtime)
    # the picture as the editor sent it (the editor re-encodes an upload: WebP), what the worker in-painted
    picture = Image.open(sent["background"]["path"]).convert("RGB")
    original, result = np.asarray(picture), np.asarray(Image.open(made).convert("RGB"))
    edited = InpaintPlan.from_record(picture, read_png_extras(made.read_bytes())["edit"]).alpha > 0
    assert 0 < edited.mean() < 0.6  # the stroke and its feather, not the picture
    assert np.array_equal(result[~edited], original[~edited])  # outside the edit, exactly the picture
    assert not np.array_equal(result[edited], original[edited])
    return made, picture


def test_uploads_and_drops_reach_the_request_and_unreadable_files_say_so(page, app, tmp_path):
    """Issue 15, items 1 and 4: a picture uploaded or dropped on the Control, Guide or Edit canvas is the
    picture the request carries (the Control tab used to send its old 128 px layout, so its map was black);
    a file that is not a picture says so beside the editor and leaves the editor as it was."""
    expect = playwright_api.expect
    page.evaluate(JOINS)
    photo = picture_file(tmp_path, "photo.png", (200, 150), 1)
    open_tab(page, "Control", "control-editor")
    upload(page, "control-editor", photo)
    expect(page.locator("#control-editor-note")).to_contain_text("photo.png: 200×150", timeout=60_000)
    page.click("#map-btn")
    bg, comp, std, _ = sent_editor(page)
    assert bg == comp == (200, 150) and std > 30, (bg, comp, std)

    open_tab(page, "Guide", "guide")
    drop(page, "#guide", picture_file(tmp_path, "layout.png", (90, 70), 2))
    expect(page.locator("#guide-note")).to_contain_text("layout.png: 90×70", timeout=60_000)
    page.keyboard.press("Control+Enter")  # runs the tab in view: Paint from guide
    bg, comp, std, _ = sent_editor(page)
    assert bg == comp == (90, 70) and std > 30, (bg, comp, std)
    for _ in range(20):  # Escape stops it (pressed again if it came before the job was queued)
        page.keyboard.press("Escape")
        page.wait_for_timeout(150)
        if "Stopp" in page.locator("#status").inner_text():
            break
    expect(page.locator("#status")).to_contain_text("Stopped", timeout=30_000)

    open_tab(page, "Edit", "editor")
    drop(page, "#editor", picture_file(tmp_path, "big.png", (300, 240), 3))
    expect(page.locator("#editor-note")).to_contain_text("big.png: 300×240", timeout=60_000)
    expect(page.locator("#editor canvas").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(500)
    expect(page.locator("#area-row")).to_be_visible()  # larger than the model: "only masked area" means something
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    drop(page, "#editor canvas", fake)  # on the picture now shown
    expect(page.locator("#editor-note")).to_contain_text("fake.png could not be read as an image", timeout=60_000)
    box = brush_ready(page, settle_ms=0)
    stroke(page, [(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5),
                  (box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.55)], steps=6)
    page.click("#inpaint-btn")
    bg, comp, std, layers = sent_editor(page)
    assert bg == (300, 240) and std > 30 and layers and layers[0].any(), (bg, std, len(layers))
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    page.screenshot(path=ARTIFACTS / "10_uploads.png", full_page=True)


def test_batch_seeds_reuse_settings_and_a_queued_second_click(page, app, tmp_path):
    """Issue 15, items 2, 3 and 7: image i of a batch has seed + i in its PNG, and that seed alone makes it again;
    Reuse settings brings the batch back (seed and count), and on a foreign picture it says why and marks no
    control with an error; a second click during a run says it is queued."""
    expect = playwright_api.expect
    seed = page.get_by_label("Seed (-1 = random)")
    seed.fill("123")
    seed.press("Tab")
    count = page.locator("#num-images input[type=number]")
    count.fill("3")
    count.press("Tab")
    page.click("#generate-btn")
    page.click("#generate-btn")  # during the run: queued, and the page says so
    expect(page.locator("#queue-note")).to_contain_text("Queued", timeout=30_000)
    expect(page.locator("#status")).to_contain_text("seeds 123–125", timeout=60_000)
    expect(page.locator("#queue-note")).to_have_text("", timeout=60_000)  # the second run started
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    pngs = sorted(Path(app.outputs).rglob("*_generate_s124_*.png"))
    assert len(pngs) == 2, pngs  # both runs made the same image 2
    second = np.asarray(Image.open(pngs[0]).convert("RGB"), np.int16)
    assert np.abs(second - np.asarray(Image.open(pngs[1]).convert("RGB"), np.int16)).max() <= 1
    from studio.pngmeta import read_png_parameters
    params = read_png_parameters(pngs[0])
    assert (params["seed"], params["batch_seed"], params["num_images"], params["index_in_batch"]) == (124, 123, 3, 1)

    page.locator("#results .thumbnail-item").nth(1).click()  # image 2 of the batch
    page.click("#reuse-btn")
    expect(page.locator("#status")).to_contain_text("this image is number 2, seed 124", timeout=30_000)
    assert seed.input_value() == "123" and count.input_value() == "3"
    seed.fill("124")
    seed.press("Tab")
    count.fill("1")
    count.press("Tab")
    page.click("#generate-btn")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    alone = [p for p in Path(app.outputs).rglob("*_generate_s124_*.png") if p not in pngs]
    assert len(alone) == 1
    assert np.abs(second - np.asarray(Image.open(alone[0]).convert("RGB"), np.int16)).max() <= 1

    foreign = picture_file(tmp_path, "foreign.png", (64, 64), 4)
    page.locator("#selected input[type=file]").set_input_files(str(foreign))
    page.wait_for_timeout(1000)
    page.click("#reuse-btn")
    expect(page.locator("#status")).to_contain_text("no studio parameters to reuse", timeout=30_000)
    page.wait_for_timeout(500)
    assert page.locator(".block.error, [data-testid='status-tracker'].error").count() == 0
    assert seed.input_value() == "124"  # nothing changed
    page.screenshot(path=ARTIFACTS / "11_reuse.png", full_page=True)


@pytest.mark.parametrize("width,height", [(1280, 720), (390, 844)])
def test_the_run_button_preview_status_and_stop_are_in_view_together(app, open_page, width, height):
    """Issue 15, item 6: with the Edit tab's run button scrolled into view, the live preview, the status and
    Stop are on screen too (a laptop, a phone), and the filmstrip shows every scale."""
    page = open_page(app.url, width, height)
    page.click("#generate-btn")
    playwright_api.expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    strip = page.locator("#filmstrip").bounding_box()
    thumbs = [page.locator("#filmstrip img").nth(i).bounding_box() for i in range(len(TINY_PATCH_NUMS))]
    assert all(t["x"] >= strip["x"] - 1 and t["x"] + t["width"] <= strip["x"] + strip["width"] + 1 for t in thumbs)
    page.click("#send-edit")
    page.locator("#inpaint-btn").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    boxes = {s: page.locator(s).bounding_box() for s in ("#inpaint-btn", "#preview", "#status", "#stop-btn")}
    dock = page.locator("#dock").bounding_box()
    for name, b in boxes.items():
        assert b and b["y"] >= 0 and b["y"] + b["height"] <= height, (name, b)
    run = boxes["#inpaint-btn"]  # not hidden under the dock
    assert run["y"] + run["height"] <= dock["y"] or run["y"] >= dock["y"] + dock["height"] or \
        run["x"] + run["width"] <= dock["x"] or run["x"] >= dock["x"] + dock["width"], (run, dock)
    page.screenshot(path=ARTIFACTS / f"12_layout_{width}.png")


def test_history_survives_a_reload_and_opens_a_result_in_edit(page, app):
    """Issue 15, history: the outputs on disk are the History, newest first, so a reload keeps every result; one
    clicked there is the Selected picture, with its parameters, and Send to Edit puts that very picture in the
    editor (what an in-paint request then carries)."""
    expect = playwright_api.expect
    seed = page.get_by_label("Seed (-1 = random)")
    seed.fill("4321")
    seed.press("Tab")
    page.click("#generate-btn")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    made = next(Path(app.outputs).rglob("*_generate_s4321_*.png"))
    total = sum(1 for _ in Path(app.outputs).rglob("*.png"))

    page.reload()
    page.wait_for_selector("#generate-btn")
    expect(page.locator("#results img")).to_have_count(0)  # the page starts afresh ...
    expect(page.locator("#history-label")).to_contain_text(f"of {total} saved results", timeout=30_000)
    first = page.locator("#history .thumbnail-item").first
    expect(first).to_contain_text("generate · seed 4321")  # ... its History is the folder, newest first
    first.click()
    expect(page.locator("#selected img")).to_be_visible(timeout=30_000)
    page.get_by_text("Parameters stored in the selected PNG").click()
    expect(page.locator("#params-view")).to_contain_text("4321", timeout=30_000)

    page.evaluate(JOINS)
    page.click("#send-edit")
    expect(page.locator("#editor canvas").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(500)  # the editor lays out its background
    page.click("#inpaint-btn")  # nothing painted: refused, but the request shows what the editor holds
    page.wait_for_function("window.__joins.length > 0")
    body = page.evaluate("window.__joins.pop()")
    value = next(v for v in body["data"] if isinstance(v, dict) and "background" in v)
    sent = np.asarray(Image.open(value["background"]["path"]).convert("RGB"))
    assert np.array_equal(sent, np.asarray(Image.open(made).convert("RGB")))
    expect(page.locator("#status")).to_contain_text("mask is empty", timeout=30_000)
    page.screenshot(path=ARTIFACTS / "12_history.png", full_page=True)


def app_limits():
    from studio.serve.limits import Limits
    return Limits()


def test_an_upload_above_the_working_size_is_edited_and_pasted_into_the_original(page, app, tmp_path, monkeypatch):
    """Issue 15, item 10: an upload larger than the working size is downscaled on arrival (here the working
    size is made 200 px so a small picture stands for a huge one); the in-painting runs on the downscaled
    picture and its result is pasted into the ORIGINAL at full resolution: outside the edit every pixel is
    the original's, bit for bit."""
    from studio.serve import inputs
    expect = playwright_api.expect
    monkeypatch.setattr(inputs, "WORKING_SIDE", 200)
    photo = picture_file(tmp_path, "huge.png", (500, 400), 7)
    open_tab(page, "Edit", "editor")
    upload(page, "editor", photo)
    expect(page.locator("#editor-note")).to_contain_text("downscaled to 200×160", timeout=60_000)
    expect(page.locator("#editor-note")).to_contain_text("into the original, full size")
    box = brush_ready(page, settle_ms=800)
    stroke(page, [(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5),
                  (box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.55)], steps=6)
    page.evaluate(JOINS)
    page.click("#inpaint-btn")
    page.wait_for_function("window.__joins.length > 0")
    value = next(v for v in page.evaluate("window.__joins.pop()")["data"] if isinstance(v, dict) and "background" in v)
    sent = np.asarray(Image.open(value["background"]["path"]).convert("RGB"))
    working, _ = inputs.read_upload(str(photo), app_limits())
    assert np.array_equal(sent, np.asarray(working.convert("RGB")))  # exactly the downscaled picture (no WebP)
    expect(page.locator("#status")).to_contain_text("full size 500×400", timeout=90_000)
    page.screenshot(path=ARTIFACTS / "13_full_size.png", full_page=True)

    full_path = max(Path(app.outputs).rglob("*_full.png"), key=lambda p: p.stat().st_mtime)
    working_path = full_path.with_name(full_path.name.replace("_full.png", ".png"))
    from studio.pngmeta import decode_array, read_png_extras, read_png_parameters
    assert read_png_parameters(full_path)["working_result"] == working_path.name
    full, original = np.asarray(Image.open(full_path).convert("RGB")), np.asarray(Image.open(photo).convert("RGB"))
    assert full.shape == original.shape == (400, 500, 3)
    alpha = decode_array(read_png_extras(working_path.read_bytes())["edit"]["alpha"]) > 0  # (160, 200): the edit
    assert alpha.any() and alpha.shape == (160, 200)
    grown = np.zeros_like(alpha)  # the edit, one working pixel wider (the upscale's reach), at full size
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            grown |= np.roll(np.roll(alpha, dy, 0), dx, 1)
    edit = np.repeat(np.repeat(grown, 5, 0), 5, 1)[::2, ::2]  # 160x200 -> 400x500 (x2.5)
    assert np.array_equal(full[~edit], original[~edit])  # outside the edit: the original, bit for bit
    assert (full[edit] != original[edit]).any()  # inside it: the in-painting


def test_an_edit_of_a_huge_upload_shows_its_working_size_and_offers_the_full_size_file(page, app, tmp_path,
                                                                                        monkeypatch):
    """Issue 15: the full-size copy of an edit of a huge upload (8000 px, say) was shown whole in Result and as
    a History thumbnail. Result shows the working-size picture; the full file is a download, its size in words,
    byte for byte the saved file; History lists the working-size result alone and offers the download too."""
    from studio.serve import inputs
    expect = playwright_api.expect
    monkeypatch.setattr(inputs, "WORKING_SIDE", 200)  # a 500x400 picture stands for a huge one
    photo = picture_file(tmp_path, "huge.png", (500, 400), 11)
    open_tab(page, "Edit", "editor")
    upload(page, "editor", photo)
    expect(page.locator("#editor-note")).to_contain_text("downscaled to 200×160", timeout=60_000)
    box = brush_ready(page, settle_ms=800)
    stroke(page, [(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5),
                  (box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.5)], steps=4)
    page.click("#inpaint-btn")
    expect(page.locator("#status")).to_contain_text("full size 500×400", timeout=90_000)

    full_path = max(Path(app.outputs).rglob("*_full.png"), key=lambda p: p.stat().st_mtime)
    working_path = full_path.with_name(full_path.name.replace("_full.png", ".png"))
    shown = page.locator("#results img")
    expect(shown).to_have_count(1)  # the working-size result alone ...
    page.wait_for_function("(img => img && img.naturalWidth > 0)(document.querySelector('#results img'))")
    assert page.evaluate("(img => [img.naturalWidth, img.naturalHeight])(document.querySelector('#results img'))") \
        == [200, 160]
    offer = page.locator("#full-file")  # ... and the full-size file to download, its size in words
    expect(offer).to_be_visible(timeout=30_000)
    kb = f"{full_path.stat().st_size / 1024:.1f} KB"  # (a few hundred KB here: 8000 px would say MB)
    expect(offer).to_contain_text(f"Full size 500×400 px · {kb}")
    with page.expect_download() as got:
        offer.locator("a").first.click()
    assert Path(got.value.path()).read_bytes() == full_path.read_bytes()
    page.screenshot(path=ARTIFACTS / "14_full_size_download.png", full_page=True)

    # History: the working-size result, no thumbnail of the full-size copy; opening it offers the download
    page.reload()
    page.wait_for_selector("#generate-btn")
    pictures = [p for p in Path(app.outputs).rglob("*.png") if not p.name.endswith("_full.png")]
    expect(page.locator("#history-label")).to_contain_text(f"of {len(pictures)} saved results", timeout=30_000)
    first = page.locator("#history .thumbnail-item").first
    expect(first).to_contain_text("inpaint")
    assert working_path.name in (first.locator("img").get_attribute("src") or "")
    expect(page.locator("#full-file")).to_be_hidden()
    first.click()
    expect(page.locator("#full-file")).to_contain_text(kb, timeout=30_000)


def picture_edges(page, box, colour=(0, 200, 0)):
    """Where the editor shows a picture of one solid colour: (left, top, right, bottom) in page pixels, found in a
    screenshot of its canvas (the editor's own cursor is no guide: its CSS cursor changes ~20 picture pixels in)."""
    import io
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("RGB")).astype(int)
    hit = (np.abs(shot - np.array(colour)).sum(axis=2) < 40)
    cols, rows = np.nonzero(hit.any(axis=0))[0], np.nonzero(hit.any(axis=1))[0]
    assert cols.size and rows.size, "the picture is not on the canvas"
    return (float(box["x"] + cols[0]), float(box["y"] + rows[0]), float(box["x"] + cols[-1] + 1),
            float(box["y"] + rows[-1] + 1))


def green_in_edit(page, tmp_path, size):
    """A picture of one colour in Edit, the brush picked: its (left, top, right, bottom) on the page."""
    path = tmp_path / "green.png"
    Image.new("RGB", size, (0, 200, 0)).save(path)
    open_tab(page, "Edit", "editor")
    upload(page, "editor", path)
    playwright_api.expect(page.locator("#editor-note")).to_contain_text(f"{size[0]}×{size[1]}", timeout=60_000)
    box = brush_ready(page, settle_ms=800)
    page.mouse.move(box["x"] + 2, box["y"] + 2)  # (the brush's cursor is not over the picture)
    edges = picture_edges(page, box)
    assert (edges[2] - edges[0]) / size[0] > 1.5, edges  # magnified: a picture pixel is more than a screen pixel
    page.evaluate(JOINS)
    return edges


def test_strokes_on_and_from_beside_the_pictures_edge_paint_its_first_column(page, app, tmp_path):
    """Issue 15, item 11: a stroke along the picture's edge (as one paints a border) must paint from its first
    (last) column on, not from a dozen pixels in; and the editor's brush refuses a press beside its picture, so a
    stroke begun just off it was dropped, then started where the canvas's cursor changed, ~20 picture pixels in.
    On a 64x192 picture: pressed one screen pixel inside the left and right edges and drawn down along them (the
    top third), the request's mask reaches columns 0 and 63 and is one brush radius (12 px) wide; drawn from 10
    screen pixels left of the picture along a row near the bottom to its middle, it starts at column 0."""
    left, top, right, bottom = green_in_edit(page, tmp_path, (64, 192))
    down = lambda f: top + (bottom - top) * f  # noqa: E731
    for x in (left + 1, right - 1):
        stroke(page, [(x, down(0.1)), (x, down(0.3))], steps=4)
        page.wait_for_timeout(300)
    stroke(page, [(left - 10, down(0.8)), (left - 4, down(0.8)), ((left + right) / 2, down(0.8))], steps=5)
    page.wait_for_timeout(300)
    page.click("#inpaint-btn")
    _, _, _, layers = sent_editor(page)
    assert layers and layers[0].any(), "no stroke reached the request"
    mask = layers[0]
    assert mask.shape == (192, 64)
    cols = np.nonzero(mask[:100].any(axis=0))[0]  # the strokes along the edges
    lefts, rights = cols[cols < 32], cols[cols >= 32]
    radius = 12  # the Edit brush's default size, in picture pixels
    assert lefts.size and lefts.min() == 0 and lefts.max() <= radius + 1, lefts
    assert rights.size and rights.max() == 63 and rights.min() >= 63 - radius - 1, rights
    cols = np.nonzero(mask[110:].any(axis=0))[0]  # the stroke from beside the picture
    assert cols.size and cols.min() == 0 and cols.max() >= 32, cols
