"""Generate the golden fixture `tests/fixtures/controlvar_tiny.pt` by RUNNING the published ControlVAR code.

This script is ours; it only imports and runs the reference implementation (lxa9867/ControlVAR,
commit 9433c18) to record numbers that our re-implementation (models/controlvar.py, the ControlVAR
path of VARPipeline) must reproduce. No reference code is copied into this repository.

Regenerate (CPU, fp32, torch 2.x):

    mkdir -p /tmp/cvarref && git --git-dir=<mirror>/lxa9867+ControlVAR/repo archive \\
        9433c187edebbfeabb99d0e499e6a647cee1dcfb | tar -x -C /tmp/cvarref   # or: git clone + checkout 9433c18
    python3 tools/make_controlvar_fixture.py --ref /tmp/cvarref --out tests/fixtures/controlvar_tiny.pt

What it does:
  * builds the reference model as its trainer does (`build_control_var(mask_type='interleave_append',
    multi_cond=True)`, the other flags at their defaults) at depth 4 with the released shape rule
    (width 64*4, 4 heads, 1000 classes, plain attention: cos_attn is only on at depth 30) and a
    VQVAE with the official codebook (4096 x 32, 4 Phi) but narrow conv widths (ch=32); fills both
    with tests/refweights.py::fill_reference_weights (seeds in the config) and loads them strictly;
  * turns the pictures of tests/refweights.py into the val loader's tensors (uint8/255 in float32,
    then (x-0.5)/0.5: ToTensor + Normalize(0.5, 0.5), at 256 px, no crop), tokenises them with the
    reference `vqvae.img_to_idxBl` and samples with `conditional_infer_cfg(c_mask=..., cond_type=...)`,
    as the val script's pix_cond_inference does;
  * records the draws of every scale (by wrapping models.control_var.sample_with_top_k_top_p_): the
    first branch's rows, control half and image half; the map tokens; one image (float16).

Only the random weights' seeds are stored, not the weights (the test regenerates them).
"""
from pathlib import Path

import make_official_fixture  # tools/: the shared reference-import helpers

REF_COMMIT = "9433c187edebbfeabb99d0e499e6a647cee1dcfb"
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEPTH = 4
VAE_CFG = dict(vocab_size=4096, z_channels=32, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PATCH_NUMS)
SEEDS = dict(vae=20, controlvar=21)
TYPES = {"segmentation": 0, "canny": 1, "depth": 2, "normal": 3}  # the val script's {'mask': 0, 'canny': 1, ...}
LABELS = [1, 1, 437, 980]
# pictures: 0..2 make_control_pictures (edge, grey ramp, colour field), 3 make_segmentation_picture
# run -> (control type, picture per image (one index = shared), labels, conditional_infer_cfg args)
RUNS = {
    "greedy": ("canny", [0], LABELS, dict(g_seed=0, cfg=(4.0, 4.0, 4.0), top_k=1, top_p=0.0)),
    "seeded": ("depth", [1], LABELS, dict(g_seed=42, cfg=(4.0, 4.0, 4.0), top_k=900, top_p=0.96)),
    "sharp": ("normal", [2, 2, 0, 1], LABELS, dict(g_seed=3, cfg=(8.0, 8.0, 8.0), top_k=4, top_p=0.5)),
    "segmentation": ("segmentation", [3], LABELS, dict(g_seed=5, cfg=(3.0, 1.0, 6.0), top_k=50, top_p=0.9)),
    "per_label": ("segmentation", [3, 3, 0, 0], [1, 1, 437, 437],
                  dict(g_seed=6, cfg=(4.0, 2.0, 5.0), top_k=900, top_p=0.96)),
    "cfg0": ("canny", [0, 1, 2, 3], LABELS, dict(g_seed=7, cfg=(0.0, 0.0, 0.0), top_k=0, top_p=0.0)),
}
IMAGE_RUNS = ("seeded",)


def pictures():
    refweights = make_official_fixture._load_refweights()
    return refweights.make_control_pictures() + [refweights.make_segmentation_picture()]


def loader_tensor(picture):
    """The val loader's transform at 256 px: ToTensor (uint8/255, float32) + Normalize(0.5, 0.5)."""
    import numpy as np
    import torch

    arr = np.asarray(picture.convert("RGB"))
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    return t.sub(0.5).div(0.5)[None]


