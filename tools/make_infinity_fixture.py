"""Generate `tests/fixtures/infinity_tiny.pt` by RUNNING the published Infinity code.

This script is ours; it only imports and runs the reference implementation
(FoundationVision/Infinity, commit 4c27bbb) to record numbers that our re-implementation
(models/infinity.py, models/bsq_vae.py, studio/infinity.py) must reproduce. No reference code is
copied into this repository.

Regenerate (CPU, fp32, torch 2.x; einops is the one extra package the reference needs):

    mkdir -p /tmp/infref && git --git-dir=<mirror>/FoundationVision+Infinity/repo archive \\
        4c27bbb infinity | tar -x -C /tmp/infref          # or: git clone + checkout 4c27bbb
    pip install --target /tmp/infref-site einops
    PYTHONPATH=/tmp/infref-site python3 tools/make_infinity_fixture.py --ref /tmp/infref

What it does:
  * builds the reference `Infinity` exactly as tools/run_infinity.py's load_infinity does
    (shared_aln, fused_norm, pad_to_multiplier 128, rope2d_each_sa_layer 1, rope2d_normalized_by_hw
    2, add_lvl_embeding_only_first_block 1, use_bit_label 1, text_maxlen 512, block chunks) at a tiny
    width (C 64, 4 heads, depth 4 in 2 chunks, Ct5 128) and two BSQ VAEs built by the reference
    `vae_model` (d 16 / patch 16, and d 4 / patch 8 for the patchified 8B path, one transformer of
    d_vae 16 serving both) at narrow conv widths (base_ch 32, one res block: only decoding and
    encoding use them); fills every key with tests/refweights.py::fill_reference_weights;
  * runs `autoregressive_infer_cfg` (inference_mode, vae_type=d, cfg_insertion_layer [0], as
    gen_one_img) on random prompt features for several settings and records every scale's bit
    labels; for each draw it checks on the same generator state that moving the logits by +-1e-4
    does not change it (so float noise between implementations cannot flip a bit; see notes), and
    moves to the next seed (base, base+10, ...) until every draw of the run is stable; the seed
    used is stored with the run (torch 2.13 CPU: greedy 0, defaults 1, cfg1 82, lists 23, wide 4,
    negative 25, patchify 16);
  * runs the reference VAE encode (vae.encode with a 0.06M schedule) and decode on test images.

Stand-ins (the reference imports packages that are GPU-only or training-only):
  * flash_attn: only `flash_attn_varlen_kvpacked_func` runs at inference (the cross-attention;
    self-attention takes PyTorch SDPA because customized_flash_attn=False). The stand-in computes,
    per sequence i, softmax(q_i k_i^T * softmax_scale) v_i over that sequence's own keys with
    PyTorch SDPA: the definition of variable-length attention, no dropout, no causal mask. The
    reference casts q/kv to bf16 before calling it (flash-attn's input dtype; on a GPU the model
    runs in bf16 anyway): here `torch.bfloat16` inside basic.py resolves to float32, so the CPU run
    is the fp32 computation the code intends, not fp32 rounded through bf16 half-way.
  * torch.compile (fused_op.py decorates its AdaLN layer norm with it) is the identity here:
    compiling does not change what the function computes, and CPU inductor needs a compiler.
  * timm (register_model, DropPath; drop path is 0 at inference), torchvision / imageio (imported
    by the VAE's training code, unused at inference): empty stand-ins.

Only the seeds of the random weights and the key/shape lists are stored (the test regenerates the
weights), plus the prompt features, the recorded bits and a subsample of the decoded pixels.
"""
import argparse
import os
import sys
import types
from pathlib import Path

import make_official_fixture  # tools/: the shared reference-import helpers

