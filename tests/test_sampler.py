"""Behaviour of the sampler and the pipeline API on a tiny random model."""
import numpy as np
import pytest
import torch
from PIL import Image

RAMP_AND_LIST = [2.0, [0.0, 0.0, 3.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("guidance", RAMP_AND_LIST)
def test_kv_cache_sampler_matches_teacher_forced_forward(tiny_pipe, guidance):
    """Logits seen while sampling with the KV cache equal the full-sequence forward pass on the
    sampled tokens, guidance applied per scale (also when the guidance half is dropped early)."""
    seen = {}

    def hook(si, logits):
        seen[si] = logits.clone()
        return logits

    labels = torch.tensor([1, 4, 9])
    res = tiny_pipe.var.sample(tiny_pipe.vae.quantize, labels, guidance_scale=guidance, top_k=20, top_p=0.9,
                               generator=_gen(3), logits_hook=hook)
    x_in = tiny_pipe.vae.quantize.tokens_to_var_input(res.tokens)
    with torch.no_grad():
        cond = tiny_pipe.var(labels, x_in)
        null = tiny_pipe.var(torch.full_like(labels, tiny_pipe.num_classes), x_in)
    ts = tiny_pipe.var.guidance_per_scale(guidance)
    for si, (bg, ed) in enumerate(tiny_pipe.var.begin_ends):
        t = ts[si]
        expect = (1 + t) * cond[:, bg:ed] - t * null[:, bg:ed] if t else cond[:, bg:ed]
        assert (seen[si] - expect).abs().max().item() < 1e-4, f"scale {si}"


def test_without_kv_cache_gives_the_same_samples(tiny_pipe):
    a = tiny_pipe(class_labels=[2, 5], top_k=30, top_p=0.9, generator=_gen(1), output_type="pt")
    b = tiny_pipe(class_labels=[2, 5], top_k=30, top_p=0.9, generator=_gen(1), output_type="pt", use_kv_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert (a.images - b.images).abs().max() < 1e-4


def test_seeds_are_reproducible_and_distinct(tiny_pipe):
    a = tiny_pipe(class_labels=3, generator=_gen(7), output_type="pt")
    b = tiny_pipe(class_labels=3, generator=_gen(7), output_type="pt")
    c = tiny_pipe(class_labels=3, generator=_gen(8), output_type="pt")
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not torch.equal(a.tokens[-1], c.tokens[-1])
    assert (a.images - c.images).abs().max() > 0.05


def test_callback_sees_every_scale_and_can_stop(tiny_pipe):
    events = []
    out = tiny_pipe(class_labels=[1, 2], generator=_gen(), callback_on_scale_end=events.append)
    assert [e.scale_index for e in events] == list(range(tiny_pipe.num_scales))
    for e in events:
        assert e.tokens.shape == (2, e.patch_num ** 2) and e.f_hat.shape[0] == 2
    assert torch.equal(events[-1].tokens, out.tokens[-1]) and not out.stopped_early

    stopped = tiny_pipe(class_labels=[1, 2], generator=_gen(), output_type="pt",
                        callback_on_scale_end=lambda e: e.scale_index == 3)
    assert stopped.stopped_early and len(stopped.tokens) == 4
    assert stopped.images.shape == (2, 3, tiny_pipe.resolution, tiny_pipe.resolution)
    # the early image is the decode of the coarse scales made so far
    coarse = tiny_pipe.decode(stopped.tokens).add(1).mul(0.5)
    assert (stopped.images - coarse).abs().max() < 1e-4


def test_known_tokens_are_forced_and_the_rest_sampled(tiny_pipe):
    ref = tiny_pipe(class_labels=[0], generator=_gen(11), output_type="pt")
    full = tiny_pipe(class_labels=[6], generator=_gen(12), known_tokens=ref.tokens, output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(full.tokens, ref.tokens))
    assert (full.images - ref.images).abs().max() < 1e-4  # everything forced: the input comes back

    masks = [torch.rand(1, pn * pn, generator=_gen(si)) < 0.5 for si, pn in enumerate(tiny_pipe.patch_nums)]
    part = tiny_pipe(class_labels=[6], generator=_gen(13), known_tokens=ref.tokens, known_mask=masks)
    for t, k, m in zip(part.tokens, ref.tokens, masks):
        assert torch.equal(t[m], k[m])
    changed = sum(int((t[~m] != k[~m]).sum()) for t, k, m in zip(part.tokens, ref.tokens, masks))
    assert changed > 0.3 * sum(int((~m).sum()) for m in masks)


def test_prefix_forcing_keeps_coarse_structure(tiny_pipe):
    ref = tiny_pipe(class_labels=[2], generator=_gen(21))
    k = 4
    rerolled = tiny_pipe(class_labels=[2], generator=_gen(22), known_tokens=ref.tokens[:k])
    assert all(torch.equal(a, b) for a, b in zip(rerolled.tokens[:k], ref.tokens[:k]))
    assert not torch.equal(rerolled.tokens[-1], ref.tokens[-1])


def test_zero_guidance_forms_agree(tiny_pipe):
    a = tiny_pipe(class_labels=[4], guidance_scale=0.0, generator=_gen(5))
    b = tiny_pipe(class_labels=[4], guidance_scale=[0.0] * tiny_pipe.num_scales, generator=_gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_output_types_and_batching(tiny_pipe):
    R = tiny_pipe.resolution
    pil = tiny_pipe(class_labels=["class 1", 3], num_images_per_label=2, generator=_gen())
    assert pil.class_labels == [1, 1, 3, 3]
    assert len(pil.images) == 4 and all(im.size == (R, R) and im.mode == "RGB" for im in pil.images)
    arr = tiny_pipe(class_labels=1, generator=_gen(), output_type="np").images
    assert arr.shape == (1, R, R, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = tiny_pipe(class_labels=1, generator=_gen(), output_type="pt").images
    assert pt.shape == (1, 3, R, R)
    pil1 = tiny_pipe(class_labels=1, generator=_gen()).images[0]
    assert np.array_equal(np.asarray(pil1), (arr[0] * 255).round().astype(np.uint8))
    uncond = tiny_pipe(class_labels=-1, generator=_gen())
    assert uncond.class_labels == [tiny_pipe.num_classes]


@pytest.mark.parametrize("kwargs,message", [
    (dict(class_labels="no such class"), "unknown class name"),
    (dict(class_labels=["class"]), "did you mean"),
    (dict(class_labels=99), "out of range"),
    (dict(class_labels=[]), "empty"),
    (dict(class_labels=1, top_p=1.5), "top_p"),
    (dict(class_labels=1, top_k=-3), "top_k"),
    (dict(class_labels=1, guidance_scale=-1.0), "guidance_scale"),
    (dict(class_labels=1, guidance_scale=float("nan")), "guidance_scale"),
    (dict(class_labels=1, guidance_scale=[1.0, 2.0]), "scales"),
    (dict(class_labels=1, num_images_per_label=0), "num_images_per_label"),
    (dict(class_labels=1, output_type="jpeg"), "output_type"),
])
def test_bad_arguments_raise_clear_errors(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**kwargs)


def test_encode_accepts_any_size_and_mode(tiny_pipe):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (37, 91, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 255, (300, 200), dtype=np.uint8), "L")
    tokens = tiny_pipe.encode([rgba, grey])
    assert [t.shape for t in tokens] == [(2, pn * pn) for pn in tiny_pipe.patch_nums]
    with pytest.raises(ValueError, match="image tensor must be"):
        tiny_pipe.encode(torch.zeros(1, 3, 17, 17))
    with pytest.raises(ValueError, match="token ids"):
        tiny_pipe.decode([torch.full((1, 1), 10_000)])


def test_bfloat16_pipeline_runs_close_to_float32(tiny_pair):
    from studio.pipeline import VARPipeline

    vae, var = tiny_pair
    import copy
    p32 = VARPipeline(copy.deepcopy(vae), copy.deepcopy(var), [str(i) for i in range(10)])
    p16 = VARPipeline(copy.deepcopy(vae), copy.deepcopy(var), [str(i) for i in range(10)], dtype=torch.bfloat16)
    assert p16.var.dtype == torch.bfloat16 and p16.vae.quantize.embedding.weight.dtype == torch.float32
    ref = p32.encode(torch.zeros(1, 3, p32.resolution, p32.resolution))
    img32 = p32.decode(ref)
    img16 = p16.decode(ref)
    assert img16.dtype == torch.float32 and (img16 - img32).abs().mean() < 0.05
    a = p32(class_labels=[1], top_k=1, generator=_gen())
    b = p16(class_labels=[1], top_k=1, generator=_gen())
    same = sum(int((x == y).sum()) for x, y in zip(a.tokens[:4], b.tokens[:4]))
    assert same >= 0.8 * sum(x.numel() for x in a.tokens[:4])  # coarse scales agree despite rounding


def test_class_index_refuses_the_id_past_the_last_class(tiny_pipe):
    """num_classes is the null (unconditional) class inside the model, not a class to ask for: it
    used to slip through class_index and give an unconditional image."""
    n = tiny_pipe.num_classes
    assert tiny_pipe.class_index(n - 1) == n - 1 and tiny_pipe.class_index(-1) == n
    with pytest.raises(ValueError, match=rf"class {n} is out of range: this model has classes 0..{n - 1}"):
        tiny_pipe.class_index(n)
    with pytest.raises(ValueError, match="out of range"):
        tiny_pipe(class_labels=[n], generator=_gen())


def _top_k_top_p_by_full_sort(logits, top_k, top_p):
    """The official rule as the notes give it: mask below the k-th logit, then sort the whole row
    ascending and mask the tail whose cumulative softmax is at most 1 - top_p (never the last)."""
    thr = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
    logits.masked_fill_(logits < thr, -torch.inf)
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)


@pytest.mark.parametrize("case", ["plain", "ties", "masked", "one_kept", "nucleus_of_one"])
def test_top_p_after_top_k_sorts_only_the_kept_logits_and_masks_exactly_as_the_full_sort(case):
    """The sampler sorts only the k logits top-k keeps (a quarter of a CPU image's time was the
    vocabulary's sort): the masked logits are bit for bit the full sort's, with ties (rounded
    logits: equal values on both sides of the cut), logits already -inf and the extreme settings."""
    from models.var import filter_top_k_top_p_

    g = torch.Generator().manual_seed(3)
    k, p = {"one_kept": (1, 0.95), "nucleus_of_one": (900, 0.01)}.get(case, (900, 0.95))
    for trial in range(4):
        logits = torch.randn(3, 37, 4096, generator=g) * (0.5 + 3 * trial)
        if case == "ties":
            logits = (logits * 4).round() / 4
        if case == "masked":
            logits[:, :, :3500] = -torch.inf  # fewer finite logits than k
        ours = filter_top_k_top_p_(logits.clone(), k, p)
        assert torch.equal(ours, _top_k_top_p_by_full_sort(logits.clone(), k, p)), (case, trial)
        assert bool((torch.isfinite(ours).sum(-1) >= 1).all())
