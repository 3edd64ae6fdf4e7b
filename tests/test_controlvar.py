"""ControlVAR (models/controlvar.py, the ControlVAR path of VARPipeline) against the published
ControlVAR code, and its loading.

The fixture (tools/make_controlvar_fixture.py) holds the reference `conditional_infer_cfg` draws on a
d4 model with random weights; both sides draw the weights from tests/refweights.py with the
fixture's seeds. Here the weights reach our pipeline as a folder with the VQVAE and `d4.pth` written
as released (`{'model_state_dict': DDP state dict, 'optimizer_state_dict', 'epoch', 'step'}`) or as a
bare state dict, through VARPipeline.from_pretrained. The large-shape loading checks use stride-0
tensors written from the key listing in shared/notes (d12..d30, never allocated)."""
import math

import numpy as np
import pytest
import torch
from refweights import fill_reference_weights, make_control_pictures, make_segmentation_picture

from models.controlvar import ControlVAR, ControlVARConfig
from models.vqvae import VQVAE, VQVAEConfig
from studio import checkpoints
from studio import images as im
from studio.checkpoints import CheckpointError
from studio.params import UserError
from studio.pipeline import VARPipeline

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "controlvar_tiny.pt"
PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


def _pictures():
    return make_control_pictures() + [make_segmentation_picture()]


def _tiny_vae_sd(ref):
    c = ref["config"]
    v = c["vae"]
    vae = VQVAE(VQVAEConfig(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                            share_quant_resi=v["share_quant_resi"], patch_nums=c["patch_nums"]))
    return fill_reference_weights(vae.state_dict(), seed=c["seeds"]["vae"])


def _tiny_controlvar_sd(ref):
    with torch.device("meta"):
        shapes = ControlVAR(ControlVARConfig.official(ref["config"]["depth"])).state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    model = ControlVAR(ControlVARConfig.official(ref["config"]["depth"]))
    sd.update({k: v for k, v in model.state_dict().items() if k in ("lvl_1L", "attn_bias_for_masking")})
    return fill_reference_weights(sd, seed=ref["config"]["seeds"]["controlvar"])


def _released(sd):
    """The trainer's save_checkpoint: a DDP state dict (module.) in a dict with the optimizer's state."""
    return {"model_state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                                     "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
            "epoch": 3, "step": 1200}


@pytest.fixture(scope="module")
def folders(ref, tmp_path_factory):
    """Two folders: the VQVAE + d4.pth as released, and as a bare state dict."""
    vae_sd, cv_sd = _tiny_vae_sd(ref), _tiny_controlvar_sd(ref)
    out = {}
    for kind, payload in (("released", _released(cv_sd)), ("bare", cv_sd)):
        folder = tmp_path_factory.mktemp(kind)
        torch.save(vae_sd, folder / "vae_ch160v4096z32.pth")
        torch.save(payload, folder / f"d{ref['config']['depth']}.pth")
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def pipe(folders):
    return VARPipeline.from_pretrained(folders["released"])


def _run(pipe, ref, run, **extra):
    a = ref["runs"][run]
    pics = _pictures()
    image = pics[a["pictures"][0]] if len(a["pictures"]) == 1 else [pics[i] for i in a["pictures"]]
    g1, g2, g3 = a["cfg"]
    kw = dict(class_labels=a["labels"], control_image=image, control_type=a["control_type"], guidance_scale=g1,
              type_guidance_scale=g2, control_guidance_scale=g3, top_k=a["top_k"], top_p=a["top_p"],
              generator=torch.Generator().manual_seed(a["g_seed"]), output_type="pt")
    return pipe(**{**kw, **extra})


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# faithfulness


def test_family_detected_and_keys_are_the_released_ones(ref, pipe):
    assert pipe.is_controlvar and isinstance(pipe.var, ControlVAR)
    assert pipe.control_types == ["segmentation", "canny", "depth", "normal"]
    ours = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in pipe.var.state_dict().items())
    assert ours == sorted(tuple(k) for k in ref["keys"])
    assert not pipe.var.cfg.attn_l2_norm  # plain attention below d30


