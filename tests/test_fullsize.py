"""Edits of a huge upload at full resolution (studio.fullsize): the edit, made at the working size, is
upscaled and pasted into the original; every pixel outside it is the original's, bit for bit."""
import numpy as np
from PIL import Image

from studio import fullsize


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_inpaint_paste_back_keeps_the_originals_pixels_outside_the_edit_at_full_size():
    original = _noise(1000, 800)
    working = original.resize((250, 200), Image.Resampling.LANCZOS)
    yy, xx = np.mgrid[:200, :250]
    dist = np.hypot(xx - 80, yy - 120)
    alpha = np.clip((24 - dist) / 6, 0, 1).astype(np.float32)  # a disc of radius 18..24 px, feathered
    result = np.asarray(working).copy()
    result[alpha > 0] = (255, 0, 0)
    full = fullsize.paste_inpaint(original, Image.fromarray(result), alpha)

    assert full.size == (1000, 800) and full.mode == "RGB"
    out, orig = np.asarray(full), np.asarray(original)
    fy, fx = np.mgrid[:800, :1000]
    far = np.hypot(fx / 4 - 80, fy / 4 - 120) > 24 + 1.5  # beyond the edit's weights (and bilinear's reach)
    assert np.array_equal(out[far], orig[far])  # bit for bit, at full size
    core = np.hypot(fx / 4 - 80, fy / 4 - 120) < 16
    assert np.abs(out[core].astype(int) - (255, 0, 0)).max() <= 2  # the edit, upscaled
    changed = np.any(out != orig, axis=-1)
    assert changed.sum() > 0.9 * np.pi * (18 * 4) ** 2  # the whole disc, at full resolution


def test_outpaint_paste_back_puts_the_original_exactly_into_the_upscaled_canvas():
    original = _noise(1000, 800, seed=1)
    working = original.resize((250, 200), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (250 + 16 + 8, 200 + 4), (10, 200, 30))
    canvas.paste(working, (16, 4))
    full = fullsize.paste_outpaint(original, canvas, left=16, right=8, top=4, bottom=0)
    assert full.size == (1000 + 64 + 32, 800 + 16)
    out = np.asarray(full)
    assert np.array_equal(out[16:, 64:1064], np.asarray(original))
    assert np.abs(out[:4, :].astype(int) - (10, 200, 30)).max() <= 2  # the new top margin, upscaled (away from Lanczos' reach)
    assert np.abs(out[16:, -16:].astype(int) - (10, 200, 30)).max() <= 2  # and the right one


def test_a_picture_is_matched_to_its_original_by_thumbnail_an_edited_one_is_not():
    working = _noise(512, 384, seed=2).resize((256, 192), Image.Resampling.LANCZOS)
    again = Image.open(__import__("io").BytesIO(_png(working)))  # as a browser sends it back: re-encoded
    assert fullsize.same_picture(fullsize.thumbnail(working), fullsize.thumbnail(again))
    edited = np.asarray(working).copy()
    edited[40:52, 60:70] = 0  # a small edit: one thumbnail block changes
    assert not fullsize.same_picture(fullsize.thumbnail(working), fullsize.thumbnail(Image.fromarray(edited)))


def _png(picture):
    import io
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
