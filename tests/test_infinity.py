"""Infinity (text-to-image, bit labels) against the official code, on random weights in the released
key layout: the same bit labels at every scale for the same seed and prompt features, the same VAE
encode bits and decode, strict loading of 2B- and 8B-shaped checkpoints, the text encoder.

tests/fixtures/infinity_tiny.pt was made by tools/make_infinity_fixture.py, which runs
FoundationVision/Infinity's own autoregressive_infer_cfg and BSQ VAE (CPU, fp32) on a tiny config;
only the weights' seeds and official key lists are stored, the test rebuilds the same weights.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refweights import fill_reference_weights, make_reference_images
from studio.checkpoints import CheckpointError
from studio.infinity import (InfinityPipeline, TextEncoder, find_schedule, load_infinity_models, schedule_for)
from studio.params import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "infinity_tiny.pt"


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=False)


def _filled(keys, seed):
    zeros = {k: torch.zeros(s, dtype=getattr(torch, d.split(".")[-1])) for k, s, d in keys}
    sd = fill_reference_weights(zeros, seed=seed)
    for k in sd:
        if k.endswith("lfq.mask"):  # an int buffer: the bit weights 2^(d-1) .. 1
            sd[k] = 2 ** torch.arange(sd[k].numel() - 1, -1, -1)
    return sd


def write_tiny_folder(fx, folder: Path, vae: str) -> Path:
    """The released layout: a plain transformer state dict and {"vae": state_dict} (official keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_filled(fx["model_keys"], fx["config"]["seeds"]["model"]), folder / "infinity_tiny.pth")
    torch.save({"vae": _filled(fx["vae_keys"][vae], fx["config"]["seeds"][f"vae_{vae}"])}, folder / "infinity_vae_tiny.pth")
    return folder


@pytest.fixture(scope="module")
def pipes(fx, tmp_path_factory):
    root = tmp_path_factory.mktemp("infinity")
    return {v: InfinityPipeline.from_pretrained(write_tiny_folder(fx, root / v, v)) for v in ("p16", "p8")}


def _features(feats):
    L = max(f.shape[0] for f in feats)
    emb = torch.zeros(len(feats), L, feats[0].shape[1])
    mask = torch.zeros(len(feats), L, dtype=torch.bool)
    for i, f in enumerate(feats):
        emb[i, :len(f)], mask[i, :len(f)] = f, True
    return emb, mask


def _run(pipe, fx, rec, **extra):
    emb, mask = _features(fx["prompt_feats"])
    kw = {}
    if rec["negative"]:
        kw["negative_prompt_embeds"], kw["negative_prompt_attention_mask"] = _features(fx["negative_feats"])
    s = schedule_for(rec["ratio"], rec["pn"])
    return pipe(prompt_embeds=emb, prompt_attention_mask=mask, guidance_scale=rec["cfg"], tau=rec["tau"],
                top_k=rec["top_k"], top_p=rec["top_p"], height=s.height, width=s.width,
                generator=torch.Generator().manual_seed(rec["g_seed"]), output_type="pt", **kw, **extra)


RUNS = ["greedy", "defaults", "cfg1", "lists", "wide", "negative", "patchify"]


@pytest.mark.parametrize("run", RUNS)
def test_same_bits_as_official(pipes, fx, run):
    rec = fx["runs"][run]
    out = _run(pipes[rec["vae"]], fx, rec)
    assert len(out.tokens) == len(rec["bits"])
    for si, (ours, ref) in enumerate(zip(out.tokens, rec["bits"])):
        assert ours.shape == ref.shape, (run, si)
        diff = int((ours != ref.long()).sum())
        assert diff == 0, f"{run}: scale {si} {tuple(ref.shape)}: {diff} bits differ from the official run"
    if "pixels" in rec:
        step = fx["config"]["pixel_step"]
        ours = out.images[:, :, ::step, ::step] * 2 - 1  # "pt" images are (decode + 1) / 2
        err = (ours - rec["pixels"]).abs().max().item()
        assert err < 1e-4, f"{run}: decoded image differs by {err}"
        assert out.images.shape[-2:] == (256, 256)