def test_the_map_is_tokenised_as_the_official_val_script_does(ref, pipe, run="sharp"):
    """The per-scale 'resizing' of the map is the VQVAE quantiser's: same tokens at every scale
    (every run checks them again through out.control_tokens)."""
    a = ref["runs"][run]
    pics = _pictures()
    ids = a["pictures"] * len(a["labels"]) if len(a["pictures"]) == 1 else a["pictures"]
    maps = torch.cat([im.controlvar_map(pics[i], 256, a["control_type"]) for i in ids])
    for si, (ours, theirs) in enumerate(zip(pipe.vae.img_to_tokens(maps), ref[f"{run}_control"])):
        assert torch.equal(ours, theirs.long()), f"{run}: map tokens differ at scale {si}"


@pytest.mark.parametrize("run", ["greedy", "seeded", "sharp", "segmentation", "cfg0"])
def test_sampled_tokens_match_reference_for_the_same_seed(ref, pipe, run):
    out = _run(pipe, ref, run)
    expect = ref[f"{run}_tokens"]
    assert len(out.tokens) == len(expect) == len(PN)
    for si, (ours, theirs) in enumerate(zip(out.tokens, expect)):
        assert torch.equal(ours, theirs.long()), f"{run}: image tokens differ at scale {si}"
    for ours, theirs in zip(out.control_tokens, ref[f"{run}_control"]):  # the forced half is the map's
        assert torch.equal(ours, theirs.long())
    assert tuple(out.images.shape) == (len(ref["runs"][run]["labels"]), 3, 256, 256)
    if f"{run}_image" in ref:
        assert (out.images[:1] - ref[f"{run}_image"].float()).abs().max().item() < 2e-3


def test_one_map_per_label_gives_the_official_per_image_run(ref, pipe):
    """per_label: the reference ran labels [1, 1, 437, 437] with maps [seg, seg, edge, edge]; we pass
    two labels x two images and one map per label."""
    pics = _pictures()
    out = _run(pipe, ref, "per_label", class_labels=[1, 437], num_images_per_label=2,
               control_image=[pics[3], pics[0]])
    assert _same(out.tokens, [t.long() for t in ref["per_label_tokens"]])


def test_a_bare_state_dict_loads_and_samples_the_same(ref, folders):
    bare = VARPipeline.from_pretrained(folders["bare"])
    out = _run(bare, ref, "segmentation")
    assert _same(out.tokens, [t.long() for t in ref["segmentation_tokens"]])


def test_the_map_steers_the_image(ref, pipe):
    pics = _pictures()
    kw = dict(class_labels=[437], control_type="canny", top_k=1, top_p=0.0, output_type="pt")
    a = pipe(control_image=pics[0], generator=torch.Generator().manual_seed(0), **kw)
    b = pipe(control_image=pics[2], generator=torch.Generator().manual_seed(0), **kw)
    assert not _same(a.tokens, b.tokens)
    c = pipe(control_image=pics[0], generator=torch.Generator().manual_seed(0), **{**kw, "control_type": "depth"})
    assert not _same(a.tokens, c.tokens)  # the type token matters too


def test_more_smooth_keeps_the_map(ref, pipe):
    """Our choice where the official sampler loses the map (it feeds soft codes everywhere): the map's
    codes stay in the control half, so the control half decodes to the map's reconstruction."""
    pic = _pictures()[3]
    out = pipe(class_labels=[3], control_image=pic, control_type="segmentation", more_smooth=True,
               generator=torch.Generator().manual_seed(1), output_type="pt")
    expect = pipe.vae.img_to_tokens(im.controlvar_map(pic, 256, "segmentation"))
    assert _same(out.control_tokens, expect)
    assert torch.isfinite(out.images).all() and out.images.shape == (1, 3, 256, 256)


