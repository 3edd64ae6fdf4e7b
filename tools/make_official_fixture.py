"""Generate the golden fixture `tests/fixtures/official_tiny.pt` by RUNNING the published VAR code.

This script is ours; it only imports and runs the reference implementation (FoundationVision/VAR,
commit 78b95394fc5896192e3a003e4b295f8ea743c48f) to record numbers that our re-implementation must
reproduce. No reference code is copied into this repository.

Regenerate (CPU, fp32, torch 2.x):

    # get the reference code, e.g. from a bare mirror of github.com/FoundationVision/VAR:
    mkdir -p /tmp/varref && git --git-dir=<mirror>/FoundationVision+VAR/repo archive \
        78b95394fc5896192e3a003e4b295f8ea743c48f | tar -x -C /tmp/varref
    # (or: git clone https://github.com/FoundationVision/VAR /tmp/varref && git -C /tmp/varref checkout 78b9539)
    python3 tools/make_official_fixture.py --ref /tmp/varref --out tests/fixtures/official_tiny.pt

What it does:
  * builds tiny reference models (VQVAE ch=32, V=128, Cvae=8; VAR depth 2, width 128, 10 classes, both
    per-block AdaLN and shared AdaLN), fills them with `tests/refweights.py::fill_reference_weights`
    (loaded by file path, so our own top-level `models` package never shadows the reference one) and
    loads them with strict=True;
  * records VQVAE encode / decode / teacher-forcing input, teacher-forced logits, token streams of
    `autoregressive_infer_cfg` (captured by wrapping `models.var.sample_with_top_k_top_p_`), and the
    zero-shot in-painting / class-conditional editing of `demo_zero_shot_edit.ipynb` (cell 2 is
    exec'd from the notebook file at run time and called with the reference VAR as `self`).

The reference's generator `VAR.rng` lives on CPU here (no CUDA), so seeded (non-greedy) token
streams are only reproducible with a CPU torch.Generator.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAE_CFG = dict(vocab_size=128, z_channels=8, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PATCH_NUMS)
VAR_CFG = dict(num_classes=10, depth=2, embed_dim=128, num_heads=2, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
               norm_eps=1e-6, cond_drop_rate=0.0, attn_l2_norm=True, patch_nums=PATCH_NUMS,
               flash_if_available=False, fused_if_available=False)
SEEDS = dict(vae=0, var=1, var_shared=2)
REF_COMMIT = "78b95394fc5896192e3a003e4b295f8ea743c48f"

SAMPLE_ARGS = {
    "greedy": dict(g_seed=0, cfg=4.0, top_k=1, top_p=0.0, more_smooth=False),
    "seeded": dict(g_seed=0, cfg=4.0, top_k=50, top_p=0.95, more_smooth=False),
    "smooth": dict(g_seed=0, cfg=4.0, top_k=50, top_p=0.95, more_smooth=True),
    "seeded_cfg0": dict(g_seed=5, cfg=0.0, top_k=0, top_p=0.0, more_smooth=False),
}
IMAGE_RUNS = ("smooth",)  # more_smooth images are not decode(tokens): store them (per-block model)
IMAGE_ROWS = (0,)  # the rows of the B=4 batch whose images are stored (label 1)
INPAINT_BOX = dict(y0=0.1, x0=0.1, y1=0.8, x1=0.8, inpainting=True)


def _setup_sys_path(ref: Path):
    """Reference repo first; drop anything that would resolve `models` to our own package."""
    ours = {str(REPO_ROOT), str(REPO_ROOT / "tools")}
    cleaned = []
    for p in sys.path:
        rp = str(Path(p or ".").resolve())
        if rp in ours:
            continue
        cleaned.append(p)
    sys.path[:] = [str(ref)] + cleaned
    for name in list(sys.modules):  # in case something imported a `models`/`dist` already
        if name in ("models", "dist") or name.startswith("models."):
            del sys.modules[name]


def _load_refweights():
    path = REPO_ROOT / "tests" / "refweights.py"
    spec = importlib.util.spec_from_file_location("varstudio_refweights", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_ref_args(doc: str, repo: str, commit: str, fixture: str):
    """The fixture makers' command line: --ref (a work tree of `repo` at `commit`, resolved) and --out
    (tests/fixtures/<fixture> by default)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--ref", required=True, help=f"work tree of {repo} (commit {commit[:7]})")
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "fixtures" / fixture))
    args = ap.parse_args()
    args.ref = Path(args.ref).resolve()
    return args


