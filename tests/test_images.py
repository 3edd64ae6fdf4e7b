"""studio.images and the editing plans built on it: what a user sees of masks, crops and paste-back."""
import numpy as np
import pytest
import torch
from PIL import Image

from studio import editing as ed
from studio import images as im


def _dot(size=41, at=(20, 20)):
    m = np.zeros((size, size), np.float32)
    m[at] = 1.0
    return m


def _dist_to(mask):
    """Euclidean distance of every pixel to the nearest masked pixel."""
    ys, xs = np.nonzero(mask > 0.5)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return np.sqrt((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(-1)


# ---------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("r", [1, 3, 8])
def test_grow_is_round_and_reaches_exactly_r(r):
    grown = im.grow_mask(_dot(), r)
    d = _dist_to(_dot())
    assert set(np.unique(grown)) == {0.0, 1.0} and grown.dtype == np.float32
    assert (grown[d <= r - 0.5] == 1).all() and (grown[d > r + 0.5] == 0).all()  # a disc, not a square
    assert np.array_equal(grown, grown.T) and np.array_equal(grown, grown[::-1])
    assert abs(grown.sum() - np.pi * r * r) < 2.5 * np.pi * r + 1  # the disc's area, not (2r+1)^2
    if r >= 3:
        assert grown[20 - r, 20 - r] == 0  # no square corners


def test_shrink_undoes_grow_of_a_box_and_removes_thin_strokes():
    m = np.zeros((60, 80), np.float32)
    m[20:40, 10:50] = 1
    m[5, :] = 1  # a one-pixel stroke
    assert np.array_equal(im.grow_mask(im.grow_mask(m[10:, :], 4), -4), m[10:, :])  # closing a box: the box
    shrunk = im.grow_mask(m, -2)
    assert not shrunk[5].any()
    assert np.array_equal(shrunk[22:38, 12:48], np.ones((16, 36), np.float32)) and shrunk.sum() == 16 * 36
    edge = np.zeros((20, 20), np.float32)
    edge[:, :6] = 1  # touches the image border: shrinking does not eat in from the border
    assert np.array_equal(im.grow_mask(edge, -2)[:, :4], np.ones((20, 4), np.float32))
    assert not im.grow_mask(edge, -2)[:, 4:].any()
    assert np.array_equal(im.grow_mask(m * 0.7, 0), (m > 0.5).astype(np.float32))


@pytest.mark.parametrize("px", [1, 4, 7])
def test_feather_band_is_exactly_pixels_wide(px):
    m = np.zeros((50, 50), np.float32)
    m[15:35, 15:35] = 1
    a = im.feather(m, px)
    cheb = np.maximum(np.maximum(15 - np.arange(50), np.arange(50) - 34).clip(0)[:, None],
                      np.maximum(15 - np.arange(50), np.arange(50) - 34).clip(0)[None, :])
    inner = m.copy()
    inner[15 + px:35 - px, 15 + px:35 - px] = 2  # deeper than px inside
    assert (a[cheb > px] == 0).all() and (a[cheb == px][cheb[cheb == px] > 0] > 0).all()  # reaches px, no farther
    assert (a[inner == 2] == 1).all() and (a[(m == 1) & (inner != 2)] < 1).all()
    assert ((a >= 0) & (a <= 1)).all() and np.allclose(a, a.T)
    row = a[25, :25]
    assert (np.diff(row) >= -1e-7).all()  # rises monotonically into the mask
    assert np.array_equal(im.feather(m, 0), m)


def test_dilate_and_gaussian_blur():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    assert np.array_equal(np.argwhere(im.dilate(m, 2)).min(0), [2, 2]) and im.dilate(m, 2).sum() == 25  # Chebyshev
    assert im.dilate(m, 0) is m
    flat = np.full((20, 30, 3), 0.25, np.float32)
    assert np.allclose(im.gaussian_blur(flat, 1.2), 0.25, atol=1e-6)
    dot = np.zeros((21, 21), np.float32)
    dot[10, 10] = 1
    b = im.gaussian_blur(dot, 1.0)
    assert abs(b.sum() - 1) < 1e-5 and b[10, 10] == b.max() and np.allclose(b, b.T) and b[10, 14] == 0  # 2.5 sigma


def test_mask_reading_rgba_grey_and_size_check():
    painted = np.zeros((8, 10, 4), np.uint8)
    painted[2:4, 3:6] = (255, 0, 0, 255)  # a red stroke on a transparent layer
    assert np.array_equal(im.mask_to_array(Image.fromarray(painted, "RGBA"), (10, 8)) > 0, painted[..., 3] > 0)
    assert im.mask_to_array(np.full((8, 10), 255, np.uint8), (10, 8)).max() == 1.0
    with pytest.raises(ValueError, match="the mask is 10x8 but the image is 8x8"):
        im.mask_to_array(np.zeros((8, 10)), (8, 8))


# ---------------------------------------------------------------------------------------------
# conversions


def test_pictures_to_model_tensors_and_back():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    x, single = im.to_tensor_batch(Image.fromarray(u8))
    assert single and x.shape == (1, 3, 12, 12)
    assert torch.equal(x, torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert np.array_equal(im.tensor_to_images(x)[0], u8)
    assert np.array_equal(np.asarray(im.tensor_to_output(x, "pil")[0]), u8)
    f = rng.random((12, 12, 3)).astype(np.float32)  # floats are taken exactly, not rounded to 8 bits
    assert torch.equal(im.to_tensor_batch(f)[0], torch.from_numpy(f).permute(2, 0, 1)[None] * 2 - 1)
    assert np.allclose(im.tensor_to_output(im.to_tensor_batch(f)[0], "np")[0], f, atol=1e-6)
    batch, single = im.to_tensor_batch(np.stack([u8, u8]))
    assert not single and batch.shape == (2, 3, 12, 12)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent: white
    assert (im.to_float_rgb(Image.fromarray(rgba, "RGBA")) == 1).all()
    assert im.to_float_rgb(np.full((4, 5), 128, np.uint8)).shape == (4, 5, 3)  # grey -> RGB
    assert im.to_tensor_batch(Image.fromarray(u8), size=8)[0].shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="image tensor must be"):
        im.to_tensor_batch(torch.zeros(1, 3, 5, 5), size=8)
    with pytest.raises(ValueError, match="output_type"):
        im.float_to_output(f[None], "latent")


def test_resize_keeps_floats_and_range():
    ramp = np.tile(np.linspace(0, 1, 97, dtype=np.float32)[None, :, None], (31, 1, 3))
    small = im.resize(ramp, (40, 13))
    assert small.shape == (13, 40, 3) and small.dtype == np.float32
    assert not np.allclose(small * 255, (small * 255).round())  # not rounded to 8 bits
    big = im.resize(np.eye(8, dtype=np.float32), (64, 64))  # Lanczos rings: clipped
    assert big.min() >= 0 and big.max() <= 1
    assert im.resize(ramp, (97, 31)) is ramp


# ---------------------------------------------------------------------------------------------
# in-painting's crop and paste-back


@pytest.mark.parametrize("shape,box,area", [((300, 420), (200, 120, 260, 170), "masked"),
                                            ((90, 60), (10, 30, 30, 50), "masked"),  # smaller than the model
                                            ((300, 420), (0, 0, 40, 300), "masked"),  # at the border
                                            ((150, 200), (60, 60, 100, 100), "whole")])
def test_paste_back_keeps_every_outside_pixel_exactly(shape, box, area):
    rng = np.random.default_rng(1)
    H, W = shape
    image = rng.random((H, W, 3)).astype(np.float32)
    mask = np.zeros((H, W), np.float32)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    plan = ed.plan_inpaint(image, mask, resolution=128, grid=8, mask_blur=5, mask_grow=3, inpaint_area=area,
                           padding=16)
    assert plan.model_image.shape == (128, 128, 3)
    band = im.feather(im.grow_mask(mask, 3), 5) > 0
    if area == "masked":
        r = plan.region
        assert r.side >= min(128, max(H, W))  # small masks are not upscaled
        ys, xs = np.nonzero(band)
        assert r.x0 <= xs.min() and r.y0 <= ys.min() and xs.max() < r.x0 + r.side and ys.max() < r.y0 + r.side
    generated = rng.random((128, 128, 3)).astype(np.float32)
    out = plan.paste(generated)
    assert out.shape == image.shape and np.array_equal(out[~band], image[~band])  # bit for bit
    inside = im.grow_mask(mask, -6 + 3) > 0  # deeper than the feather band: the model's pixels
    assert np.abs(out[inside] - image[inside]).mean() > 0.1
    assert plan.regen.any() and not plan.regen.all()


def test_masked_area_crop_shows_the_model_the_region_at_full_detail():
    image = np.zeros((400, 400, 3), np.float32)
    image[::2] = 1.0  # fine stripes: visible only if the crop is not shrunk
    mask = np.zeros((400, 400), np.float32)
    mask[190:210, 190:210] = 1
    masked = ed.plan_inpaint(image, mask, 128, 8, mask_blur=4, inpaint_area="masked", padding=8)
    whole = ed.plan_inpaint(image, mask, 128, 8, mask_blur=4, inpaint_area="whole")
    assert masked.region.side == 128 and np.array_equal(masked.model_image, im.crop(image, masked.region))
    assert masked.model_image.std() > 0.45 > whole.model_image.std()


def test_outpaint_canvas_never_touches_the_original():
    rng = np.random.default_rng(2)
    image = rng.random((40, 50, 3)).astype(np.float32)
    canvas = ed.OutpaintCanvas(image, left=10, right=60, top=5, bottom=0)
    windows = 0
    while (win := canvas.next_window()) is not None:
        picture, mask = canvas.window(win)
        assert picture.size == (win.side, win.side) and 0 < mask.mean() < 1
        canvas.merge(win, rng.random((win.side, win.side, 3)).astype(np.float32), mask_blur=6)
        assert np.array_equal(canvas.canvas[5:45, 10:60], image)
        windows += 1
    assert windows >= 2 and canvas.known.all() and canvas.result().shape == (45, 120, 3)
    with pytest.raises(ValueError, match="top must be"):
        ed.OutpaintCanvas(image, top=1.5)


def test_seam_matched_continues_the_surroundings_colours_and_keeps_the_original():
    """An edit whose colours are off (a cast, as a model's result often is) meets its surroundings without a
    step: the seam's difference falls to that of the edit's own neighbouring pixels; the known pixels are
    untouched, and an edit with no known border is left as it is."""
    from studio.images import blend, feather, seam_matched

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128] / 128.0
    original = np.stack([0.3 + 0.3 * xx, 0.5 + 0.2 * yy, 0.4 + 0.1 * np.sin(6 * xx)], -1).astype(np.float32)
    cast = np.array([0.15, -0.1, 0.2], np.float32) * (0.5 + 0.5 * yy[..., None])
    generated = (original + cast + rng.normal(0, 0.01, original.shape)).astype(np.float32)
    mask = np.zeros((96, 128), np.float32)
    mask[24:72, 40:104] = 1  # a box in the middle (an in-painting)
    for alpha in (mask, feather(mask, 4)):
        before = blend(original, generated, alpha)
        after = blend(original, seam_matched(original, generated, alpha), alpha)
        assert np.array_equal(after[alpha == 0], original[alpha == 0])

        def step(x):  # across the box's left and right edges
            return float(np.abs(x[24:72, 39] - x[24:72, 40]).mean() + np.abs(x[24:72, 103] - x[24:72, 104]).mean())

        own = step(generated)  # the edit's own gradient there
        assert step(after) < 1.5 * own, (step(before), step(after), own)
        if alpha is mask:
            assert step(before) > 5 * own, (step(before), own)
        else:  # a feathered band hides the step, half-way: its pixels still carry the cast unless matched
            band = (alpha > 0) & (alpha < 1)
            cast_left = lambda x: float(np.abs(x - original)[band].mean())  # noqa: E731
            assert cast_left(after) < 0.3 * cast_left(before), (cast_left(after), cast_left(before))
    everything = np.ones((96, 128), np.float32)
    assert np.array_equal(seam_matched(original, generated, everything), generated)