def test_inpainting_under_control_keeps_the_unmasked_part(pipe):
    pics = _pictures()
    image = np.asarray(pics[2]).copy()
    mask = np.zeros((256, 256), np.uint8)
    mask[:, :128] = 255
    out = pipe.inpaint(image, mask, class_labels=5, control_image=pics[3], control_type="segmentation",
                       mask_blur=0, inpaint_area="whole", generator=torch.Generator().manual_seed(0), output_type="np")
    got = (out.images[0] * 255).round().astype(np.uint8)
    assert np.array_equal(got[:, 136:], image[:, 136:])  # outside the mask: the input, exactly
    assert not np.array_equal(got[:, :120], image[:, :120])
    assert len(out.control_tokens) == len(PN)


def test_bad_calls_are_refused_clearly(pipe):
    pic = _pictures()[0]
    with pytest.raises(UserError, match="under a control map"):
        pipe(class_labels=[1])
    with pytest.raises(UserError, match="'segmentation', 'canny', 'depth', 'normal'"):
        pipe(class_labels=[1], control_image=pic, control_type="hed")
    with pytest.raises(UserError, match="control_guidance_scale"):
        pipe(class_labels=[1], control_image=pic, control_type="canny", control_strength=0.5)
    with pytest.raises(UserError, match="type_guidance_scale must be one finite number"):
        pipe(class_labels=[1], control_image=pic, control_type="canny", type_guidance_scale=float("nan"))
    with pytest.raises(UserError, match="3 maps for 2 labels"):
        pipe(class_labels=[1, 2], control_image=[pic] * 3, control_type="canny")
    with pytest.raises(ValueError, match="8-bit picture"):
        pipe(class_labels=[1], control_image=np.zeros((256, 256, 3), np.float32), control_type="depth")


def test_a_map_of_another_size_is_resized_and_segmentation_keeps_its_colours():
    seg = make_segmentation_picture(size=100)
    palette = {tuple(c) for c in np.asarray(seg).reshape(-1, 3)}
    m = im.controlvar_map(seg, 256, "segmentation")
    colours = {tuple(c) for c in ((m[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().astype(int).reshape(-1, 3)}
    assert m.shape == (1, 3, 256, 256) and colours <= palette


# ---------------------------------------------------------------------------------------------
# loading: released format, strict, clear refusals


def _t(*shape, value=0.01):
    return torch.full((1,), value).expand(*shape)


def released_controlvar_state_dict(depth: int) -> dict:
    """dNN.pth's model keys as listed in shared/notes/control-weights.md: VAR's (C = 64 depth) with a
    two-row pos_start, a 1360-row pos_1LC and the matching lvl_1L / mask buffers, cond_embed (5, C);
    scale_mul_1H11 only at d30 (cosine attention)."""
    C, H = 64 * depth, depth
    L = 2 * sum(p * p for p in PN)
    lvl = torch.cat([torch.full((2 * p * p,), i) for i, p in enumerate(PN)]).view(1, L)
    mask = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -math.inf).view(1, 1, L, L)
    sd = {"pos_start": _t(1, 2, C), "pos_1LC": _t(1, L, C), "lvl_1L": lvl, "attn_bias_for_masking": mask,
          "word_embed.weight": _t(C, 32), "word_embed.bias": _t(C), "class_emb.weight": _t(1001, C),
          "lvl_embed.weight": _t(10, C), "cond_embed.weight": _t(5, C)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.q_bias": _t(C), b + "attn.v_bias": _t(C), b + "attn.zero_k_bias": _t(C, value=0.0),
                   b + "attn.mat_qkv.weight": _t(3 * C, C), b + "attn.proj.weight": _t(C, C),
                   b + "attn.proj.bias": _t(C), b + "ffn.fc1.weight": _t(4 * C, C), b + "ffn.fc1.bias": _t(4 * C),
                   b + "ffn.fc2.weight": _t(C, 4 * C), b + "ffn.fc2.bias": _t(C),
                   b + "ada_lin.1.weight": _t(6 * C, C), b + "ada_lin.1.bias": _t(6 * C)})
        if depth == 30:
            sd[b + "attn.scale_mul_1H11"] = _t(1, H, 1, 1, value=math.log(4))
    sd.update({"head_nm.ada_lin.1.weight": _t(2 * C, C), "head_nm.ada_lin.1.bias": _t(2 * C),
               "head.weight": _t(4096, C), "head.bias": _t(4096)})
    return sd


@pytest.fixture(scope="module")
def official_vae_file(tmp_path_factory):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VQVAE(VQVAEConfig()).state_dict().items()}
    sd = {k: _t(*s) for k, s in shapes.items()}
    sd["quantize.ema_vocab_hit_SV"] = _t(10, 4096)
    path = tmp_path_factory.mktemp("vae") / "vae_ch160v4096z32.pth"
    torch.save(sd, path)
    return path