REF_COMMIT = "4c27bbb"
MODEL = dict(depth=4, embed_dim=64, num_heads=4, mlp_ratio=4, block_chunks=2)
CT5 = 128
VAES = {"p16": dict(d=16, patch=16, ch_mult=[1, 1, 1, 1, 1]), "p8": dict(d=4, patch=8, ch_mult=[1, 1, 1, 1])}
VAE_NARROW = dict(base_ch=32, num_res_blocks=1)
SEEDS = dict(model=21, vae_p16=22, vae_p8=23)
LENS = [5, 9]  # the two prompts' token counts
NEG_LENS = [7, 3]
DELTA = 1e-4
# name -> vae, (ratio, pn), negative?, autoregressive_infer_cfg args (cfg / tau: a number or a list)
RUNS = {
    "greedy": ("p16", (1.0, "0.06M"), False, dict(g_seed=0, cfg=3.0, tau=1.0, top_k=1, top_p=0.0)),
    "defaults": ("p16", (1.0, "0.06M"), False, dict(g_seed=1, cfg=3.0, tau=0.5, top_k=900, top_p=0.97)),
    "cfg1": ("p16", (1.0, "0.06M"), False, dict(g_seed=2, cfg=1.0, tau=1.0, top_k=0, top_p=0.0)),
    "lists": ("p16", (1.0, "0.06M"), False, dict(g_seed=3, cfg=[1.0, 2.0, 3.0, 1.0, 4.0, 2.5, 3.0],
                                                  tau=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], top_k=900, top_p=0.9)),
    "wide": ("p16", (0.5, "0.06M"), False, dict(g_seed=4, cfg=3.0, tau=0.5, top_k=900, top_p=0.97)),
    "negative": ("p16", (1.0, "0.06M"), True, dict(g_seed=5, cfg=3.0, tau=0.5, top_k=900, top_p=0.97)),
    "patchify": ("p8", (1.0, "0.06M"), False, dict(g_seed=6, cfg=3.0, tau=1.0, top_k=900, top_p=0.97)),
}
IMAGE_RUNS = ("defaults", "patchify")
PIXEL_STEP = 4  # stored decoded pixels: every 4th row and column


def _install_stand_ins():
    import torch
    import torch.nn.functional as F

    def varlen_kvpacked(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, **_):
        assert dropout_p == 0 and not causal
        out = []
        for i in range(len(cu_seqlens_q) - 1):
            qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)  # (H, Lq, c)
            kvi = kv[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]  # (Lk, 2, H, c)
            k, v = kvi[:, 0].transpose(0, 1), kvi[:, 1].transpose(0, 1)
            out.append(F.scaled_dot_product_attention(qi, k, v, scale=softmax_scale).transpose(0, 1))
        return torch.cat(out)

    def flash_attn_func(*a, **k):
        raise AssertionError("flash_attn_func runs only with customized_flash_attn, which inference turns off")

    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func, fa.flash_attn_varlen_kvpacked_func = flash_attn_func, varlen_kvpacked
    sys.modules["flash_attn"] = fa

    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_layers = types.ModuleType("timm.models.layers")
    timm_loss = types.ModuleType("timm.loss")
    timm_models.register_model = lambda f: f
    timm_layers.DropPath = type("DropPath", (torch.nn.Identity,), {})
    timm_layers.drop_path = lambda x, *a, **k: x
    timm_loss.SoftTargetCrossEntropy = type("SoftTargetCrossEntropy", (torch.nn.Module,), {})
    timm.models, timm_models.layers, timm.loss = timm_models, timm_layers, timm_loss
    sys.modules.update({"timm": timm, "timm.models": timm_models, "timm.models.layers": timm_layers,
                        "timm.loss": timm_loss})
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                        "imageio": types.ModuleType("imageio")})


