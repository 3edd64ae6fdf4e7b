"""Zero-shot editing on a tiny random model: in-painting, out-painting, variations, re-roll."""
import numpy as np
import pytest
import torch
from PIL import Image

from studio import editing as ed
from studio import images


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def photo(tiny_pipe):
    """A generated image (so the VQVAE can represent it), as PIL."""
    return tiny_pipe(class_labels=[2], generator=_gen(42)).images[0]


def _box_mask(size, box):
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def test_outside_the_mask_is_unchanged_and_inside_regenerated(tiny_pipe, photo):
    R = tiny_pipe.resolution
    mask = _box_mask((R, R), (64, 80, 160, 176))
    out = tiny_pipe.inpaint(photo, mask, generator=_gen(1), mask_blur=6, output_type="np")
    src = np.asarray(photo, dtype=np.float32) / 255
    res = out.images[0]
    band = images.feather(images.mask_to_array(mask, (R, R)), 6) > 0
    assert np.abs(res - src)[~band].max() <= 1 / 255
    assert np.abs(res - src)[np.asarray(mask) > 0].mean() > 0.02


def test_empty_mask_returns_the_input_and_full_mask_a_fresh_sample(tiny_pipe, photo):
    R = tiny_pipe.resolution
    same = tiny_pipe.inpaint(photo, Image.new("L", (R, R), 0), output_type="np")
    assert np.array_equal((same.images[0] * 255).round().astype(np.uint8), np.asarray(photo))
    full = tiny_pipe.inpaint(photo, Image.new("L", (R, R), 255), generator=_gen(9), mask_blur=0, output_type="pt")
    fresh = tiny_pipe(class_labels=-1, guidance_scale=0.0, generator=_gen(9), output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(full.tokens, fresh.tokens))


def test_odd_sizes_rgba_and_grey_inputs(tiny_pipe):
    rng = np.random.default_rng(0)
    for mode, size in (("RGBA", (301, 177)), ("L", (97, 203)), ("RGB", (1000, 90))):
        arr = rng.integers(0, 255, (size[1], size[0], 4 if mode == "RGBA" else (3 if mode == "RGB" else 1)),
                           dtype=np.uint8).squeeze()
        if mode == "RGBA":
            arr[..., 3] = 255
        im = Image.fromarray(arr, mode)
        mask = _box_mask(size, (size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2))
        for area in ("masked", "whole"):
            out = tiny_pipe.inpaint(im, mask, generator=_gen(), mask_blur=2, inpaint_area=area)
            assert out.images[0].size == size and out.images[0].mode == "RGB"
            src = np.asarray(im.convert("RGB"), dtype=np.int16)
            res = np.asarray(out.images[0], dtype=np.int16)
            far = images.feather(images.mask_to_array(mask, size), 2) == 0
            assert np.abs(res - src)[far].max() <= 1


def test_bad_masks_are_refused_clearly(tiny_pipe, photo):
    with pytest.raises(ValueError, match="the mask is 10x10 but the image is"):
        tiny_pipe.inpaint(photo, Image.new("L", (10, 10), 255))
    with pytest.raises(ValueError, match="inpaint_area"):
        tiny_pipe.inpaint(photo, Image.new("L", photo.size, 255), inpaint_area="all")


def test_official_zero_shot_rule_reproduces_the_notebook_tokens(official, tiny_pipe):
    """Greedy in-painting of the notebook's box gives the notebook's tokens (with and without a class)."""
    from refweights import make_reference_images

    img = make_reference_images()[0].add(1).mul(0.5).permute(1, 2, 0).numpy()  # float, as the notebook encodes it
    regen = ~official["inpaint_mask_last"].bool().numpy()
    cell = tiny_pipe.resolution // tiny_pipe.patch_nums[-1]
    mask = np.kron(regen.astype(np.float32), np.ones((cell, cell), np.float32))  # latent-aligned pixel mask
    masks = ed.scale_keep_masks(ed.latent_regen_mask(mask, tiny_pipe.patch_nums[-1]), tiny_pipe.patch_nums)
    for ours, theirs in zip(masks, official["inpaint_masks"]):
        assert torch.equal(ours.view(theirs.shape), theirs.bool())
    for key, label in (("inpaint", None), ("inpaint_cls", 3)):
        out = tiny_pipe.inpaint(img, mask, class_labels=label, guidance_scale=3.0, top_k=1, top_p=0.0,
                                mask_blur=0, inpaint_area="whole", generator=_gen(0))
        for si, (a, b) in enumerate(zip(out.tokens, official[f"{key}_tokens"])):
            assert torch.equal(a, b), f"{key} scale {si}"


def test_outpaint_returns_the_requested_size_with_the_original_in_place(tiny_pipe, photo):
    small = photo.resize((64, 48))
    windows = []
    out = tiny_pipe.outpaint(small, left=20, right=90, top=10, bottom=0, generator=_gen(3),
                             on_window=lambda i, c: windows.append(c.size))
    res = out.images[0]
    assert res.size == (64 + 110, 48 + 10)
    assert np.array_equal(np.asarray(res)[10:58, 20:84], np.asarray(small))
    assert len(windows) >= 2 and all(s == res.size for s in windows)
    new = np.asarray(res, dtype=np.float32)[:, 84:]
    assert new.std() > 1.0  # the extension is content, not a flat fill
    with pytest.raises(ValueError, match="right must be"):
        tiny_pipe.outpaint(small, right=-5)


