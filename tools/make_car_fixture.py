"""Generate the golden fixture `tests/fixtures/car_tiny.pt` by RUNNING the published CAR code.

This script is ours; it only imports and runs the reference implementation (MiracleDance/CAR,
commit c2e383b, which carries its own copy of VAR's models) to record numbers that our
re-implementation (models/car.py, VARPipeline.load_control) must reproduce. No reference code is
copied into this repository.

Regenerate (CPU, fp32, torch 2.x):

    mkdir -p /tmp/carref && git --git-dir=<mirror>/MiracleDance+CAR/repo archive \\
        c2e383b83cf8245912a5ef222ad54355290534a6 | tar -x -C /tmp/carref   # or: git clone + checkout c2e383b
    python3 tools/make_car_fixture.py --ref /tmp/carref --out tests/fixtures/car_tiny.pt

What it does:
  * builds the reference CAR on a d4 VAR with the released shape rule (width 64*4, 4 heads, 1000
    classes, l2-normalised attention; CAR: 2 car_blocks and the released stem 64..1024) and a VQVAE
    with the official codebook (4096 x 32, 4 Phi) but narrow conv widths (ch=32: only decoding
    uses them); fills the VAR keys, the VQVAE keys and each adapter's `car*` keys with
    tests/refweights.py::fill_reference_weights (each dict on its own, seeds in the config) and loads
    the merged dict with strict=True, as inference.py does;
  * turns tests/refweights.py::make_control_pictures into per-scale tensors with inference.py's own
    nested `get_control_for_each_scale` (its source is taken from inference.py with ast and exec'd,
    with the official utils.control_data_utils helpers);
  * records the token streams of `car_inference` (by wrapping models.car.sample_with_top_k_top_p_)
    for several settings, two adapters ("canny", "hed": two weight seeds), a shared picture and one
    picture per image; the image of the more_smooth run (not decode(tokens)).

Only the random weights' seeds are stored, not the weights (the test regenerates them).
"""
import ast
import sys
from pathlib import Path

import make_official_fixture  # tools/: the shared reference-import helpers
REF_COMMIT = "c2e383b83cf8245912a5ef222ad54355290534a6"
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEPTH = 4
VAE_CFG = dict(vocab_size=4096, z_channels=32, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PATCH_NUMS)
SEEDS = dict(vae=10, var=11, car_canny=12, car_hed=13)
LABELS = [1, 1, 437, 980]
# run name -> adapter, pictures (indices into make_control_pictures; one = shared), car_inference args
RUNS = {
    "greedy": ("canny", [0], dict(g_seed=0, cfg=4.0, top_k=1, top_p=0.0, more_smooth=False)),
    "seeded": ("canny", [0], dict(g_seed=3, cfg=4.0, top_k=900, top_p=0.95, more_smooth=False)),
    "smooth": ("canny", [0], dict(g_seed=1, cfg=4.0, top_k=900, top_p=0.95, more_smooth=True)),
    "cfg0": ("canny", [0], dict(g_seed=4, cfg=0.0, top_k=0, top_p=0.0, more_smooth=False)),
    "hed_greedy": ("hed", [1], dict(g_seed=0, cfg=2.0, top_k=1, top_p=0.0, more_smooth=False)),
    "hed_per_image": ("hed", [1, 1, 2, 0], dict(g_seed=5, cfg=4.0, top_k=50, top_p=0.9, more_smooth=False)),
    "canny_per_image": ("canny", [0, 0, 2, 1], dict(g_seed=6, cfg=3.0, top_k=900, top_p=0.95, more_smooth=False)),
}
IMAGE_RUNS = ("smooth",)


def _setup_sys_path(ref: Path):
    """The reference repo first, our package out of the way (as for the VAR fixture); CAR also has a
    top-level `utils` package."""
    make_official_fixture._setup_sys_path(ref)
    for name in list(sys.modules):
        if name == "utils" or name.startswith("utils."):
            del sys.modules[name]


def _official_scale_fn(ref: Path):
    """inference.py's nested get_control_for_each_scale, exec'd from its source."""
    from utils.control_data_utils import numpy_to_pt, pil_to_numpy

    src = (ref / "inference.py").read_text()
    fns = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "get_control_for_each_scale"]
    assert len(fns) == 1
    ns = {"pil_to_numpy": pil_to_numpy, "numpy_to_pt": numpy_to_pt}
    exec(compile(ast.Module(body=[fns[0]], type_ignores=[]), f"{ref}/inference.py", "exec"), ns)
    return ns["get_control_for_each_scale"]