@contextlib.contextmanager
def recording_draws(module, name: str = "sample_with_top_k_top_p_"):
    """While open, `module.<name>` (the reference sampler, called by its module's global name) also
    appends each call's drawn tokens (ret[:, :, 0]) to the yielded list; restored on exit."""
    orig, drawn = getattr(module, name), []

    def recording(logits_BlV, *a, **kw):
        ret = orig(logits_BlV, *a, **kw)
        drawn.append(ret[:, :, 0].clone())
        return ret

    setattr(module, name, recording)
    try:
        yield drawn
    finally:
        setattr(module, name, orig)


def save_checked(out: dict, checks: dict, path: str):
    """Refuses a degenerate fixture (a sanity check false), else stores the checks with it and saves it."""
    import torch

    print(checks)
    assert all(checks.values()), checks
    out["checks"] = checks
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


def _keys(sd):
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()]


def main():
    args = parse_ref_args(__doc__, "FoundationVision/VAR", REF_COMMIT, "official_tiny.pt")
    ref = args.ref
    _setup_sys_path(ref)

    import torch
    import torch.nn.functional as F

    refweights = _load_refweights()
    import models  # the reference package
    import models.var as ref_var_mod
    from models.vqvae import VQVAE
    from models.var import VAR
    assert Path(models.__file__).resolve().parent == ref / "models", models.__file__

    torch.set_grad_enabled(False)
    notes = []

    # ------------------------------------------------------------------ models
    vae = VQVAE(**VAE_CFG).eval()
    vae_sd = refweights.fill_reference_weights(vae.state_dict(), seed=SEEDS["vae"])
    vae.load_state_dict(vae_sd, strict=True)

    def build_var(shared, seed):
        m = VAR(vae_local=vae, shared_aln=shared, **VAR_CFG).eval()
        m.load_state_dict(refweights.fill_reference_weights(m.state_dict(), seed=seed), strict=True)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    var = build_var(False, SEEDS["var"])
    var_sh = build_var(True, SEEDS["var_shared"])
    L = var.L
    out = {}
    out["config"] = dict(
        vocab_size=VAE_CFG["vocab_size"], z_channels=VAE_CFG["z_channels"], ch=VAE_CFG["ch"],
        share_quant_resi=VAE_CFG["share_quant_resi"], patch_nums=PATCH_NUMS, image_size=256, L=L,
        num_classes=VAR_CFG["num_classes"], depth=VAR_CFG["depth"], embed_dim=VAR_CFG["embed_dim"],
        num_heads=VAR_CFG["num_heads"], norm_eps=VAR_CFG["norm_eps"], attn_l2_norm=VAR_CFG["attn_l2_norm"],
        cond_drop_rate=VAR_CFG["cond_drop_rate"], mlp_ratio=4.0,
        vae_seed=SEEDS["vae"], var_seed=SEEDS["var"], var_shared_seed=SEEDS["var_shared"],
        ref_commit=REF_COMMIT, torch_version=str(torch.__version__), rng_device=str(var.rng.device),
        num_threads=torch.get_num_threads(),
    )
    out["vae_keys"] = _keys(vae.state_dict())
    out["var_keys"] = _keys(var.state_dict())
    out["var_shared_keys"] = _keys(var_sh.state_dict())

    # ------------------------------------------------------------------ VQVAE
    images = refweights.make_reference_images()
    enc = vae.img_to_idxBl(images)
    out["encode_tokens"] = [t.clone() for t in enc]
    out["decode_images"] = vae.idxBl_to_img(enc, same_shape=True, last_one=True).clone()
    out["var_input"] = vae.quantize.idxBl_to_var_input(enc).clone()

    # ------------------------------------------------------------------ teacher-forced logits
    labels = torch.tensor([3, 7])
    out["forward_labels"] = labels
    for key, m in (("forward_logits", var), ("forward_logits_shared", var_sh)):
        a = m(labels, out["var_input"]).clone()
        b = m(labels, out["var_input"]).clone()
        assert torch.equal(a, b), f"{key}: forward is not deterministic"
        out[key] = a

    # ------------------------------------------------------------------ sampling
    orig_sampler = ref_var_mod.sample_with_top_k_top_p_
    rec = {"tokens": [], "gaps": [], "k_gaps": [], "p_gaps": []}

    def recording_sampler(logits_BlV, *a, **kw):
        # how close the (fp32) logits are to a decision boundary, measured before the in-place filtering:
        # top1-top2 (greedy ties), k-th vs (k+1)-th logit (top-k cut), |cumsum - (1-top_p)| (top-p cut)
        srt = logits_BlV.sort(dim=-1, descending=True).values
        rec["gaps"].append((srt[..., 0] - srt[..., 1]).min().item())
        top_k, top_p = kw.get("top_k", 0), kw.get("top_p", 0.0)
        if 0 < top_k < srt.shape[-1]:
            rec["k_gaps"].append((srt[..., top_k - 1] - srt[..., top_k]).min().item())
        if top_p > 0:
            kept = srt.clone()
            if top_k > 0:
                kept[..., top_k:] = -torch.inf
            cs = kept.flip(-1).softmax(-1).cumsum(-1)
            rec["p_gaps"].append((cs - (1 - top_p)).abs().min().item())
        ret = orig_sampler(logits_BlV, *a, **kw)
        rec["tokens"].append(ret[:, :, 0].clone())
        return ret

    sample_labels = torch.tensor([1, 1, 3, 9])
    out["sample_labels"] = sample_labels
    out["sample_args"] = {k: dict(v) for k, v in SAMPLE_ARGS.items()}
    out["images_note"] = (f"sample_<run>_images hold rows {list(IMAGE_ROWS)} of the B=4 batch "
                          f"(labels {[int(sample_labels[i]) for i in IMAGE_ROWS]}), per-block model only, "
                          f"runs {list(IMAGE_RUNS)}; values in [0,1] as returned by autoregressive_infer_cfg. "
                          "Other runs store tokens only: their images are decode(tokens), checked via decode_images.")
    summary = {}
    ref_var_mod.sample_with_top_k_top_p_ = recording_sampler
    try:
        for prefix, m in (("sample_", var), ("sample_shared_", var_sh)):
            for run, kw in SAMPLE_ARGS.items():
                for v in rec.values(): v.clear()
                img = m.autoregressive_infer_cfg(B=4, label_B=sample_labels.clone(), **kw)
                toks = [t.clone() for t in rec["tokens"]]
                assert [tuple(t.shape) for t in toks] == [(4, pn * pn) for pn in PATCH_NUMS]
                out[f"{prefix}{run}_tokens"] = toks
                if prefix == "sample_" and run in IMAGE_RUNS:
                    out[f"{prefix}{run}_images"] = img[list(IMAGE_ROWS)].clone()
                summary[f"{prefix}{run}"] = dict(
                    last_scale_distinct=[len(set(toks[-1][i].tolist())) for i in range(4)],
                    min_top2_gap=min(rec["gaps"]), min_topk_gap=min(rec["k_gaps"], default=None),
                    min_topp_gap=min(rec["p_gaps"], default=None), img=img.clone(), toks=toks)
    finally:
        ref_var_mod.sample_with_top_k_top_p_ = orig_sampler

    # ------------------------------------------------------------------ zero-shot editing (notebook cell 2)
    nb_path = ref / "demo_zero_shot_edit.ipynb"
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"
             and "def autoregressive_infer_cfg_with_mask" in "".join(c["source"])]
    assert len(cells) == 1
    ns = {"__name__": "demo_zero_shot_edit_cell"}
    exec(compile("".join(cells[0]["source"]), f"{nb_path}:helpers-cell", "exec"), ns)
    masked_infer = types.MethodType(ns["autoregressive_infer_cfg_with_mask"], var)  # self = reference VAR
    get_edit_mask, replace_embedding = ns["get_edit_mask"], ns["replace_embedding"]

    edit_mask = get_edit_mask(list(PATCH_NUMS), device="cpu", **INPAINT_BOX)
    keep_masks = []  # per scale: True = GT token kept, False = generated (the notebook's rule, via its own function)
    for pn in PATCH_NUMS:
        mk = replace_embedding(edit_mask, torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn), pn, pn)
        keep_masks.append(mk[0, 0].bool().clone())
    out["inpaint_masks"] = keep_masks

    image = images[0:1]
    input_img_tokens = vae.img_to_idxBl(image)
    out["inpaint_input_tokens"] = [t.clone() for t in input_img_tokens]

    h_fed = []
    orig_gnai = vae.quantize.get_next_autoregressive_input

    def recording_gnai(si, SN, f_hat, h_BChw):
        h_fed.append(h_BChw.clone())
        return orig_gnai(si, SN, f_hat, h_BChw)

    ns["sample_with_top_k_top_p_"] = recording_sampler  # the cell's own global binding
    vae.quantize.get_next_autoregressive_input = recording_gnai
    try:
        # "no class" is index num_classes (1000 for ImageNet models, 10 in this tiny config)
        for prefix, label in (("inpaint_", var.num_classes), ("inpaint_cls_", 3)):
            kw = dict(B=1, label_B=torch.tensor([label]), cfg=3, top_k=1, top_p=0.0, g_seed=0, more_smooth=False)
            for v in rec.values(): v.clear()
            h_fed.clear()
            img = masked_infer(input_img_tokens=input_img_tokens, edit_mask=edit_mask, **kw)
            sampled = [t.clone() for t in rec["tokens"]]
            eff = [torch.where(km.reshape(1, -1), gt, s) for km, gt, s in zip(keep_masks, input_img_tokens, sampled)]
            for si, (pn, t, h) in enumerate(zip(PATCH_NUMS, eff, h_fed)):  # effective tokens == what was fed to f_hat
                e = vae.quantize.embedding(t).transpose(1, 2).reshape(1, VAE_CFG["z_channels"], pn, pn)
                assert torch.equal(e, h), f"{prefix} scale {si}: effective tokens do not match the fed embedding"
            out[f"{prefix}sampled_tokens"] = sampled
            out[f"{prefix}tokens"] = eff
            out[f"{prefix}mask_last"] = keep_masks[-1].clone()
            out[f"{prefix}args"] = dict(label_B=[label], B=1, cfg=3, top_k=1, top_p=0.0, g_seed=0, more_smooth=False,
                                        image="images[0:1]", edit_mask=dict(patch_nums=PATCH_NUMS, device="cpu", **INPAINT_BOX))
            summary[prefix] = dict(min_top2_gap=min(rec["gaps"]),
                                   n_generated=int((~keep_masks[-1]).sum()),
                                   n_changed_last=int((eff[-1] != input_img_tokens[-1]).sum()))
    finally:
        vae.quantize.get_next_autoregressive_input = orig_gnai
        ns["sample_with_top_k_top_p_"] = orig_sampler
    out["inpaint_note"] = (
        "autoregressive_infer_cfg_with_mask / get_edit_mask / replace_embedding were exec'd unchanged from "
        "demo_zero_shot_edit.ipynb (the code cell defining them) and called as fn(var, ...) like the notebook. "
        "No patch was needed for CPU; the notebook's torch.inference_mode + torch.autocast('cuda', float16) "
        "wrapper was replaced by torch.no_grad in fp32. Only the module-global sample_with_top_k_top_p_ "
        "of that cell was wrapped to record tokens. inpaint_masks[si] (True = keep GT) is the notebook rule "
        "(bilinear resize of the 16x16 edit mask, >0.5, all-True when pn*pn<=3), computed with the "
        "notebook's replace_embedding; inpaint_tokens = where(mask, inpaint_input_tokens, sampled), verified "
        "equal to the embeddings actually fed to get_next_autoregressive_input. The no-class label is "
        "num_classes=10 here (the notebook's 1000 is ImageNet's null class; 1000 is out of range for class_emb).")

    # ------------------------------------------------------------------ checks / summary
    for k, v in summary.items():
        if "last_scale_distinct" in v:
            print(f"{k:28s} distinct tokens in last scale per row {v['last_scale_distinct']}, "
                  f"min top1-top2 logit gap {v['min_top2_gap']:.3g}, top-k cut gap {v['min_topk_gap']}, "
                  f"top-p cut gap {v['min_topp_gap']}")
        else:
            print(f"{k:28s} min top1-top2 gap {v['min_top2_gap']:.3g}, generated positions (last scale) "
                  f"{v['n_generated']}, tokens changed vs input {v['n_changed_last']}")
    for prefix in ("sample_", "sample_shared_"):
        g, s, sm = (summary[prefix + r]["toks"] for r in ("greedy", "seeded", "smooth"))
        c0 = summary[prefix + "seeded_cfg0"]["toks"]
        same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
        chk = {
            "greedy label1 != label3": not torch.equal(g[-1][0], g[-1][2]),
            "greedy rows0/1 (same label) equal": torch.equal(g[-1][0], g[-1][1]),
            "seeded != greedy": not same(s, g),
            "seeded rows0/1 differ": not torch.equal(s[-1][0], s[-1][1]),
            "smooth != seeded": not same(sm, s),
            "cfg0 != seeded": not same(c0, s),
        }
        print(prefix, chk)
        out.setdefault("checks", {})[prefix] = chk
        if not all(chk.values()):
            notes.append(f"{prefix}: degenerate sampling check failed: {chk}")

    out["checks"]["boundary_gaps"] = {k: {g: v.get(g) for g in ("min_top2_gap", "min_topk_gap", "min_topp_gap")}
                                      for k, v in summary.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB), {len(out)} keys; "
          f"state dict keys: vae {len(out['vae_keys'])}, var {len(out['var_keys'])}, "
          f"var_shared {len(out['var_shared_keys'])}")
    for n in notes:
        print("WARNING:", n)


if __name__ == "__main__":
    main()
