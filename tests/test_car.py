"""CAR (models/car.py, VARPipeline.load_control) against the published CAR code, and its loading.

The fixture (tools/make_car_fixture.py) holds the reference `car_inference` token streams on a d4
VAR with random weights in the released format; both sides draw the weights from
tests/refweights.py with the fixture's seeds, and the adapters reach our pipeline as
`car_<type>_d4.pth` files (a plain dict of the `car*` keys, as released). The large-shape loading
checks use stride-0 tensors written from the key listing in shared/notes (d16: ~0.2B parameters
that are never allocated)."""
import math

import numpy as np
import pytest
import torch
from refweights import fill_reference_weights, make_control_pictures

from models.car import CAR, CARConfig, CARHook
from models.var import VAR, VARConfig
from models.vqvae import VQVAE, VQVAEConfig
from studio import checkpoints
from studio import images as im
from studio.checkpoints import CheckpointError
from studio.classes import class_names_for
from studio.pipeline import VARPipeline

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "car_tiny.pt"


def _keys(sd):
    return sorted((k, tuple(v.shape), str(v.dtype)) for k, v in sd.items())


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def car_files(ref, tmp_path_factory):
    """The fixture's adapters written as released files (type -> path)."""
    folder = tmp_path_factory.mktemp("car")
    var_cfg = VARConfig.official(ref["config"]["depth"])
    paths = {}
    for t in ("canny", "hed"):
        with torch.device("meta"):
            shapes = CAR(CARConfig.for_var(var_cfg, t)).state_dict()
        sd = fill_reference_weights({k: torch.zeros(v.shape) for k, v in shapes.items()},
                                    seed=ref["config"]["seeds"][f"car_{t}"])
        paths[t] = folder / f"car_{t}_d{var_cfg.depth}.pth"
        torch.save(sd, paths[t])
    return paths


@pytest.fixture(scope="module")
def pipe(ref, car_files):
    c = ref["config"]
    v = c["vae"]
    vae = VQVAE(VQVAEConfig(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                            share_quant_resi=v["share_quant_resi"], patch_nums=c["patch_nums"]))
    vae.load_state_dict(fill_reference_weights(vae.state_dict(), seed=c["seeds"]["vae"]))
    var = VAR(VARConfig.official(c["depth"], cond_drop_rate=0.0))
    var.load_state_dict(fill_reference_weights(var.state_dict(), seed=c["seeds"]["var"]))
    p = VARPipeline(vae, var, class_names_for(c["num_classes"]))
    for path in car_files.values():
        p.load_control(path)  # type from the file name
    return p


def _run(pipe, ref, run, **extra):
    a = ref["runs"][run]
    pics = make_control_pictures()
    image = pics[a["pictures"][0]] if len(a["pictures"]) == 1 else [pics[i] for i in a["pictures"]]
    kw = dict(class_labels=ref["labels"], control_image=image, control_type=a["control_type"],
              guidance_scale=a["cfg"], top_k=a["top_k"], top_p=a["top_p"], more_smooth=a["more_smooth"],
              generator=torch.Generator().manual_seed(a["g_seed"]), output_type="pt")
    return pipe(**{**kw, **extra})


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# faithfulness


def test_state_dict_names_shapes_dtypes_match_reference(ref, pipe):
    assert _keys(pipe.var.state_dict()) == sorted(tuple(k) for k in ref["var_keys"])
    for car in pipe.car_controls.values():
        assert _keys(car.state_dict()) == sorted(tuple(k) for k in ref["car_keys"])
    assert sorted(pipe.car_controls) == ["canny", "hed"]


def test_per_scale_maps_match_reference(ref):
    for pic, coarse, sums in zip(make_control_pictures(), ref["maps_coarse"], ref["maps_sums"]):
        maps = im.car_scale_maps(pic, ref["config"]["patch_nums"])
        assert [tuple(m.shape[-2:]) for m in maps] == [(16 * pn, 16 * pn) for pn in ref["config"]["patch_nums"]]
        for ours, theirs in zip(maps, coarse):
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
        assert [float(m.double().sum()) for m in maps] == sums


@pytest.mark.parametrize("run", ["greedy", "seeded", "smooth", "cfg0", "hed_greedy", "hed_per_image",
                                 "canny_per_image"])
def test_sampled_tokens_match_reference_for_the_same_seed(ref, pipe, run):
    out = _run(pipe, ref, run)
    expect = ref[f"{run}_tokens"]
    for si, (ours, theirs) in enumerate(zip(out.tokens, expect)):
        assert torch.equal(ours, theirs), f"{run}: scale {si} differs"
    assert len(out.tokens) == len(expect)
    if f"{run}_image" in ref:  # more_smooth: soft codes, so the image is not decode(tokens)
        assert (out.images[:1] - ref[f"{run}_image"]).abs().max().item() < 2e-3