def _write(folder, vae_file, depth, edit=None, wrap=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / vae_file.name).symlink_to(vae_file)
    sd = released_controlvar_state_dict(depth)
    if edit:
        edit(sd)
    torch.save(_released(sd) if wrap else sd, folder / f"d{depth}.pth")
    return folder


@pytest.mark.parametrize("depth", [12, 16, 20, 24, 30])
def test_released_files_of_every_depth_load_strictly(tmp_path, official_vae_file, depth):
    loaded = checkpoints.load_official(_write(tmp_path / "w", official_vae_file, depth), materialize=False)
    var = loaded.var
    assert isinstance(var, ControlVAR) and var.cfg.depth == depth and var.cfg.embed_dim == 64 * depth
    assert var.cfg.patch_nums == PN and var.L == 1360 and var.cfg.attn_l2_norm == (depth == 30)


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("cond_embed.weight"), "missing keys (1): cond_embed.weight"),
    (lambda sd: sd.pop("blocks.7.ffn.fc2.bias"), "missing keys (1): blocks.7.ffn.fc2.bias"),
    (lambda sd: sd.__setitem__("blocks.3.attn.proj.weight", _t(768, 700)),
     "blocks.3.attn.proj.weight: checkpoint (768, 700) vs model (768, 768)"),
    (lambda sd: sd.__setitem__("pos_start", _t(1, 1, 768)), "pos_start: checkpoint (1, 1, 768) vs model (1, 2, 768)"),
    (lambda sd: sd.__setitem__("blocks.0.attn.scale_mul_1H11", _t(1, 12, 1, 1)),
     "unexpected keys (1): blocks.0.attn.scale_mul_1H11"),
])
def test_broken_files_are_refused_by_name(tmp_path, official_vae_file, edit, needle):
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_official(_write(tmp_path / "w", official_vae_file, 12, edit), materialize=False)
    assert needle in str(e.value) and "d12.pth" in str(e.value)


def test_a_bare_d12_dict_loads_and_a_var_file_next_to_it_is_a_choice(tmp_path, official_vae_file):
    folder = _write(tmp_path / "w", official_vae_file, 12, wrap=False)
    assert isinstance(checkpoints.load_official(folder, materialize=False).var, ControlVAR)
    torch.save({"x": _t(1)}, folder / "var_d16.pth")
    with pytest.raises(CheckpointError, match="several transformers"):
        checkpoints.load_official(folder, materialize=False)
    assert checkpoints.load_official(folder, "d12", materialize=False).var.cfg.depth == 12


# ---------------------------------------------------------------------------------------------
# segmentation maps in ControlVAR's palette (studio.preprocess)


def test_the_palette_is_controlvars_124_colours():
    from studio.preprocess import controlvar_palette

    pal = controlvar_palette()
    assert pal.shape == (124, 3) and len({tuple(c) for c in pal}) == 124
    assert tuple(pal[0]) == (0, 0, 64) and tuple(pal[4]) == (0, 64, 0) and tuple(pal[-1]) == (255, 255, 255)
    assert set(np.unique(pal)) == {0, 64, 128, 192, 255}


