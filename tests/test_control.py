"""Control adapters (models/control.py), their sampler hook, the preprocessors and the pipeline API,
on the tiny random model of conftest (no training, no downloads)."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.control import Control, ControlAdapter, ControlConfig, ControlHook, active_scales, control_loss
from studio import preprocess as pp
from studio.pipeline import VARPipeline
from studio.world import SEG_PALETTE, colorize_labels

SMALL = dict(widths=(4, 8), hidden=16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def adapter_for(var, ctype="canny", trained=False, seed=0, **kw):
    cfg = ControlConfig.for_var(var.cfg, ctype, num_classes=len(SEG_PALETTE) if ctype == "segmentation" else None,
                                **{**SMALL, **kw})
    torch.manual_seed(seed)
    a = ControlAdapter(cfg).eval()
    if trained:  # what a trained adapter looks like: non-zero injections
        g = _gen(seed + 100)
        with torch.no_grad():
            for lin in a.inject:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return a


def edge_map(seed=0, size=256):
    return (torch.rand(1, 1, size, size, generator=_gen(seed)) > 0.9).float()


def run(var, quantizer, hook=None, labels=(1, 4), guidance=2.0, seed=3, use_kv_cache=True):
    seen = {}

    def logits_hook(si, logits):
        seen[si] = logits.clone()
        return logits

    res = var.sample(quantizer, torch.tensor(labels), guidance_scale=guidance, top_k=20, top_p=0.9,
                     generator=_gen(seed), logits_hook=logits_hook, block_hook=hook, use_kv_cache=use_kv_cache)
    return res, seen


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def pipe(tiny_pair):
    vae, var = tiny_pair
    p = VARPipeline(vae, var, [f"class {i}" for i in range(var.cfg.num_classes)])
    p.add_control(adapter_for(var, "canny", trained=True, seed=1))
    p.add_control(adapter_for(var, "depth", trained=True, seed=2))
    p.add_control(adapter_for(var, "segmentation", trained=True, seed=3))
    return p


# ---------------------------------------------------------------------------------------------
# adapter + hook


def test_untrained_adapter_leaves_tokens_and_logits_identical(tiny_pair):
    vae, var = tiny_pair
    a = adapter_for(var)
    base, base_logits = run(var, vae.quantize)
    hook = ControlHook([Control(a, edge_map())], 2, var.begin_ends)
    ctrl, ctrl_logits = run(var, vae.quantize, hook)
    assert same(base.tokens, ctrl.tokens)
    assert all(torch.equal(base_logits[si], ctrl_logits[si]) for si in base_logits)
    x_in = vae.quantize.tokens_to_var_input(base.tokens)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(var(labels, x_in), var(labels, x_in, block_hook=hook))


def test_strength_zero_equals_no_control(tiny_pair, pipe):
    vae, var = tiny_pair
    base, base_logits = run(var, vae.quantize)
    hook = ControlHook([Control(adapter_for(var, trained=True), edge_map(), strength=0.0)], 2, var.begin_ends)
    ctrl, ctrl_logits = run(var, vae.quantize, hook)
    assert same(base.tokens, ctrl.tokens) and all(torch.equal(base_logits[s], ctrl_logits[s]) for s in base_logits)
    a = pipe(class_labels=2, generator=_gen(5), output_type="pt")
    b = pipe(class_labels=2, generator=_gen(5), output_type="pt", control_image=edge_map(), control_type="canny",
             control_strength=0.0)
    assert same(a.tokens, b.tokens) and torch.equal(a.images, b.images)


def test_trained_adapter_changes_outputs_and_strength_scales_the_injection(tiny_pair):
    vae, var = tiny_pair
    a = adapter_for(var, trained=True)
    base, base_logits = run(var, vae.quantize)
    hook = ControlHook([Control(a, edge_map())], 2, var.begin_ends)
    ctrl, ctrl_logits = run(var, vae.quantize, hook)
    assert (ctrl_logits[0] - base_logits[0]).abs().max() > 1e-3  # the very first scale already moves
    assert not same(base.tokens, ctrl.tokens)
    # the injection is strength * zero_linear(c): linear in the strength
    x = torch.randn(2, 9, var.C, generator=_gen(1))
    bg = var.begin_ends[2][0]
    d1 = ControlHook([Control(a, edge_map(), strength=1.0)], 2, var.begin_ends)(1, x, bg) - x
    d2 = ControlHook([Control(a, edge_map(), strength=2.5)], 2, var.begin_ends)(1, x, bg) - x
    assert d1.abs().max() > 1e-3 and torch.allclose(d2, 2.5 * d1, atol=1e-5)


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.7)])
def test_sampler_with_control_matches_teacher_forced_forward(tiny_pair, start, end):
    """KV-cache sampling under control = the teacher-forced pass with the same hook (what training
    sees), guidance (1+t) l(class, control) - t l(null, no control); no-cache sampling agrees."""
    vae, var = tiny_pair
    a = adapter_for(var, trained=True)
    labels = torch.tensor([1, 4])
    hook = ControlHook([Control(a, edge_map(), guidance_start=start, guidance_end=end)], 2, var.begin_ends)
    res, seen = run(var, vae.quantize, hook)
    x_in = vae.quantize.tokens_to_var_input(res.tokens)
    with torch.no_grad():
        cond = var(labels, x_in, block_hook=hook)
        null = var(torch.full_like(labels, var.num_classes), x_in)
    ts = var.guidance_per_scale(2.0)
    for si, (bg, ed) in enumerate(var.begin_ends):
        t = ts[si]
        expect = (1 + t) * cond[:, bg:ed] - t * null[:, bg:ed] if t else cond[:, bg:ed]
        assert (seen[si] - expect).abs().max().item() < 1e-4, f"scale {si}"
    slow, _ = run(var, vae.quantize, hook, use_kv_cache=False)
    assert same(res.tokens, slow.tokens)


def test_guidance_start_end_switch_control_off_at_the_expected_scales(tiny_pair):
    vae, var = tiny_pair
    assert active_scales(10, 0.0, 1.0) == [True] * 10
    assert active_scales(10, 0.3, 0.7) == [False] * 3 + [True] * 4 + [False] * 3
    assert active_scales(10, 0.0, 0.5) == [True] * 5 + [False] * 5
    with pytest.raises(ValueError, match="control_guidance_start < control_guidance_end"):
        active_scales(10, 0.6, 0.4)
    a = adapter_for(var, trained=True)
    hook = ControlHook([Control(a, edge_map(), guidance_start=0.3, guidance_end=0.7)], 2, var.begin_ends)
    for si, (bg, ed) in enumerate(var.begin_ends):
        x = torch.randn(4, ed - bg, var.C, generator=_gen(si))  # a guidance batch: 2 + 2 rows
        y = hook(0, x, bg)
        if 3 <= si <= 6:
            assert not torch.equal(y[:2], x[:2]) and torch.equal(y[2:], x[2:])  # uncond half: no control
        else:
            assert y is x
    base, base_logits = run(var, vae.quantize)
    ctrl, ctrl_logits = run(var, vae.quantize, hook)
    assert all(torch.equal(base_logits[si], ctrl_logits[si]) for si in range(3))
    assert not torch.equal(base_logits[3], ctrl_logits[3])
    # guide_control=False (CAR's rule): the unconditional half gets the control too
    car = ControlHook([Control(a, edge_map())], 2, var.begin_ends, guide_control=False)
    x = torch.randn(4, 4, var.C)
    y = car(0, x, var.begin_ends[1][0])  # scale 1: 2x2 tokens
    assert (y[2:] - x[2:]).abs().max() > 0 and torch.allclose(y[2:] - x[2:], y[:2] - x[:2], atol=1e-5)


def test_several_controls_add_up(tiny_pair):
    vae, var = tiny_pair
    canny, dep = adapter_for(var, "canny", trained=True, seed=1), adapter_for(var, "depth", trained=True, seed=2)
    dmap = torch.rand(1, 1, 256, 256, generator=_gen(9))
    ca, cb = Control(canny, edge_map(), strength=0.7), Control(dep, dmap, strength=1.3, guidance_end=0.5)
    both = ControlHook([ca, cb], 2, var.begin_ends)
    x = torch.randn(2, var.L, var.C, generator=_gen(2))  # the whole sequence, as the teacher-forced pass sees it
    d_both = both(1, x, 0) - x
    d_a = ControlHook([ca], 2, var.begin_ends)(1, x, 0) - x
    d_b = ControlHook([cb], 2, var.begin_ends)(1, x, 0) - x
    assert torch.allclose(d_both, d_a + d_b, atol=1e-5)
    late = var.begin_ends[5][0]
    assert d_b[:, late:].abs().max() == 0 and d_a[:, late:].abs().max() > 0  # depth stops at half the scales


def test_inject_blocks_selects_blocks(tiny_pair):
    _, var = tiny_pair
    a = adapter_for(var, trained=True, inject_blocks=[1])
    assert len(a.inject) == 1
    hook = ControlHook([Control(a, edge_map())], 1, var.begin_ends)
    x = torch.randn(1, 1, var.C)
    assert hook(0, x, 0) is x and not torch.equal(hook(1, x, 0), x)
    with pytest.raises(ValueError, match="inject_blocks"):
        ControlConfig.for_var(var.cfg, "canny", inject_blocks=[var.cfg.depth])


def test_control_loss_trains_the_adapter_only(tiny_pair):
    vae, var = tiny_pair
    for p in var.parameters():
        p.requires_grad_(False)
    tokens = [torch.randint(0, var.cfg.vocab_size, (2, pn * pn), generator=_gen(pn)) for pn in var.patch_nums]
    with torch.no_grad():  # the tokenizer is frozen too (its in-place residual sum is not for autograd)
        x_in = vae.quantize.tokens_to_var_input(tokens)
    targets, labels = torch.cat(tokens, 1), torch.tensor([1, 2])
    a = adapter_for(var)
    a.train()
    loss = control_loss(var, a, labels, x_in, edge_map().expand(2, -1, -1, -1), targets, class_drop_rate=0.0)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(var(labels, x_in).flatten(0, 1), targets.flatten())
    assert torch.equal(loss.detach(), base)  # zero-init: exactly the base model's loss
    loss.backward()
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().max() > 0 for lin in a.inject)
    assert all(p.grad is None for p in var.parameters())
    dropped = control_loss(var, a, labels, x_in, edge_map(), targets, class_drop_rate=1.0)
    assert torch.isfinite(dropped)
    with torch.no_grad():  # every scale weighing the same: the mean of the per-scale means
        ce = torch.nn.functional.cross_entropy(var(labels, x_in).transpose(1, 2), targets, reduction="none")
        per_scale = torch.stack([ce[:, bg:ed].mean() for bg, ed in var.begin_ends])
        equal = control_loss(var, a, labels, x_in, edge_map(), targets, class_drop_rate=0.0, scale_weighting="equal")
    assert equal.item() == pytest.approx(per_scale.mean().item(), rel=1e-5)
    assert equal.item() != pytest.approx(base.item(), rel=1e-3)


def test_token_weights():
    from models.var import token_weights

    pn = (1, 2, 4)
    tok, eq = token_weights(pn, "token"), token_weights(pn, "equal")
    assert tok.shape == eq.shape == (21,) and torch.allclose(tok, torch.full((21,), 1 / 21))
    assert torch.allclose(torch.stack([eq[0:1].sum(), eq[1:5].sum(), eq[5:].sum()]), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="'token' or 'equal'"):
        token_weights(pn, "coarse")


# ---------------------------------------------------------------------------------------------
# maps: resizing and refusals


def test_wrong_sized_maps_are_resized(tiny_pair, pipe):
    _, var = tiny_pair
    a = adapter_for(var)
    m = a.prepare_map(torch.rand(1, 1, 64, 48))
    assert m.shape == (1, 1, 256, 256) and m.dtype == torch.float32
    seg = adapter_for(var, "segmentation")
    ids = torch.randint(0, 8, (2, 37, 37), generator=_gen())
    oh = seg.prepare_map(ids)
    assert oh.shape == (2, 8, 256, 256) and torch.equal(oh.sum(1), torch.ones(2, 256, 256))  # nearest: one-hot
    assert set(oh.argmax(1).unique().tolist()) <= set(ids.unique().tolist())
    out = pipe(class_labels=1, generator=_gen(), output_type="pt", control_image=torch.rand(1, 50, 70),
               control_type="depth")
    assert out.images.shape == (1, 3, 256, 256)


@pytest.mark.parametrize("ctype,image,message", [
    ("canny", "edges.png", "must be a PIL image, a numpy array or a torch tensor"),
    ("canny", torch.zeros(1, 3, 64, 64), "must have 1 channel"),
    ("depth", np.zeros((64, 64, 2), np.float32), "has one channel"),
    ("depth", torch.full((1, 64, 64), float("nan")), "NaN"),
    ("segmentation", torch.rand(1, 64, 64), "integer class ids"),
    ("segmentation", np.random.rand(64, 64), "integer class ids"),
    ("segmentation", torch.full((64, 64), 40, dtype=torch.long), "this adapter knows 8 classes"),
])
def test_wrong_typed_maps_are_refused_clearly(pipe, ctype, image, message):
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=1, control_image=image, control_type=ctype)


@pytest.mark.parametrize("kwargs,message", [
    (dict(control_image=torch.zeros(1, 64, 64), control_type="hed"), "no 'hed' control adapter"),
    (dict(control_image=torch.zeros(1, 64, 64)), "give both or neither"),
    (dict(control_image=[torch.zeros(1, 64, 64)], control_type=["canny", "depth"]), "same length"),
    (dict(control_image=torch.zeros(1, 64, 64), control_type="canny", control_strength=-1.0), ">= 0"),
    (dict(control_image=torch.zeros(1, 64, 64), control_type="canny", control_guidance_start=0.8,
          control_guidance_end=0.2), "control_guidance_start"),
    (dict(control_image=torch.zeros(3, 1, 64, 64), control_type="canny", class_labels=[1, 2]), "3 maps for 2 images"),
])
def test_bad_control_arguments_raise_clear_errors(pipe, kwargs, message):
    kwargs.setdefault("class_labels", 1)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_pipeline_takes_several_controls_and_pictures(pipe):
    image = pp.user_map("segmentation", Image.fromarray(colorize_labels(np.arange(64 * 64).reshape(64, 64) % 8)))
    a = pipe(class_labels=[1, 2], generator=_gen(), output_type="pt")
    b = pipe(class_labels=[1, 2], generator=_gen(), output_type="pt",
             control_image=[edge_map(), image.preview, torch.rand(2, 1, 32, 32)],  # a painted layout, a batch of maps
             control_type=["canny", "segmentation", "depth"], control_strength=[1.0, 0.5, 2.0],
             control_guidance_end=[1.0, 0.5, 1.0])
    assert b.images.shape == a.images.shape and not same(a.tokens, b.tokens)


def test_inpaint_with_control(tiny_pair, pipe):
    vae, var = tiny_pair
    img = Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8))
    mask = np.zeros((80, 96), np.float32)
    mask[20:50, 30:70] = 1
    edges = pp.canny(img, size=None).map  # at the image's own size: cropped with it
    assert edges.shape == (1, 80, 96)
    plain = VARPipeline(vae, var, pipe.class_names)
    plain.add_control(adapter_for(var))  # untrained: the same in-painting as without control
    kw = dict(class_labels=1, output_type="np", padding=8)
    a = plain.inpaint(img, mask, generator=_gen(2), **kw)
    b = plain.inpaint(img, mask, generator=_gen(2), control_image=edges, control_type="canny", **kw)
    assert np.array_equal(a.images, b.images)
    c = pipe.inpaint(img, mask, generator=_gen(2), control_image=[edges, np.zeros((80, 96), np.int64)],
                     control_type=["canny", "segmentation"], **kw)
    assert c.images.shape == (1, 80, 96, 3)


def test_bundle_round_trip_keeps_the_adapters(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "b", dtype=torch.float32)
    assert (tmp_path / "b" / "control_canny.safetensors").exists()
    loaded = VARPipeline.from_pretrained(tmp_path / "b")
    assert sorted(loaded.controls) == ["canny", "depth", "segmentation"]
    for t, a in pipe.controls.items():
        sd = loaded.controls[t].state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items())
    b = tmp_path / "b"
    (b / "control_hed.safetensors").write_bytes((b / "control_canny.safetensors").read_bytes())
    with pytest.raises(ValueError, match="control_hed.safetensors has no config"):
        VARPipeline.from_pretrained(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# preprocessors


@pytest.fixture(scope="module")
def landscape():
    from studio.world import render

    return render(3, size=96)


def test_canny_preprocessor(landscape):
    from lab import metrics

    m, preview = pp.canny(landscape.image, size=64, low=50, high=120)
    assert m.shape == (1, 64, 64) and m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    resized = landscape.image.resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(m[0].numpy() > 0, metrics.canny(np.asarray(resized), 50, 120))
    assert preview.size == (64, 64) and preview.mode == "L" and m.sum() > 0
    with pytest.raises(ValueError, match="low <= high"):
        pp.canny(landscape.image, low=200, high=100)


def test_world_depth_and_segmentation_preprocessors(landscape):
    from models.domain import build

    torch.manual_seed(0)
    dnet = build("depth", {"widths": [4, 8], "resolution": 32}).eval()
    snet = build("seg", {"num_classes": 8, "widths": [4, 8], "resolution": 32}).eval()
    d, dprev = pp.preprocess("depth", landscape.image, "world", size=48, net=dnet)
    assert d.shape == (1, 48, 48) and d.dtype == torch.float32 and 0 <= d.min() and d.max() <= 1
    assert dprev.size == (48, 48) and dprev.mode == "L"
    s, sprev = pp.preprocess("segmentation", landscape.image, size=48, net=snet)
    assert s.shape == (1, 48, 48) and s.dtype == torch.int64 and 0 <= s.min() and s.max() < 8
    assert sprev.size == (48, 48) and sprev.mode == "RGB"
    with pytest.raises(ValueError, match="needs its net"):
        pp.preprocess("depth", landscape.image, "world")
    with pytest.raises(ValueError, match="preprocessors canny, none"):
        pp.preprocess("canny", landscape.image, "world")


def test_user_maps_the_none_path(landscape):
    layout = Image.fromarray(colorize_labels(landscape.labels))
    ids, preview = pp.user_map("segmentation", layout)
    assert torch.equal(ids[0], torch.from_numpy(landscape.labels.astype(np.int64)))  # palette round trip
    noisy = np.clip(np.asarray(layout).astype(int) + np.random.default_rng(0).integers(-12, 13, (96, 96, 3)), 0, 255)
    ids2, _ = pp.user_map("segmentation", noisy.astype(np.uint8), size=48)  # nearest colour, then nearest resize
    assert ids2.shape == (1, 48, 48) and ids2.dtype == torch.int64
    assert torch.equal(ids2[0], ids[0][1::2, 1::2])
    assert np.array_equal(np.asarray(preview), np.asarray(layout))
    e, _ = pp.user_map("canny", Image.fromarray(np.eye(96, dtype=np.uint8) * 255), size=96)
    assert torch.equal(e[0], torch.eye(96))
    d, dprev = pp.user_map("depth", Image.new("L", (40, 30), 255), size=64)  # white: near
    assert d.shape == (1, 64, 64) and d.abs().max() == 0 and dprev.getpixel((0, 0)) == 255
    with pytest.raises(ValueError, match="outside 0..7"):
        pp.user_map("segmentation", np.full((8, 8), 9))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        pp.user_map("depth", np.full((8, 8), 3.0))
    with pytest.raises(ValueError, match="unknown control type"):
        pp.user_map("normal", layout)


# ---------------------------------------------------------------------------------------------
# transformers preprocessors: tiny random configs, no downloads


def test_transformers_depth_preprocessor(tmp_path, landscape):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                                 reassemble_factors=[4, 2, 1, 0.5])
    model = transformers.DPTForDepthEstimation(cfg).eval()
    d, preview = pp.depth(landscape.image, size=40, model=model)
    assert d.shape == (1, 40, 40) and d.dtype == torch.float32 and d.min() == 0 and d.max() == 1
    assert preview.size == (40, 40)
    model.save_pretrained(tmp_path / "dpt")
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dpt")
    hf = pp.load_depth_model(tmp_path / "dpt")
    assert hf.processor is not None
    d2, _ = pp.preprocess("depth", landscape.image, "transformers", size=40, model=hf)
    assert d2.shape == (1, 40, 40)
    with pytest.raises(pp.WeightsNotCached, match="not in the local Hugging Face cache.*hf download"):
        pp.load_depth_model("var-studio-tests/no-such-depth-model", cache_dir=tmp_path / "empty_cache")


def test_transformers_segmentation_preprocessor(tmp_path, landscape):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1],
                                       mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=150, image_size=32)
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path / "seg")
    hf = pp.load_segmentation_model(tmp_path / "seg")
    assert hf.processor is None  # no preprocessor config: resized and normalised by hand
    s, preview = pp.segmentation(landscape.image, size=40, model=hf)
    assert s.shape == (1, 40, 40) and s.dtype == torch.int64 and 0 <= s.min() and s.max() < 150
    assert preview.size == (40, 40) and preview.mode == "RGB"
    with pytest.raises(pp.WeightsNotCached, match="not in the local Hugging Face cache"):
        pp.load_segmentation_model("var-studio-tests/no-such-seg-model", cache_dir=tmp_path / "empty_cache")