def test_panorama_from_one_image(tiny_pipe, photo):
    out = tiny_pipe.outpaint(photo.resize((64, 64)), right=192, generator=_gen(4))
    assert out.images[0].size == (256, 64)


def test_variations_keep_structure_slider(tiny_pipe, photo):
    S = tiny_pipe.num_scales
    tokens = tiny_pipe.encode(photo)
    back = tiny_pipe.variations(photo, keep_scales=S, generator=_gen(5), output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(back.tokens, tokens))
    fresh = tiny_pipe.variations(photo, keep_scales=0, generator=_gen(5))
    assert not torch.equal(fresh.tokens[0], tokens[0]) or not torch.equal(fresh.tokens[-1], tokens[-1])
    mid = tiny_pipe.variations(photo, keep_scales=4, generator=_gen(5))
    assert all(torch.equal(a, b) for a, b in zip(mid.tokens[:4], tokens[:4]))
    with pytest.raises(ValueError, match="keep_scales"):
        tiny_pipe.variations(photo, keep_scales=S + 1)


def test_reroll_from_the_last_scale_is_identity_and_from_zero_is_new(tiny_pipe):
    first = tiny_pipe(class_labels=[4], generator=_gen(6), output_type="pt")
    same = tiny_pipe.reroll(first.tokens, from_scale=tiny_pipe.num_scales, class_labels=4, generator=_gen(99),
                            output_type="pt")
    assert (same.images - first.images).abs().max() < 1e-5
    new = tiny_pipe.reroll(first.tokens, from_scale=0, class_labels=4, generator=_gen(99), output_type="pt")
    assert (new.images - first.images).abs().max() > 0.05
    part = tiny_pipe.reroll(first.tokens, from_scale=5, class_labels=4, generator=_gen(99))
    assert all(torch.equal(a, b) for a, b in zip(part.tokens[:5], first.tokens[:5]))
    assert not torch.equal(part.tokens[-1], first.tokens[-1])


def test_editing_streams_every_scale(tiny_pipe, photo):
    seen = []
    tiny_pipe.inpaint(photo, _box_mask(photo.size, (0, 0, 100, 100)), generator=_gen(),
                      callback_on_scale_end=lambda e: seen.append(e.scale_index))
    assert seen == list(range(tiny_pipe.num_scales))


def test_one_generator_per_image_makes_each_image_as_it_would_be_alone(tiny_pipe):
    """The studio seeds image i of a batch with seed + i: a batch of 3 from seeds 5, 6, 7 holds the images
    that seed 6 or 7 alone make (random classes and more_smooth's Gumbel noise included)."""
    for smooth in (False, True):
        batch = tiny_pipe(generator=[_gen(5), _gen(6), _gen(7)], num_images_per_label=3, top_k=0, top_p=0,
                          more_smooth=smooth, output_type="np")
        for i, seed in enumerate((6, 7), start=1):
            alone = tiny_pipe(generator=_gen(seed), top_k=0, top_p=0, more_smooth=smooth, output_type="np")
            assert batch.class_labels[i] == alone.class_labels[0]
            assert all(torch.equal(b[i], a[0]) for b, a in zip(batch.tokens, alone.tokens))
            assert np.abs(batch.images[i] - alone.images[0]).max() < 1 / 255  # batched float sums differ a little
    with pytest.raises(ValueError, match="one per image"):
        tiny_pipe(generator=[_gen(1)], num_images_per_label=2)


def test_an_inpainting_rerolls_inside_its_mask_and_pastes_back(tiny_pipe, photo):
    """A re-roll of an in-painting from scale k keeps the result outside the edit exactly and the coarse
    scales inside it; the plan survives the trip through the PNG's record."""
    R = tiny_pipe.resolution
    mask = _box_mask((R, R), (64, 80, 160, 176))
    edited = tiny_pipe.inpaint(photo, mask, generator=_gen(1), mask_blur=4)
    plan = ed.InpaintPlan.from_record(edited.images[0], edited.edit.record())
    k = 3
    again = tiny_pipe.reroll(edited.tokens, from_scale=k, edit=plan, generator=_gen(2), output_type="np")
    src = np.asarray(edited.images[0], dtype=np.float32) / 255
    res = again.images[0]
    outside = plan.alpha == 0
    assert np.abs(res - src)[outside].max() <= 1 / 255
    assert np.abs(res - src)[np.asarray(mask) > 0].mean() > 0.01  # the edited area was resampled
    keep = plan.keep_masks(tiny_pipe.patch_nums)
    for si, (a, b) in enumerate(zip(again.tokens, edited.tokens)):
        kept = torch.ones_like(keep[si]) if si < k else keep[si]
        assert torch.equal(a[kept], b[kept])