def test_one_picture_per_label_is_spread_over_that_labels_images(pipe):
    pics = make_control_pictures()
    per_label = pipe._car_hook([pics[0], pics[2]], "canny", 4, 2, 1.0, 0.0, 1.0)  # 2 labels x 2 images
    per_image = pipe._car_hook([pics[0], pics[0], pics[2], pics[2]], "canny", 4, 1, 1.0, 0.0, 1.0)
    shared = pipe._car_hook(pics[1], "canny", 4, 1, 1.0, 0.0, 1.0)
    assert _same(per_label.feats, per_image.feats)
    assert all(torch.equal(f[0], f[3]) for f in shared.feats)


def test_without_kv_cache_the_branch_gives_the_same_tokens(ref, pipe):
    """The sampler without KV cache reruns the whole prefix (branch included, block-causal mask)."""
    a, b = (_run(pipe, ref, "hed_greedy", class_labels=[437], use_kv_cache=c) for c in (True, False))
    assert _same(a.tokens, b.tokens)


def test_strength_zero_is_plain_var_and_the_control_changes_the_result(ref, pipe):
    kw = dict(class_labels=[437], guidance_scale=2.0, top_k=1, top_p=0.0, output_type="pt")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw)
    pic = make_control_pictures()[0]
    off = pipe(control_image=pic, control_type="canny", control_strength=0.0,
               generator=torch.Generator().manual_seed(0), **kw)
    on = pipe(control_image=pic, control_type="canny", generator=torch.Generator().manual_seed(0), **kw)
    assert _same(plain.tokens, off.tokens)
    assert not _same(plain.tokens, on.tokens)


def test_plain_sampling_is_untouched_by_a_hook_without_fusion(ref, pipe):
    """A CARHook whose fusion is off everywhere (begin still runs the branch) changes nothing."""
    var, q = pipe.var, pipe.vae.quantize
    maps = im.car_scale_maps(make_control_pictures()[1], var.cfg.patch_nums)
    hook = CARHook(pipe.car_controls["hed"], var, maps, 1, strength=1.0, active=[False] * 10)
    kw = dict(guidance_scale=4.0, top_k=10, top_p=0.9)
    a = var.sample(q, torch.tensor([3]), generator=torch.Generator().manual_seed(1), **kw)
    b = var.sample(q, torch.tensor([3]), generator=torch.Generator().manual_seed(1), block_hook=hook, **kw)
    assert _same(a.tokens, b.tokens) and torch.equal(a.f_hat, b.f_hat)


def test_bad_control_pictures_are_refused_clearly(pipe):
    pics = make_control_pictures()
    with pytest.raises(ValueError, match="3 pictures for 2 labels"):
        pipe(class_labels=[1, 2], control_image=pics, control_type="canny", output_type="pt")
    with pytest.raises(ValueError, match="8-bit picture"):
        pipe(class_labels=[1], control_image=np.zeros((256, 256, 3), np.float32), control_type="hed")
    with pytest.raises(ValueError, match="control_image and control_type go together"):
        pipe(class_labels=[1], control_type="hed")


# ---------------------------------------------------------------------------------------------
# loading: released format, strict, clear refusals


def _t(*shape, value=0.01):
    return torch.full((1,), value).expand(*shape)