def main():
    args = make_official_fixture.parse_ref_args(__doc__, "lxa9867/ControlVAR", REF_COMMIT, "controlvar_tiny.pt")
    ref = args.ref
    make_official_fixture._setup_sys_path(ref)

    import torch

    refweights = make_official_fixture._load_refweights()
    import models
    import models.control_var as ref_cv
    from models import VQVAE, build_control_var
    assert Path(models.__file__).resolve().parent == ref / "models", models.__file__
    torch.set_grad_enabled(False)

    vae = VQVAE(**VAE_CFG).eval()
    vae.load_state_dict(refweights.fill_reference_weights(vae.state_dict(), seed=SEEDS["vae"]), strict=True)
    cv = build_control_var(vae=vae, depth=DEPTH, patch_nums=PATCH_NUMS, mask_type="interleave_append",
                           multi_cond=True, flash_if_available=False, fused_if_available=False).eval()
    assert not cv.blocks[0].attn.cos_attn and cv.mask_factor == 2 and not cv.indep
    cv.load_state_dict(refweights.fill_reference_weights(cv.state_dict(), seed=SEEDS["controlvar"]), strict=True)
    keys = [(k, tuple(v.shape), str(v.dtype)) for k, v in cv.state_dict().items()]

    pics = pictures()
    out = {"config": dict(depth=DEPTH, embed_dim=64 * DEPTH, num_heads=DEPTH, num_classes=1000, patch_nums=PATCH_NUMS,
                          vae=dict(VAE_CFG, v_patch_nums=list(PATCH_NUMS)), seeds=SEEDS, ref_commit=REF_COMMIT,
                          torch_version=str(torch.__version__), rng_device=str(cv.rng.device)),
           "keys": keys, "types": TYPES,
           "runs": {k: dict(control_type=t, pictures=p, labels=lab, **{kk: (list(v) if kk == "cfg" else v)
                                                                     for kk, v in kw.items()})
                    for k, (t, p, lab, kw) in RUNS.items()}}

    with make_official_fixture.recording_draws(ref_cv) as rec:
        for run, (ctype, pic_ids, labels, kw) in RUNS.items():
            rec.clear()
            B = len(labels)
            ids = pic_ids * B if len(pic_ids) == 1 else pic_ids
            masks = torch.cat([loader_tensor(pics[i]) for i in ids])
            c_mask = vae.img_to_idxBl(masks, v_patch_nums=PATCH_NUMS)  # pix_cond_inference
            cond_type = torch.tensor([TYPES[ctype]] * B)
            img = cv.conditional_infer_cfg(B=B, label_B=torch.tensor(labels), c_mask=c_mask, c_img=None,
                                           cond_type=cond_type, more_smooth=False, **kw)
            assert [tuple(t.shape) for t in rec] == [(4 * B, 2 * pn * pn) for pn in PATCH_NUMS]
            out[f"{run}_tokens"] = [t[:B, pn * pn:].to(torch.int16).clone() for t, pn in zip(rec, PATCH_NUMS)]
            out[f"{run}_control"] = [t.to(torch.int16).clone() for t in c_mask]
            # the free branch's own control draws (never forced): the branches really diverge
            out[f"{run}_free_control_last"] = rec[-1][3 * B:, :PATCH_NUMS[-1] ** 2].to(torch.int16).clone()
            assert tuple(img.shape) == (B, 3, 512, 256)
            if run in IMAGE_RUNS:
                out[f"{run}_image"] = img[:1, :, 256:].half().clone()  # row 0's image half, in [0, 1]
            print(f"{run:14s} last scale distinct image tokens per row "
                  f"{[len(set(rec[-1][i, PATCH_NUMS[-1] ** 2:].tolist())) for i in range(B)]}")

    chk = {
        "greedy rows 0/1 equal (same label, same map)": torch.equal(out["greedy_tokens"][-1][0], out["greedy_tokens"][-1][1]),
        "seeded rows 0/1 differ": not torch.equal(out["seeded_tokens"][-1][0], out["seeded_tokens"][-1][1]),
        "the free branch's control is not the map": not torch.equal(out["seeded_free_control_last"][0],
                                                                    out["seeded_control"][-1][0]),
    }
    make_official_fixture.save_checked(out, chk, args.out)


if __name__ == "__main__":
    main()