def main():
    args = make_official_fixture.parse_ref_args(__doc__, "MiracleDance/CAR", REF_COMMIT, "car_tiny.pt")
    ref = args.ref
    _setup_sys_path(ref)

    import torch

    refweights = make_official_fixture._load_refweights()
    import models
    import models.car as ref_car_mod
    from models import CAR, VQVAE
    assert Path(models.__file__).resolve().parent == ref / "models", models.__file__
    torch.set_grad_enabled(False)

    vae = VQVAE(**VAE_CFG).eval()
    vae.load_state_dict(refweights.fill_reference_weights(vae.state_dict(), seed=SEEDS["vae"]), strict=True)
    cars = {}
    for ctype in ("canny", "hed"):
        car = CAR(vae_local=vae, num_classes=1000, depth=DEPTH, embed_dim=64 * DEPTH, num_heads=DEPTH,
                  drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.0, attn_l2_norm=True,
                  patch_nums=PATCH_NUMS, flash_if_available=False, fused_if_available=False).eval()
        sd = car.state_dict()
        var_sd = refweights.fill_reference_weights({k: v for k, v in sd.items() if "car" not in k}, seed=SEEDS["var"])
        car_sd = refweights.fill_reference_weights({k: v for k, v in sd.items() if "car" in k},
                                                   seed=SEEDS[f"car_{ctype}"])
        car.load_state_dict({**var_sd, **car_sd}, strict=True)  # inference.py L33-38
        cars[ctype] = car
    car_keys = [(k, tuple(v.shape), str(v.dtype)) for k, v in cars["canny"].state_dict().items() if "car" in k]
    var_keys = [(k, tuple(v.shape), str(v.dtype)) for k, v in cars["canny"].state_dict().items() if "car" not in k]

    pictures = refweights.make_control_pictures()
    scale_fn = _official_scale_fn(ref)
    per_picture = [scale_fn(p, PATCH_NUMS)[1] for p in pictures]  # per picture: per scale (1, 3, 16pn, 16pn)
    out = {"config": dict(depth=DEPTH, embed_dim=64 * DEPTH, num_heads=DEPTH, num_classes=1000, patch_nums=PATCH_NUMS,
                          vae=dict(VAE_CFG, v_patch_nums=list(PATCH_NUMS)), seeds=SEEDS, ref_commit=REF_COMMIT,
                          torch_version=str(torch.__version__), rng_device=str(cars["canny"].rng.device)),
           "car_keys": car_keys, "var_keys": var_keys, "labels": LABELS,
           "runs": {k: dict(control_type=t, pictures=p, **kw) for k, (t, p, kw) in RUNS.items()},
           # diagnostics: the coarse scales' tensors of every picture, and every scale's sum
           "maps_coarse": [[m.clone() for m in maps[:4]] for maps in per_picture],
           "maps_sums": [[float(m.double().sum()) for m in maps] for maps in per_picture]}

    with make_official_fixture.recording_draws(ref_car_mod) as rec:
        for run, (ctype, pics, kw) in RUNS.items():
            rec.clear()
            B = len(LABELS)
            if len(pics) == 1:  # inference.py: one picture repeated to the batch
                tensors = [m.repeat(B, 1, 1, 1) for m in per_picture[pics[0]]]
            else:
                tensors = [torch.cat([per_picture[i][si] for i in pics]) for si in range(len(PATCH_NUMS))]
            img = cars[ctype].car_inference(B=B, label_B=torch.tensor(LABELS), control_tensors=tensors, **kw)
            assert [tuple(t.shape) for t in rec] == [(B, pn * pn) for pn in PATCH_NUMS]
            out[f"{run}_tokens"] = [t.clone() for t in rec]
            if run in IMAGE_RUNS:
                out[f"{run}_image"] = img[:1].clone()  # row 0, in [0, 1]
            print(f"{run:16s} last scale distinct tokens per row "
                  f"{[len(set(rec[-1][i].tolist())) for i in range(B)]}")

    # sanity: the control matters, the two adapters differ, the per-image pictures differ
    chk = {
        "greedy rows 0/1 equal (same label, same map)": torch.equal(out["greedy_tokens"][-1][0], out["greedy_tokens"][-1][1]),
        "canny vs hed greedy differ": not torch.equal(out["greedy_tokens"][-1], out["hed_greedy_tokens"][-1]),
        "seeded rows 0/1 differ": not torch.equal(out["seeded_tokens"][-1][0], out["seeded_tokens"][-1][1]),
    }
    make_official_fixture.save_checked(out, chk, args.out)


if __name__ == "__main__":
    main()