class _Float32AsBf16:
    """basic.py's `torch`, but torch.bfloat16 is float32 (see the module docstring)."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float32 if name == "bfloat16" else getattr(self._torch, name)


def main():
    args = make_official_fixture.parse_ref_args(__doc__, "FoundationVision/Infinity", REF_COMMIT, "infinity_tiny.pt")
    ref = args.ref
    make_official_fixture._setup_sys_path(ref)
    _install_stand_ins()

    import torch
    torch.set_grad_enabled(False)
    refweights = make_official_fixture._load_refweights()
    real_compile = torch.compile
    torch.compile = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    try:
        import infinity.models.basic as basic
        import infinity.models.fused_op  # noqa: F401  (decorated while compile is the identity)
        import infinity.models.infinity as inf_mod
        import infinity.models.bsq_vae.vae as vae_mod
        import infinity.models.bsq_vae.multiscale_bsq as bsq_mod
        from infinity.utils.dynamic_resolution import dynamic_resolution_h_w
    finally:
        torch.compile = real_compile
    assert Path(inf_mod.__file__).resolve().is_relative_to(ref), inf_mod.__file__
    basic.torch = _Float32AsBf16(torch)
    orig_ae = vae_mod.AutoEncoder
    vae_mod.AutoEncoder = lambda a: orig_ae(argparse.Namespace(**{**vars(a), **VAE_NARROW}))

    vaes, vae_keys = {}, {}
    for name, v in VAES.items():
        vae0 = vae_mod.vae_model(None, "dynamic", v["d"], 2 ** v["d"], patch_size=v["patch"],
                                 encoder_ch_mult=v["ch_mult"], decoder_ch_mult=v["ch_mult"], test_mode=True)
        sd = refweights.fill_reference_weights(vae0.state_dict(), seed=SEEDS[f"vae_{name}"])
        vae_keys[name] = [(k, tuple(t.shape), str(t.dtype)) for k, t in sd.items()]
        # the released file layout: {"vae": state_dict}, read back by load_cnn as vae_model does
        vaes[name] = vae_mod.vae_model({"vae": dict(sd)}, "dynamic", v["d"], 2 ** v["d"], patch_size=v["patch"],
                                       encoder_ch_mult=v["ch_mult"], decoder_ch_mult=v["ch_mult"], test_mode=True)
        for k, t in vaes[name].state_dict().items():
            assert torch.equal(t, sd[k]), f"load_cnn did not load {k}"

    def build(vae, patchify):
        m = inf_mod.Infinity(
            vae_local=vae, text_channels=CT5, text_maxlen=512, shared_aln=True, raw_scale_schedule=None,
            checkpointing="full-block", customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128,
            use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=patchify, inference_mode=True,
            train_h_div_w_list=[1.0], drop_path_rate=0.0, **MODEL).eval()
        m.rng = torch.Generator(device="cpu")
        return m

    models = {"p16": build(vaes["p16"], 0), "p8": build(vaes["p8"], 1)}
    model_sd = refweights.fill_reference_weights(models["p16"].state_dict(), seed=SEEDS["model"])
    model_keys = [(k, tuple(t.shape), str(t.dtype)) for k, t in model_sd.items()]
    for m in models.values():
        assert {k: tuple(t.shape) for k, t in m.state_dict().items()} == {k: s for k, s, _ in model_keys}
        print(m.load_state_dict(dict(model_sd), strict=True))

    g = torch.Generator().manual_seed(99)
    feats = [torch.randn(n, CT5, generator=g) for n in LENS]
    neg_feats = [torch.randn(n, CT5, generator=g) for n in NEG_LENS]

    def compact(fs):
        lens = [f.shape[0] for f in fs]
        cu = torch.nn.functional.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return torch.cat(fs), lens, cu, max(lens)

    orig_sampler = inf_mod.sample_with_top_k_top_p_also_inplace_modifying_logits_
    unstable = []

    def checked_sampler(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
        state = rng.get_state()
        flips = []
        for sgn in (1.0, -1.0):
            moved = logits_BlV.clone()
            moved[..., 1] += sgn * DELTA
            moved[..., 0] -= sgn * DELTA
            rng.set_state(state)
            flips.append(orig_sampler(moved, top_k=top_k, top_p=top_p, rng=rng, num_samples=num_samples))
        rng.set_state(state)
        out = orig_sampler(logits_BlV, top_k=top_k, top_p=top_p, rng=rng, num_samples=num_samples)
        if not all(torch.equal(f, out) for f in flips):
            unstable.append(int(sum((f != out).sum() for f in flips)))
        return out

    inf_mod.sample_with_top_k_top_p_also_inplace_modifying_logits_ = checked_sampler
    decoded, recorded = {}, []
    for name, v in vaes.items():
        orig_i2c = v.quantizer.lfq.indices_to_codes

        def recording_i2c(indices, label_type="int_label", *a, _orig=orig_i2c, **k):
            recorded.append(indices.clone())  # the sampler's bits of one scale, (B, 1, h, w, d), VAE space
            return _orig(indices, label_type, *a, **k)

        v.quantizer.lfq.indices_to_codes = recording_i2c
        orig_decode = v.decode

        def recording_decode(z, _orig=orig_decode, _name=name):
            x = _orig(z)
            decoded[_name] = x.clone()
            return x

        v.decode = recording_decode

    out = {"config": dict(model=MODEL, ct5=CT5, vaes=VAES, vae_narrow=VAE_NARROW, seeds=SEEDS, ref_commit=REF_COMMIT,
                          torch_version=str(torch.__version__), delta=DELTA, pixel_step=PIXEL_STEP),
           "model_keys": model_keys, "vae_keys": vae_keys, "prompt_feats": feats, "negative_feats": neg_feats,
           "runs": {}}
    try:
        for run, (vname, (ratio, pn), negative, kw) in RUNS.items():
            kw = dict(kw)
            scales = dynamic_resolution_h_w[ratio][pn]["scales"]
            scales = [(1, h, w) for _, h, w in scales]
            cfg, tau = kw.pop("cfg"), kw.pop("tau")
            cfg_list = cfg if isinstance(cfg, list) else [cfg] * len(scales)
            tau_list = tau if isinstance(tau, list) else [tau] * len(scales)
            base_seed = kw.pop("g_seed")
            for g_seed in range(base_seed, base_seed + 10 * 30, 10):  # the first seed whose draws are all stable
                unstable.clear()
                decoded.pop(vname, None)
                recorded.clear()
                _, _, img = models[vname].autoregressive_infer_cfg(
                    vae=vaes[vname], scale_schedule=scales, label_B_or_BLT=compact(feats), B=len(LENS),
                    negative_label_B_or_BLT=compact(neg_feats) if negative else None, cfg_list=cfg_list,
                    tau_list=tau_list, cfg_insertion_layer=[0], vae_type=VAES[vname]["d"], returns_vemb=1,
                    ret_img=True, inference_mode=True, g_seed=g_seed, **kw)
                bits = list(recorded)
                assert len(bits) == len(scales)
                if not unstable:
                    break
                print(f"{run}: seed {g_seed}: {unstable} draws move with the logits by {DELTA}; next seed")
            else:
                raise SystemExit(f"{run}: no stable seed")
            kw["g_seed"] = g_seed
            rec = dict(vae=vname, ratio=ratio, pn=pn, negative=negative, cfg=cfg, tau=tau, **kw,
                       bits=[b[:, 0].to(torch.bool).clone() for b in bits])  # per scale (B, h, w, d)
            if run in IMAGE_RUNS:
                rec["pixels"] = decoded[vname][:, :, ::PIXEL_STEP, ::PIXEL_STEP].clone()
                rec["image_u8_bgr"] = img[:, ::PIXEL_STEP, ::PIXEL_STEP].clone()  # gen_one_img's uint8
            out["runs"][run] = rec
            print(f"{run:10s} scales {[tuple(b.shape[2:4]) for b in bits]} ones at the last scale "
                  f"{[round(float(b.float().mean()), 3) for b in bits[-1]]}")
    finally:
        inf_mod.sample_with_top_k_top_p_also_inplace_modifying_logits_ = orig_sampler

    # VAE encode / decode of the shared test images
    x = refweights.make_reference_images()  # (2, 3, 256, 256) in [-1, 1]
    out["vae"] = {}
    for name, v in vaes.items():
        sched = [(1, h, w) for _, h, w in dynamic_resolution_h_w[1.0]["0.06M"]["scales"]]
        if VAES[name]["patch"] == 8:
            sched = [(1, 2 * h, 2 * w) for _, h, w in sched]
        margins = []
        orig_l2 = bsq_mod.l2norm

        def recording_l2norm(t):  # BSQ's bits are the signs of l2norm(residual): record the closest call
            r = orig_l2(t)
            margins.append(float(r.abs().min()))
            return r

        bsq_mod.l2norm = recording_l2norm
        try:
            h, z, _, bit_indices, _, _ = v.encode(x, scale_schedule=sched)
        finally:
            bsq_mod.l2norm = orig_l2
        margin = min(margins)
        dec = orig_ae.decode(v, z)  # the unrecorded decode of the quantised latent
        out["vae"][name] = dict(schedule=[s[1:] for s in sched], bits=[b[:, 0].to(torch.bool) for b in bit_indices],
                                pixels=dec[:, :, ::PIXEL_STEP, ::PIXEL_STEP].clone(), full_scale_margin=margin)
        print(f"vae {name}: {len(bit_indices)} scales, smallest |q| {margin:.2e}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