def test_defaults_are_the_official_ones(pipes, fx):
    """No sampling arguments: cfg 3, tau 0.5, top_k 900, top_p 0.97 (the 2B's), the 125M size 256 px."""
    rec = fx["runs"]["defaults"]
    emb, mask = _features(fx["prompt_feats"])
    out = pipes["p16"](prompt_embeds=emb, prompt_attention_mask=mask, output_type="pt",
                       generator=torch.Generator().manual_seed(rec["g_seed"]))
    assert (out.height, out.width) == (256, 256)
    assert all(torch.equal(a, b.long()) for a, b in zip(out.tokens, rec["bits"]))
    assert pipes["p8"].default_sampling()["tau"] == 1.0  # the patchified (8B) default


def test_callback_sees_every_scale_and_can_stop(pipes, fx):
    rec = fx["runs"]["wide"]
    seen = []
    out = _run(pipes["p16"], fx, rec, callback_on_scale_end=lambda ev: seen.append((ev.scale_index, ev.size,
                                                                                    tuple(ev.bits.shape))))
    assert [s[1] for s in seen] == [(1, 1), (2, 2), (2, 4), (3, 6), (5, 10), (8, 16), (11, 22)]
    assert out.images.shape[-2:] == (176, 352) and not out.stopped_early
    stopped = _run(pipes["p16"], fx, rec, callback_on_scale_end=lambda ev: ev.scale_index == 2)
    assert stopped.stopped_early and len(stopped.tokens) == 3
    assert all(torch.equal(a, b) for a, b in zip(stopped.tokens, out.tokens[:3]))


def test_one_generator_per_image_makes_each_image_as_it_would_be_alone(pipes, fx):
    """generator=[g5, g6, g7] (one per image, as in diffusers): image i of the batch has the bit labels
    and picture of a run of it alone with seed 5 + i (the studio's per-image seeds); one generator
    keeps the official protocol (one draw per scale for the whole batch: image 1 is not seed 6's)."""
    pipe = pipes["p16"]
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    one = _one_prompt(fx)
    batch = pipe(num_images_per_prompt=3, generator=[gen(5), gen(6), gen(7)], aspect_ratio="2:1", output_type="pt",
                 **one)
    for i in range(3):
        alone = pipe(generator=gen(5 + i), aspect_ratio="2:1", output_type="pt", **one)
        assert all(torch.equal(b[i], a[0]) for b, a in zip(batch.tokens, alone.tokens)), i
        assert (batch.images[i] - alone.images[0]).abs().max() < 1e-4  # batched float sums differ a little
    official = pipe(num_images_per_prompt=3, generator=gen(5), aspect_ratio="2:1", output_type="pt", **one)
    assert not torch.equal(official.tokens[-1][1], batch.tokens[-1][1])
    with pytest.raises(UserError, match="2 generators for 3 images"):
        pipe(num_images_per_prompt=3, generator=[gen(1), gen(2)], **one)


@pytest.mark.parametrize("vae", ["p16", "p8"])
def test_vae_encode_decode_as_official(pipes, fx, vae):
    ref = fx["vae"][vae]
    x = make_reference_images()
    bits = pipes[vae].encode(x)
    assert [tuple(b.shape[1:3]) for b in bits] == [tuple(s) for s in ref["schedule"]]
    for si, (ours, r) in enumerate(zip(bits, ref["bits"])):
        assert int((ours != r.long()).sum()) == 0, f"scale {si}: encode bits differ"
    dec = pipes[vae].decode(bits)
    step = fx["config"]["pixel_step"]
    err = (dec[:, :, ::step, ::step] - ref["pixels"]).abs().max().item()
    assert err < 1e-4, f"decode differs by {err}"


def test_bad_requests_are_refused_in_words(pipes, fx):
    pipe = pipes["p16"]
    emb, mask = _features(fx["prompt_feats"])
    with pytest.raises(UserError, match="not one of Infinity's sizes"):
        pipe(prompt_embeds=emb, prompt_attention_mask=mask, height=300, width=300)
    with pytest.raises(UserError, match="7 scales"):
        pipe(prompt_embeds=emb, prompt_attention_mask=mask, guidance_scale=[3.0, 3.0])
    with pytest.raises(UserError, match=r"\(B, L, 128\)"):
        pipe(prompt_embeds=emb[..., :64], prompt_attention_mask=mask)
    with pytest.raises(UserError, match="text encoder"):
        InfinityPipeline(pipe.model, pipe.vae)(prompt="a fox")
    assert find_schedule(aspect_ratio="2:1", pn="0.06M").width == 352  # width:height -> the 0.5 template