def released_car_state_dict(depth: int) -> dict:
    """car_<type>_dNN.pth as listed in shared/notes/next-scale-models.md (C = 64 depth, depth/2 blocks)."""
    C, H = 64 * depth, depth
    sd = {"car_control_convs.conv_in.weight": _t(64, 3, 3, 3), "car_control_convs.conv_in.bias": _t(64)}
    convs = [(64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (512, 256), (512, 512), (1024, 512)]
    for i, (o, c) in enumerate(convs):
        sd[f"car_control_convs.blocks.{i}.weight"], sd[f"car_control_convs.blocks.{i}.bias"] = _t(o, c, 3, 3), _t(o)
    sd.update({"car_control_convs.conv_out.weight": _t(C, 1024, 3, 3), "car_control_convs.conv_out.bias": _t(C),
               "car_var_conv.weight": _t(C, C, 3, 3), "car_var_conv.bias": _t(C)})
    for i in range(depth // 2):
        b = f"car_blocks.{i}."
        sd.update({b + "attn.scale_mul_1H11": _t(1, H, 1, 1, value=math.log(4)), b + "attn.q_bias": _t(C),
                   b + "attn.v_bias": _t(C), b + "attn.zero_k_bias": _t(C, value=0.0),
                   b + "attn.mat_qkv.weight": _t(3 * C, C), b + "attn.proj.weight": _t(C, C),
                   b + "attn.proj.bias": _t(C), b + "ffn.fc1.weight": _t(4 * C, C), b + "ffn.fc1.bias": _t(4 * C),
                   b + "ffn.fc2.weight": _t(C, 4 * C), b + "ffn.fc2.bias": _t(C),
                   b + "ada_lin.1.weight": _t(6 * C, C), b + "ada_lin.1.bias": _t(6 * C)})
        sd.update({f"car_skip_norm.{i}.weight": _t(2 * C), f"car_skip_norm.{i}.bias": _t(2 * C),
                   f"car_skip_linear.{i}.weight": _t(C, 2 * C), f"car_skip_linear.{i}.bias": _t(C)})
    return sd


def _write(tmp_path, name="car_depth_d16.pth", depth=16, edit=None):
    sd = released_car_state_dict(depth)
    if edit:
        edit(sd)
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_released_d16_file_fits_a_d16_var(tmp_path):
    car = checkpoints.load_car(_write(tmp_path), VARConfig.official(16), materialize=False)
    assert car.cfg.control_type == "depth" and car.cfg.num_blocks == 8 and car.cfg.embed_dim == 1024
    assert car.cfg.stem_widths == (64, 128, 256, 512, 1024) and car.cfg.stride == 16
    n = sum(p.numel() for p in car.parameters())
    assert 0.15e9 < n < 0.25e9  # "about 0.2B parameters"


def test_a_d16_file_on_a_d20_var_is_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_car(_write(tmp_path), VARConfig.official(20), materialize=False)
    msg = str(e.value)
    assert "car_depth_d16.pth" in msg and "VAR of depth 16" in msg and "d20" in msg and "var_d16.pth" in msg


def test_a_d16_file_on_the_d4_pipeline_is_refused_clearly(tmp_path, pipe):
    with pytest.raises(CheckpointError, match=r"depth 16 .*the loaded VAR is d4"):
        pipe.load_control(_write(tmp_path))


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("car_skip_linear.3.bias"), "missing keys (1): car_skip_linear.3.bias"),
    (lambda sd: sd.pop("car_blocks.5.attn.zero_k_bias"), "missing keys (1): car_blocks.5.attn.zero_k_bias"),
    (lambda sd: sd.__setitem__("car_blocks.2.ffn.fc1.weight", _t(4096, 1000)),
     "car_blocks.2.ffn.fc1.weight: checkpoint (4096, 1000) vs model (4096, 1024)"),
    (lambda sd: sd.__setitem__("car_control_convs.blocks.3.weight", _t(256, 64, 3, 3)),
     "car_control_convs.blocks.3.weight: checkpoint (256, 64, 3, 3)"),
    (lambda sd: sd.__setitem__("car_blocks.0.extra", _t(3)), "unexpected keys (1): car_blocks.0.extra"),
])
def test_broken_files_are_refused_by_name(tmp_path, edit, needle):
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_car(_write(tmp_path, edit=edit), VARConfig.official(16), materialize=False)
    assert needle in str(e.value) and "car_depth_d16.pth" in str(e.value)


def test_type_from_the_file_name_or_given(tmp_path):
    path = _write(tmp_path, "adapter.pth")
    with pytest.raises(CheckpointError, match="pass control_type="):
        checkpoints.load_car(path, VARConfig.official(16), materialize=False)
    car = checkpoints.load_car(path, VARConfig.official(16), "sketch", materialize=False)
    assert car.cfg.control_type == "sketch"


def test_unsafe_and_foreign_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "car_canny_d16.pth")
    with pytest.raises(CheckpointError, match="cannot read car_canny_d16.pth"):
        checkpoints.load_car(tmp_path / "car_canny_d16.pth", VARConfig.official(16), materialize=False)
    torch.save({"head.weight": _t(4096, 1024)}, tmp_path / "car_canny_d16.pth")
    with pytest.raises(CheckpointError, match="not a CAR adapter"):
        checkpoints.load_car(tmp_path / "car_canny_d16.pth", VARConfig.official(16), materialize=False)


def test_loading_a_type_again_replaces_it(pipe, car_files):
    before = pipe.car_controls["hed"]
    pipe.load_control(car_files["hed"])
    assert pipe.car_controls["hed"] is not before and sorted(pipe.car_controls) == ["canny", "hed"]
    assert torch.equal(before.car_var_conv.weight, pipe.car_controls["hed"].car_var_conv.weight)


def test_a_car_file_given_as_the_model_loads_the_var_of_its_folder(ref, car_files, tmp_path):
    """VARPipeline.from_pretrained("weights/car_canny_d4.pth") (and so `app.py --model`): the folder's
    VQVAE and var_d4.pth, then the adapter; it samples as the official car_inference."""
    c, v = ref["config"], ref["config"]["vae"]
    vae = VQVAE(VQVAEConfig(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                            share_quant_resi=v["share_quant_resi"], patch_nums=c["patch_nums"]))
    torch.save(fill_reference_weights(vae.state_dict(), seed=c["seeds"]["vae"]), tmp_path / "vae_ch160v4096z32.pth")
    var = VAR(VARConfig.official(c["depth"]))
    torch.save(fill_reference_weights(var.state_dict(), seed=c["seeds"]["var"]), tmp_path / f"var_d{c['depth']}.pth")
    torch.save(torch.load(car_files["canny"], weights_only=True), tmp_path / car_files["canny"].name)
    pipe = VARPipeline.from_pretrained(tmp_path / car_files["canny"].name)
    assert sorted(pipe.car_controls) == ["canny"] and pipe.var.cfg.depth == c["depth"]
    out = _run(pipe, ref, "greedy")
    assert _same(out.tokens, ref["greedy_tokens"])