def test_a_painted_layout_becomes_entities_coloured_by_where_they_are():
    from studio.preprocess import controlvar_palette, controlvar_segmentation

    layout = np.zeros((100, 100, 3), np.uint8)
    layout[60:100, 0:100] = (10, 200, 30)  # ground: centroid cell (x 5, y 8) at 512 px
    layout[0:30, 50:100] = (250, 20, 20)  # sun: cell (8, 1)
    layout[5:7, 5:7] = (1, 2, 3)  # a speck: under 5000 px at 512, left out
    pal = controlvar_palette()
    seg = controlvar_segmentation(layout, size=512)
    out = np.asarray(seg.preview)
    assert tuple(out[400, 256]) == tuple(pal[(5 * 8) % 124]) and tuple(out[70, 400]) == tuple(pal[8 * 1])
    assert tuple(out[30, 30]) == (0, 0, 0)  # the speck and the unpainted sky stay unlabelled
    ids = np.zeros((100, 100), np.int64)
    ids[60:100] = 7
    ids[0:30, 50:100] = 3
    ids[5:7, 5:7] = 9
    assert np.array_equal(np.asarray(controlvar_segmentation(ids, size=512).preview), out)  # an uploaded mask
    small = controlvar_segmentation(layout)  # 256 px for the model
    assert small.map.shape == (1, 3, 256, 256) and small.preview.size == (256, 256)


# ---------------------------------------------------------------------------------------------
# one generator per image (the studio seeds image i with seed + i)


@pytest.mark.parametrize("more_smooth", [False, True])
def test_each_image_of_a_batch_is_the_image_its_generator_makes_alone(pipe, more_smooth):
    """With a list of generators, image i of a batch is the image generator i makes alone, for each
    image's own class and map (so the studio's seed + i can be made again by itself)."""
    pics = _pictures()
    kw = dict(control_type="canny", top_k=50, top_p=0.9, more_smooth=more_smooth, output_type="pt")
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe(class_labels=[7, 437, 3], control_image=[pics[0], pics[2], pics[0]], generator=gens(10, 11, 12), **kw)
    rows = ((7, pics[0]), (437, pics[2]), (3, pics[0]))
    # every image without smoothing; with it, the middle one (another class and map than its neighbours)
    for i in (range(3) if not more_smooth else [1]):
        label, pic = rows[i]
        alone = pipe(class_labels=[label], control_image=pic, generator=gens(10 + i), **kw)
        assert _same([t[i:i + 1] for t in batch.tokens], alone.tokens), f"image {i} differs from its seed alone"
        assert (batch.images[i] - alone.images[0]).abs().max().item() < 1e-4
    if more_smooth:
        return
    # a random class per image is drawn from that image's generator too
    rand = pipe(class_labels=None, num_images_per_label=2, control_image=pics[0], generator=gens(5, 6), **kw)
    second = pipe(class_labels=None, control_image=pics[0], generator=gens(6), **kw)
    assert rand.class_labels[1] == second.class_labels[0]
    assert _same([t[1:2] for t in rand.tokens], second.tokens)
    # one generator for the batch keeps the official draws (the faithfulness runs above), and a wrong count is refused
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        pipe(class_labels=[1, 2, 3], control_image=pics[0], generator=gens(1, 2), **kw)


def test_left_out_sampling_settings_are_the_published_val_ones(ref, pipe):
    """guidance, top-k and top-p left out of a call are ControlVAR's published val settings (cfg 4, 4, 4,
    top-k 900, top-p 0.96; VAR's top-p is 0.95): the official run made with them, and the worker's defaults
    for this model (what a job that leaves them out gets, and the web page shows)."""
    from studio.serve.runner import sampling_defaults

    a = ref["runs"]["seeded"]
    assert (a["cfg"], a["top_k"], a["top_p"]) == ([4.0, 4.0, 4.0], 900, 0.96)
    pics = _pictures()
    kw = dict(class_labels=a["labels"], control_image=[pics[i] for i in a["pictures"]] if len(a["pictures"]) > 1
              else pics[a["pictures"][0]], control_type=a["control_type"], output_type="pt")
    out = pipe(generator=torch.Generator().manual_seed(a["g_seed"]), **kw)
    assert _same(out.tokens, [t.long() for t in ref["seeded_tokens"]])
    var_top_p = pipe(generator=torch.Generator().manual_seed(a["g_seed"]), top_p=0.95, **kw)
    assert not _same(var_top_p.tokens, out.tokens)  # the default is not VAR's 0.95
    assert sampling_defaults(pipe) == {"guidance_scale": 4.0, "top_k": min(900, pipe.var.cfg.vocab_size), "top_p": 0.96}