# ---------------------------------------------------------------------------------------------
# the released key layout at full size (stride-0 tensors: a few kB on disk)


def released_transformer_keys(depth, C, heads, chunks, Ct5, d_vae, pool_head_dim=128):
    """Names and shapes of a released Infinity transformer (shared/notes/infinity.md, fact 1)."""
    hp = Ct5 // pool_head_dim
    hid = round(4 * C / 256) * 256
    keys = {"cfg_uncond": (512, Ct5), "pos_start": (1, 1, C), "lvl_embed.weight": (15, C),
            "word_embed.weight": (C, d_vae), "word_embed.bias": (C,), "text_norm.weight": (Ct5,),
            "text_proj_for_sos.ca.mat_q": (1, hp, C // hp), "text_proj_for_sos.ca.mat_kv.weight": (2 * C, Ct5),
            "text_proj_for_sos.ca.v_bias": (C,), "text_proj_for_sos.ca.zero_k_bias": (C,),
            "text_proj_for_sos.ca.proj.weight": (C, C), "text_proj_for_sos.ca.proj.bias": (C,),
            "text_proj_for_ca.0.weight": (C, Ct5), "text_proj_for_ca.0.bias": (C,),
            "text_proj_for_ca.2.weight": (C, C), "text_proj_for_ca.2.bias": (C,),
            "shared_ada_lin.1.weight": (6 * C, C), "shared_ada_lin.1.bias": (6 * C,),
            "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
            "head.weight": (2 * d_vae, C), "head.bias": (2 * d_vae,)}
    per = depth // chunks
    for b in range(depth):
        p = f"block_chunks.{b // per}.module.{b % per}."
        keys.update({p + "ada_gss": (1, 1, 6, C), p + "sa.scale_mul_1H11": (1, heads, 1, 1),
                     p + "sa.mat_qkv.weight": (3 * C, C), p + "sa.q_bias": (C,), p + "sa.v_bias": (C,),
                     p + "sa.zero_k_bias": (C,), p + "sa.proj.weight": (C, C), p + "sa.proj.bias": (C,),
                     p + "ca.mat_q.weight": (C, C), p + "ca.mat_q.bias": (C,), p + "ca.mat_kv.weight": (2 * C, C),
                     p + "ca.v_bias": (C,), p + "ca.zero_k_bias": (C,), p + "ca.proj.weight": (C, C),
                     p + "ca.proj.bias": (C,), p + "ca_norm.weight": (C,), p + "ca_norm.bias": (C,),
                     p + "ffn.fc1.weight": (hid, C), p + "ffn.fc1.bias": (hid,), p + "ffn.fc2.weight": (C, hid),
                     p + "ffn.fc2.bias": (C,)})
    return keys


def released_vae_keys(d, ch, mult, nrb=2):
    """Names and shapes of a released BSQ VAE in the official wrapper layout (Conv / GroupNorm)."""
    keys = {}

    def conv(name, cout, cin, k):
        keys[f"{name}.conv.weight"], keys[f"{name}.conv.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f"{name}.norm.weight"], keys[f"{name}.norm.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    res("encoder.mid.block_1", cin, cin), res("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", d, cin, 3)
    cin = ch * mult[-1]
    conv("decoder.conv_in", cin, d, 3)
    res("decoder.mid.block_1", cin, cin), res("decoder.mid.block_2", cin, cin)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i >= 1:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", 3, cin, 3)
    keys["quantizer.lfq.mask"] = keys["quantize.lfq.mask"] = (d,)
    return keys


def test_key_layouts_match_the_official_tiny_models(fx):
    """The full-size key writers below agree with the official code's own state dicts (tiny sizes)."""
    ours = released_transformer_keys(4, 64, 4, 2, 128, 16)
    assert ours == {k: tuple(s) for k, s, _ in fx["model_keys"]}
    assert released_vae_keys(16, 32, [1, 1, 1, 1, 1], 1) == {k: tuple(s) for k, s, _ in fx["vae_keys"]["p16"]}
    assert released_vae_keys(4, 32, [1, 1, 1, 1], 1) == {k: tuple(s) for k, s, _ in fx["vae_keys"]["p8"]}


def _stride0(keys):
    one = torch.zeros(())
    return {k: (2 ** torch.arange(s[0] - 1, -1, -1) if k.endswith("lfq.mask") else one.expand(s)) for k, s in keys.items()}


SIZES = {
    "2b": dict(t=dict(depth=32, C=2048, heads=16, chunks=8, Ct5=2048, d_vae=32), vae=dict(d=32, ch=128, mult=[1, 2, 4, 4, 4])),
    "8b": dict(t=dict(depth=40, C=3584, heads=28, chunks=8, Ct5=2048, d_vae=56), vae=dict(d=14, ch=128, mult=[1, 2, 4, 4])),
}


def _write_released(folder: Path, size: str, drop=None, reshape=None):
    folder.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    t = _stride0(released_transformer_keys(**spec["t"]))
    if drop:
        del t[drop]
    if reshape:
        t[reshape] = torch.zeros(()).expand(7, 7)
    vae = {"vae": _stride0(released_vae_keys(**spec["vae"]))}
    if size == "2b":
        torch.save(t, folder / "infinity_2b_reg.pth")
        torch.save(vae, folder / "infinity_vae_d32reg.pth")
    else:  # a sharded folder, as infinity_8b_weights/
        shards = folder / "infinity_8b_weights"
        shards.mkdir()
        names = sorted(t)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            fn = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: t[k] for k in part}, shards / fn)
            weight_map.update({k: fn for k in part})
        (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        torch.save(vae, folder / "infinity_vae_d56_f8_14_patchify.pth")
    return folder


@pytest.mark.parametrize("size", ["2b", "8b"])
def test_released_sizes_load_strictly(tmp_path, size):
    model, vae, _ = load_infinity_models(_write_released(tmp_path / size, size), materialize=False)
    spec = SIZES[size]["t"]
    assert (model.cfg.depth, model.cfg.embed_dim, model.cfg.num_heads) == (spec["depth"], spec["C"], spec["heads"])
    assert model.cfg.d_vae == spec["d_vae"] and vae.cfg.codebook_dim == SIZES[size]["vae"]["d"]
    assert vae.cfg.patch_size == (8 if size == "8b" else 16)


@pytest.mark.parametrize("size,key", [("2b", "block_chunks.3.module.2.ca.v_bias"), ("8b", "head_nm.ada_lin.1.weight")])
def test_missing_key_is_refused_by_name(tmp_path, size, key):
    with pytest.raises(CheckpointError, match="missing keys.*" + key.replace(".", r"\.")):
        load_infinity_models(_write_released(tmp_path / size, size, drop=key), materialize=False)


def test_wrong_shape_is_refused_by_name(tmp_path):
    key = "block_chunks.1.module.0.ffn.fc2.weight"
    with pytest.raises(CheckpointError, match="wrong shapes.*" + key.replace(".", r"\.")):
        load_infinity_models(_write_released(tmp_path / "2b", "2b", reshape=key), materialize=False)


def test_folder_without_infinity_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing")
    with pytest.raises(CheckpointError, match="needs an Infinity transformer"):
        load_infinity_models(tmp_path)


# ---------------------------------------------------------------------------------------------
# the text encoder: a tiny random T5 and a tokenizer built offline


def _tiny_t5(folder: Path, d_model=128, seed=0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a red fox in the snow blue sky over green hills at night dog cat".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i * 0.01) for i, w in enumerate(words)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


def test_prompt_through_t5_is_cached_and_matches_features(pipes, fx, tmp_path):
    from transformers import T5EncoderModel

    te = TextEncoder(_tiny_t5(tmp_path / "t5"))
    emb, mask = te.encode(["a red fox in the snow", "a dog"])
    assert mask.sum(1).tolist() == [7, 3]  # the words and </s>
    ref = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()
    ids = te.tokenizer(["a dog"], return_tensors="pt").input_ids
    assert torch.allclose(emb[1, :3], ref(input_ids=ids).last_hidden_state[0], atol=1e-5)
    calls = []
    te.model.register_forward_hook(lambda *a: calls.append(1))
    te.encode(["a dog", "a red fox in the snow"])
    assert not calls  # both cached
    pipe = InfinityPipeline(pipes["p16"].model, pipes["p16"].vae, te)
    a = pipe(prompt=["a red fox in the snow", "a dog"], generator=torch.Generator().manual_seed(3), output_type="pt")
    b = pipe(prompt_embeds=emb, prompt_attention_mask=mask, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and a.prompts == ["a red fox in the snow", "a dog"]
    c = pipe(prompt=["a red fox in the snow", "a dog"], negative_prompt="blue sky",
             generator=torch.Generator().manual_seed(3), output_type="pt")
    assert not torch.equal(a.tokens[-1], c.tokens[-1])


def test_missing_text_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the text encoder.*prompt_embeds"):
        TextEncoder(tmp_path / "no-such-t5").encode(["a fox"])


def test_the_text_encoder_is_checked_before_the_first_prompt(tmp_path, monkeypatch):
    """Where T5 comes from is checked without loading it: a folder with a config, or a hub id that is in
    the local cache when the hub is offline; otherwise a message that says what to do."""
    assert str(tmp_path / "t5") in TextEncoder(_tiny_t5(tmp_path / "t5")).check()
    with pytest.raises(UserError, match="no such folder"):
        TextEncoder(tmp_path / "no-such-t5").check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        TextEncoder(tmp_path / "empty").check()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="nobody/no-such-t5 is no folder here, and as a hub id it is not in the local "
                                        "Hugging Face cache while the hub is offline .* pass its folder with "
                                        "--text-encoder"):
        TextEncoder("nobody/no-such-t5").check()

# ---------------------------------------------------------------------------------------------
# editing: forcing the known bits under a mask, re-roll from a scale


def _picture():
    return ((make_reference_images()[0].permute(1, 2, 0).numpy() + 1) / 2).astype("float32")  # (256, 256, 3)


def _one_prompt(fx):
    emb, mask = _features(fx["prompt_feats"][:1])
    return dict(prompt_embeds=emb, prompt_attention_mask=mask)


def test_inpaint_keeps_the_outside_and_regenerates_the_inside(pipes, fx):
    pipe = pipes["p16"]
    pic = _picture()
    mask = torch.zeros(256, 256)
    mask[64:192, 128:256] = 1  # the right half of the middle band
    out = pipe.inpaint(pic, mask.numpy(), mask_blur=0, output_type="np", generator=torch.Generator().manual_seed(1),
                       **_one_prompt(fx))
    res = out.images[0]
    m = mask.numpy().astype(bool)
    assert (res[~m] == pic[~m]).all()  # outside: the input's pixels exactly
    assert abs(res[m] - pic[m]).mean() > 0.02  # inside: regenerated
    enc = pipe.encode(torch.from_numpy(pic).permute(2, 0, 1)[None] * 2 - 1)
    last, ref = out.tokens[-1][0], enc[-1][0]  # (16, 16, d): latent cells of 16 px
    assert torch.equal(last[:, :8], ref[:, :8])  # cells wholly outside the mask: forced
    assert torch.equal(last[:4], ref[:4]) and torch.equal(last[12:], ref[12:])
    assert not torch.equal(last[4:12, 8:], ref[4:12, 8:])  # under the mask: sampled
    assert torch.equal(out.tokens[0], enc[0])  # the 1x1 scale is always kept


def test_inpaint_paste_is_seam_matched_like_vars(pipes, fx):
    """The in-painted area is pasted as VAR's edits are (InpaintPlan.paste -> images.seam_matched): on a
    smooth picture the random tiny model's inside is far off in colour, and the colour step across the
    mask's left edge (mean colours of 16-row blocks, 4 px just outside the feather vs 4 px just inside
    it) is much smaller than with the plain feathered blend of the same generation; outside the
    feather the picture is the input's bit for bit."""
    from studio import images as im

    pipe, one = pipes["p16"], _one_prompt(fx)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255
    pic = np.stack([0.2 + 0.5 * xx, 0.6 - 0.3 * yy, 0.4 + 0.2 * xx * yy], -1).astype(np.float32)
    mask = np.zeros((256, 256), np.float32)
    mask[64:192, 128:256] = 1
    out = pipe.inpaint(pic, mask, mask_blur=4, output_type="np", generator=torch.Generator().manual_seed(1), **one)
    raw = pipe.reroll(out.tokens, from_scale=len(out.tokens), output_type="np", **one).images[0]  # the decoded result
    alpha = out.edit.alpha
    assert (alpha[:, 120:124] == 0).all() and (alpha[68:188, 132:136] == 1).all()  # outside / inside the feather
    plain = im.blend(pic, raw, alpha)

    def step(x):
        outside = x[64:192, 120:124].reshape(8, 16 * 4, 3).mean(1)
        inside = x[64:192, 132:136].reshape(8, 16 * 4, 3).mean(1)
        return np.abs(outside - inside).mean()

    res = out.images[0]
    assert step(pic) < 0.02 < 0.1 < step(plain)  # the picture is smooth there; the model's inside is not its colour
    assert step(res) < 0.75 * step(plain)  # measured: 0.082 vs 0.159
    assert (res[alpha == 0] == pic[alpha == 0]).all()  # outside: the input's pixels exactly
    assert np.abs(res - pic)[mask > 0].mean() > 0.05  # inside: still the model's picture, not the input's


def test_reroll_from_a_scale_keeps_the_coarse_bits(pipes, fx):
    pipe = pipes["p16"]
    first = pipe(generator=torch.Generator().manual_seed(2), output_type="pt", **_one_prompt(fx))
    again = pipe.reroll(first.tokens, from_scale=3, generator=torch.Generator().manual_seed(9), output_type="pt",
                        **_one_prompt(fx))
    assert all(torch.equal(a, b) for a, b in zip(again.tokens[:3], first.tokens[:3]))
    assert not torch.equal(again.tokens[-1], first.tokens[-1])
    same = pipe.reroll(first.tokens, from_scale=len(first.tokens), output_type="pt", **_one_prompt(fx))
    assert (same.images - first.images).abs().max() < 1e-6
    with pytest.raises(UserError, match="from_scale"):
        pipe.reroll(first.tokens, from_scale=99, **_one_prompt(fx))


def test_reroll_of_an_inpainting_keeps_the_outside(pipes, fx):
    """Re-rolling an in-painted result from scale k keeps every bit before k and, from k on, the bits the
    edit kept (outside the mask); the new picture is pasted over the edited one, so the pixels outside
    the edit's feathered mask stay exactly as they were. The edit survives the trip through its record
    (what the PNG stores)."""
    from studio.editing import InpaintPlan

    pipe, one = pipes["p16"], _one_prompt(fx)
    mask = np.zeros((256, 256), np.float32)
    mask[64:192, 128:256] = 1
    edited = pipe.inpaint(_picture(), mask, mask_blur=4, output_type="np", generator=torch.Generator().manual_seed(1),
                          **one)
    plan = InpaintPlan.from_record(edited.images[0], edited.edit.record())  # the edited picture + its PNG record
    k = 3
    again = pipe.reroll(edited.tokens, from_scale=k, edit=plan, output_type="np",
                        generator=torch.Generator().manual_seed(2), **one)
    res, src = again.images[0], edited.images[0]
    outside = plan.alpha == 0
    assert outside.mean() > 0.5 and (res[outside] == src[outside]).all()  # the picture outside the edit, exactly
    assert np.abs(res - src)[mask > 0].mean() > 0.02  # inside: resampled
    sizes = [tuple(t.shape[1:3]) for t in edited.tokens]
    kept_by_edit = pipe.keep_masks(plan.regen, sizes)
    for si, (a, b) in enumerate(zip(again.tokens, edited.tokens)):
        kept = torch.ones_like(kept_by_edit[si]) if si < k else kept_by_edit[si]
        assert torch.equal(a[0][kept[0]], b[0][kept[0]]), si  # every bit before k, the edit's kept bits after
    assert not torch.equal(again.tokens[-1], edited.tokens[-1])
    assert again.edit is plan  # a re-roll of an edit can be re-rolled again
    whole = pipe.reroll(edited.tokens, from_scale=k, output_type="np", generator=torch.Generator().manual_seed(2),
                        **one)  # without the edit: the whole picture is resampled
    assert np.abs(whole.images[0] - src)[outside].mean() > 0.02
    with pytest.raises(UserError, match="not the same picture"):  # another picture's bits (352x176 px)
        pipe.reroll(pipe.encode(torch.zeros(1, 3, 176, 352)), from_scale=2, edit=plan, **one)

def test_variations_keep_the_pictures_coarse_scales(pipes, fx):
    pipe = pipes["p16"]
    pic = _picture()
    enc = pipe.encode(torch.from_numpy(pic).permute(2, 0, 1)[None] * 2 - 1)
    out = pipe.variations(pic, keep_scales=4, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
                          output_type="pt", **_one_prompt(fx))
    assert out.images.shape == (2, 3, 256, 256)
    for si in range(4):
        assert torch.equal(out.tokens[si], enc[si].expand(2, *enc[si].shape[1:]))
    assert not torch.equal(out.tokens[-1][0], out.tokens[-1][1])  # two different variations


def test_outpaint_extends_to_a_table_size(pipes, fx):
    pipe = pipes["p16"]
    out = pipe.outpaint(_picture(), right=256, mask_blur=0, output_type="np",
                        generator=torch.Generator().manual_seed(3), **_one_prompt(fx))
    assert out.images.shape[1:3] == (176, 352)  # 256 x 512 is nearest the 1:2 template at 0.06M
    canvas = pipe.fit_image(np.pad(_picture(), ((0, 0), (0, 256), (0, 0)), mode="edge"))[0]
    assert (out.images[0][:, :176] == canvas[:, :176]).all()


def test_cli_writes_the_prompt_and_the_bits_into_the_png(pipes, fx, tmp_path):
    from studio.generate import main
    from studio.infinity import unpack_bits
    from studio.pngmeta import read_png_info

    folder = write_tiny_folder(fx, tmp_path / "model", "p16")
    t5 = _tiny_t5(tmp_path / "t5")
    png = tmp_path / "fox.png"
    assert main(["--model", str(folder), "--text-encoder", str(t5), "--prompt", "a red fox", "--seed", "4",
                 "--aspect-ratio", "2:1", "--out", str(png), "--scales-dir", str(tmp_path / "scales")]) == 0
    params, packed = read_png_info(png.read_bytes())
    assert params["prompt"] == "a red fox" and (params["height"], params["width"]) == (176, 352)
    assert (params["guidance_scale"], params["tau"], params["top_p"]) == (3.0, 0.5, 0.97)
    bits = unpack_bits(packed, params["bit_scales"], params["bits_per_position"])
    pipe = InfinityPipeline(pipes["p16"].model, pipes["p16"].vae, TextEncoder(t5))
    out = pipe(prompt="a red fox", aspect_ratio="2:1", generator=torch.Generator().manual_seed(4), output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(bits, out.tokens))  # the PNG holds the pyramid, for re-roll
    assert len(list((tmp_path / "scales").glob("*.png"))) == 7
    assert main(["--model", str(folder), "--out", str(png)]) == 2  # no prompt: refused



def test_bench_memory_estimate_of_released_shapes():
    """The benchmark's memory preflight sizes the released shapes as published (2B, 8B parameters) and
    counts the KV cache of every token of the 1024 px schedule, for both guidance rows, in every block."""
    from lab.bench import infinity_memory_gb

    w32, kv32 = infinity_memory_gb("2b", "fp32", 1)
    w16, kv16 = infinity_memory_gb("2b", "bf16", 1)
    assert 2.0 <= w32 / 4 <= 2.4  # billions of parameters
    assert abs(w16 * 2 - w32) < 1e-6 and abs(kv16 * 2 - kv32) < 1e-6
    tokens = sum(h * w for h, w in schedule_for(1.0, "1M").scales)
    assert tokens == 10521  # 13 scales up to 64x64
    assert abs(kv32 - 32 * 2 * 2 * tokens * 2048 * 4 / 1e9) < 1e-6
    w8, _ = infinity_memory_gb("8b", "bf16", 1)
    assert 7.5 <= w8 / 2 <= 9.0
