"""Generation benchmark: per-scale latency, total, decoder time and peak memory, beside baselines.

    python -m lab.bench                          # d16-sized random model, fp32 and bf16, KV cache on/off
    python -m lab.bench --model default --batch 4
    python -m lab.bench --model weights/ --device cuda --dtypes fp32,bf16,fp16
    python -m lab.bench --reference /tmp/varref  # adds the published code (fp32) on the same shapes
    python -m lab.bench --car --dtypes fp32 --batch 1 --repeat 1 --no-baseline   # CAR beside plain VAR
    python -m lab.bench --infinity 125m --dtypes fp32 --repeat 2 --no-baseline     # Infinity beside VAR d16
    python -m lab.bench --controlvar --dtypes fp32 --batch 1 --repeat 1 --no-baseline   # ControlVAR beside VAR:
        # small shapes by default (depth 6, a 32-channel VQVAE: minutes on a CPU); --full-shapes --model d16 (..d30)
        # for the released ones
    python -m lab.bench --model default --under-load 1   # torch's threads vs the studio's, with and
                                                         # without 1 competing busy process

Every row runs in a fresh subprocess (so peak memory is that run's own) and reports the median of
`--repeat` timed runs after `--warmup` (default 1) untimed ones. Baselines (no KV cache; the reference code) are
measured in the same invocation: compare ratios, not absolute seconds, across machines.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from studio.params import VAR_DEFAULTS  # the studio's sampling defaults (plain Python)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_pipeline(model: str, device: str, dtype_name: str, controlvar: bool = False):
    import torch

    from studio.pipeline import VARPipeline

    dtype = getattr(torch, DTYPES[dtype_name])
    m = __import__("re").fullmatch(r"d(\d+)(-small)?", model)
    if m is None:
        src = None if model == "default" else model
        return VARPipeline.from_pretrained(src, device=device, dtype=dtype)
    # an official-shaped model with random weights (timing does not depend on the values)
    from models.controlvar import ControlVAR, ControlVARConfig
    from models.var import VAR, VARConfig
    from models.vqvae import VQVAE, VQVAEConfig
    from studio.classes import class_names_for

    depth = int(m.group(1))
    torch.manual_seed(0)
    with torch.device("meta"):
        # "-small": a 32-channel VQVAE (the released codebook and scales) so that a CPU run takes minutes
        small = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1) if m.group(2) else {}
        vae = VQVAE(VQVAEConfig(patch_nums=VARConfig.official(depth, shared_aln=depth == 36).patch_nums, **small))
        # ControlVAR: the released shape at this depth ([control; image] per scale, 4 guidance branches)
        var = ControlVAR(ControlVARConfig.official(depth)) if controlvar else VAR(VARConfig.official(depth, shared_aln=depth == 36))
    vae, var = vae.to_empty(device="cpu"), var.to_empty(device="cpu")
    from studio.checkpoints import _reset_computed_buffers
    _reset_computed_buffers(vae, var)
    with torch.no_grad():
        for name, p in list(vae.named_parameters()) + list(var.named_parameters()):
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
    return VARPipeline(vae, var, class_names_for(1000), device=device, dtype=dtype)


def add_random_car(pipe, control_type: str = "canny"):
    """A CAR branch of the released shape for this VAR (depth/2 blocks), random weights; returns a
    condition picture (an edge drawing) for it."""
    import numpy as np
    import torch
    from PIL import Image

    from models.car import CAR, CARConfig

    with torch.device("meta"):
        car = CAR(CARConfig.for_var(pipe.var.cfg, control_type))
    car = car.to_empty(device="cpu")
    with torch.no_grad():
        for p in car.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
        for blk in car.car_blocks:
            blk.attn.zero_k_bias.zero_()
    pipe.car_controls[control_type] = car.eval().to(pipe.device, pipe.dtype)
    return edge_picture(pipe.resolution)


def edge_picture(size: int):
    """A canny-like condition picture (white grid lines on black)."""
    import numpy as np
    from PIL import Image

    a = np.zeros((size, size, 3), np.uint8)
    a[::32], a[:, ::24] = 255, 255
    return Image.fromarray(a)


SMALL_CONTROLVAR_MODEL = "d6-small"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_ours(args) -> dict:
    import torch

    torch.set_grad_enabled(False)
    pipe = build_pipeline(args.model, args.device, args.dtype, controlvar=args.as_controlvar)
    labels = [i % pipe.num_classes for i in range(args.batch)]
    kw = dict(class_labels=labels, guidance_scale=args.guidance, top_k=args.top_k, top_p=args.top_p,
              output_type="pt")
    if args.no_cache:
        kw["use_kv_cache"] = False
    if args.with_car:
        kw.update(control_image=add_random_car(pipe), control_type="canny")
    if args.as_controlvar:  # the map is tokenised by the VQVAE inside the timed call, as in use
        kw.update(control_image=edge_picture(pipe.resolution), control_type="canny")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for i in range(args.warmup + args.repeat):
        out = pipe(generator=torch.Generator(args.device).manual_seed(i), **kw)
        if i >= args.warmup:  # the warm-up runs warm up kernels and allocators
            runs.append(out.timings)
    return {
        "per_scale": [statistics.median(r["per_scale"][si] for r in runs) for si in range(pipe.num_scales)],
        "decode": statistics.median(r["decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
        "peak_mb": peak_memory_mb(args.device),
        "patch_nums": list(pipe.patch_nums),
        "threads": torch.get_num_threads(),
    }


def run_reference(args) -> dict:
    """The published implementation (fp32) on the same shapes, random weights."""
    import torch

    ref = Path(args.reference).resolve()
    here = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [str(ref)] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    for name in list(sys.modules):
        if name == "models" or name.startswith("models."):
            del sys.modules[name]
    from models import build_vae_var  # the reference package

    depth = int(args.model[1:])
    torch.manual_seed(0)
    vae, var = build_vae_var(device=args.device, depth=depth, shared_aln=depth == 36,
                             patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32) if depth == 36 else
                             (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    with torch.no_grad():
        for p in list(vae.parameters()) + list(var.parameters()):
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
    vae.eval(), var.eval()
    labels = torch.tensor([i % 1000 for i in range(args.batch)], device=args.device)
    times = []
    for i in range(args.warmup + args.repeat):
        t0 = time.perf_counter()
        with torch.inference_mode():
            var.autoregressive_infer_cfg(B=args.batch, label_B=labels, cfg=args.guidance, top_k=args.top_k,
                                         top_p=args.top_p, g_seed=i, more_smooth=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"total": statistics.median(times), "peak_mb": peak_memory_mb(args.device), "per_scale": None,
            "decode": None}


INFINITY_SHAPES = {  # released shapes (shared/notes/infinity.md): transformer, BSQ VAE, default size
    "125m": dict(t=dict(depth=12, embed_dim=768, num_heads=8, block_chunks=4, d_vae=32),
                 vae=dict(codebook_dim=32, ch_mult=(1, 2, 4, 4, 4)), pn="0.06M"),
    "2b": dict(t=dict(depth=32, embed_dim=2048, num_heads=16, block_chunks=8, d_vae=32),
               vae=dict(codebook_dim=32, ch_mult=(1, 2, 4, 4, 4)), pn="1M"),
    "8b": dict(t=dict(depth=40, embed_dim=3584, num_heads=28, block_chunks=8, d_vae=56),
               vae=dict(codebook_dim=14, ch_mult=(1, 2, 4, 4)), pn="1M"),
}


def infinity_config(size: str):
    """The transformer config of a released Infinity shape (INFINITY_SHAPES), as its checkpoint implies."""
    from models.infinity import InfinityConfig

    spec = INFINITY_SHAPES[size]
    C = spec["t"]["embed_dim"]
    return InfinityConfig(**spec["t"], mlp_hidden=round(4 * C / 256) * 256, text_channels=2048,
                          pool_heads=2048 // (64 if C > 4096 else 128))


def build_infinity(size: str, device: str, dtype_name: str):
    """An Infinity of a released shape with random weights (timing does not depend on the values)."""
    import torch

    from models.bsq_vae import BSQVAE, BSQVAEConfig
    from models.infinity import Infinity
    from studio.infinity import InfinityPipeline

    spec = INFINITY_SHAPES[size]
    torch.manual_seed(0)
    model, vae = Infinity(infinity_config(size)), BSQVAE(BSQVAEConfig(**spec["vae"]))
    with torch.no_grad():
        for p in list(model.parameters()) + list(vae.parameters()):
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
    return InfinityPipeline(model, vae, None, device=device, dtype=getattr(torch, DTYPES[dtype_name]),
                            default_pn=spec["pn"])


def infinity_memory_gb(size: str, dtype_name: str, batch: int) -> tuple:
    """(weights, KV cache) in GB for an Infinity of a released shape at its default size: the cache keeps
    keys and values of every token of every scale, for the 2 x batch rows of guidance, in every block."""
    import torch

    from models.infinity import Infinity
    from studio.infinity import schedule_for

    spec, cfg = INFINITY_SHAPES[size], infinity_config(size)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Infinity(cfg).parameters())
    nbytes = torch.empty(0, dtype=getattr(torch, DTYPES[dtype_name])).element_size()
    tokens = sum(h * w for h, w in schedule_for(1.0, spec["pn"]).scales)
    kv = spec["t"]["depth"] * 2 * (2 * batch) * tokens * spec["t"]["embed_dim"] * nbytes
    return n_params * nbytes / 1e9, kv / 1e9


def available_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("inf")


def run_infinity(args) -> dict:
    """Prompt features of 30 tokens (the T5 encoder is not timed: it runs once per prompt, cached)."""
    import torch

    torch.set_grad_enabled(False)
    pipe = build_infinity(args.infinity, args.device, args.dtype)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(args.batch, 30, 2048, generator=g)
    mask = torch.ones(args.batch, 30, dtype=torch.bool)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for i in range(args.warmup + args.repeat):
        out = pipe(prompt_embeds=emb, prompt_attention_mask=mask, output_type="pt",
                   generator=torch.Generator(args.device).manual_seed(i))
        if i >= args.warmup:
            runs.append(out.timings)
    sched = pipe.schedule()
    return {
        "per_scale": [statistics.median(r["per_scale"][si] for r in runs) for si in range(len(sched.scales))],
        "decode": statistics.median(r["decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
        "peak_mb": peak_memory_mb(args.device),
        "scales": [f"{h}x{w}" for h, w in pipe.vae_scales(sched)],
        "pixels": f"{sched.height}x{sched.width}",
    }


def print_scales_table(title, rows, scale_names):
    names = [r[0] for r in rows]
    w = max(14, max(len(n) for n in names) + 2)
    print(f"\n{title}")
    head = f"{'run':<{w}}" + "".join(f"{s:>8}" for s in scale_names) + f"{'decode':>9}{'total':>9}{'peak MB':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<{w}}" + "".join(f"{t:8.3f}" for t in r["per_scale"]) + f"{r['decode']:9.3f}{r['total']:9.3f}"
              f"{r['peak_mb']:9.0f}")


def child_main(args):
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    elif args.threads < 0:  # the studio worker's choice (studio.serve.runner.ThreadPolicy)
        from studio.serve.runner import ThreadPolicy
        ThreadPolicy(None).apply()
    if args.infinity_child:
        args.infinity = args.infinity_child
        res = run_infinity(args)
    else:
        res = run_reference(args) if args.reference else run_ours(args)
    print("BENCH_RESULT " + json.dumps(res))


def spawn(base: list, extra: list) -> dict:
    cmd = [sys.executable, "-m", "lab.bench", "--child"] + base + extra
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"benchmark run failed ({' '.join(extra)}):\n{p.stderr[-3000:]}")


def print_table(rows, patch_nums, batch):
    names = [r[0] for r in rows]
    w = max(12, max(len(n) for n in names) + 2)
    print(f"\nbatch {batch}; seconds (median); scales {patch_nums}")
    head = f"{'run':<{w}}" + "".join(f"{f'{pn}x{pn}':>8}" for pn in patch_nums) + f"{'decode':>9}{'total':>9}{'peak MB':>9}{'vs base':>9}"
    print(head)
    print("-" * len(head))
    base = rows[0][1]["total"]
    for name, r in rows:
        cells = "".join(f"{t:8.3f}" for t in r["per_scale"]) if r.get("per_scale") else " " * 8 * len(patch_nums)
        dec = f"{r['decode']:9.3f}" if r.get("decode") is not None else f"{'':>9}"
        print(f"{name:<{w}}{cells}{dec}{r['total']:9.3f}{r['peak_mb']:9.0f}{r['total'] / base:8.2f}x")


BUSY_LOOP = "import time\nwhile True:\n    pass"


def under_load(base: list, procs: int, repeat: int) -> None:
    """The embedded default (or --model) per image with torch's default threads and with the
    studio's choice, on the machine as it is and with `procs` competing busy processes."""
    rows = []
    for load in (0, procs):
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(load)]
        try:
            time.sleep(0.5 if load else 0.0)
            for name, threads in (("torch default", "0"), ("studio choice", "-1")):
                r = spawn(base, ["--dtype", "fp32", "--threads", threads])
                rows.append((load, name, r))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    print(f"\nthreads under load: seconds per image (median of {repeat}); {os.cpu_count()} cores; "
          f"competing load = busy-loop processes started by this benchmark (other programs also count)")
    head = f"{'competing':>10}  {'threads':<16}{'used':>6}{'per image':>11}{'vs default':>12}"
    print(head)
    print("-" * len(head))
    for load, name, r in rows:
        ref = next(x for lo, n, x in rows if lo == load and n == "torch default")
        batch = int(base[base.index("--batch") + 1])
        print(f"{load:>10}  {name:<16}{r['threads']:>6}{r['total'] / batch:11.3f}{r['total'] / ref['total']:11.2f}x")


def print_car_table(pairs, batch, name: str = "CAR"):
    """CAR (or ControlVAR) beside the plain run of the same dtype: seconds per image and the ratio."""
    print(f"\n{name} vs plain VAR (same invocation; batch {batch}; seconds per image, median)")
    head = f"{'dtype':<8}{'plain':>10}{name:>11}{name + '/plain':>17}{'plain MB':>10}{name + ' MB':>14}"
    print(head)
    print("-" * len(head))
    for d, plain, car in pairs:
        print(f"{d:<8}{plain['total'] / batch:10.3f}{car['total'] / batch:11.3f}{car['total'] / plain['total']:16.2f}x"
              f"{plain['peak_mb']:10.0f}{car['peak_mb']:14.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="VAR generation benchmark (prints a table)")
    ap.add_argument("--model", default="d16", help="dNN (official shape, random weights), 'default', or a weights folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs before the timed ones (0 for shapes that take an hour on a CPU)")
    ap.add_argument("--guidance", type=float, default=VAR_DEFAULTS["guidance_scale"])
    ap.add_argument("--top-k", type=int, default=VAR_DEFAULTS["top_k"])
    ap.add_argument("--top-p", type=float, default=VAR_DEFAULTS["top_p"])
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: PyTorch's default, -1: the studio worker's choice)")
    ap.add_argument("--under-load", type=int, default=None, metavar="N",
                    help="only the thread table: torch's default threads vs the studio's choice, without and with "
                         "N competing busy processes")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-KV-cache runs")
    ap.add_argument("--reference", default=None, help="work tree of the published VAR code: add its fp32 run")
    ap.add_argument("--car", action="store_true",
                    help="add a CAR row per dtype (a random CAR branch of the released shape, depth/2 blocks, on a "
                         "canny-like picture) and a CAR-vs-plain table per image")
    ap.add_argument("--infinity", default=None, choices=sorted(INFINITY_SHAPES),
                    help="benchmark an Infinity of this released shape (random weights, official defaults, its "
                         "default size: 125m 256 px, 2b/8b 1024 px) beside the VAR --model baseline")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--infinity-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--controlvar", action="store_true",
                    help="add a ControlVAR row per dtype (a random model of the released shape at --model's depth, "
                         "[control; image] per scale, four guidance branches, a canny-like map) and a "
                         "ControlVAR-vs-plain table per image")
    ap.add_argument("--full-shapes", action="store_true",
                    help="--controlvar on the released shapes of --model (d16..d30); without it both rows use a "
                         "small model (depth 6, width 384, a 32-channel VQVAE, the released scales and codebook)")
    ap.add_argument("--as-controlvar", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--with-car", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.controlvar and not args.full_shapes:  # minutes on a CPU; the ratio is what the table is for
        args.model = SMALL_CONTROLVAR_MODEL
        print(f"--controlvar on small shapes ({args.model}: depth 6, a 32-channel VQVAE); --full-shapes --model d16 "
              "for the released ones")

    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be at least 1 and --warmup at least 0")
    base = ["--model", args.model, "--device", args.device, "--batch", str(args.batch), "--repeat", str(args.repeat),
            "--warmup", str(args.warmup),
            "--guidance", str(args.guidance), "--top-k", str(args.top_k), "--top-p", str(args.top_p),
            "--threads", str(args.threads)]
    if args.under_load is not None:
        return under_load(base, max(1, args.under_load), args.repeat)
    rows = []
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d}; choose from {', '.join(DTYPES)}")
    if args.reference:
        if not args.model.startswith("d"):
            ap.error("--reference needs an official shape (--model d16 ...)")
        rows.append(("reference fp32", spawn(base, ["--reference", args.reference])))
    if args.infinity:
        for d in dtypes:
            w, kv = infinity_memory_gb(args.infinity, d, args.batch)
            print(f"Infinity {args.infinity} {d}: weights {w:.1f} GB + KV cache {kv:.1f} GB (+ activations)")
            if args.device == "cpu" and w + kv > available_memory_gb():
                sys.exit(f"Infinity {args.infinity} in {d} needs about {w + kv:.1f} GB (weights and KV cache) but "
                         f"this machine has {available_memory_gb():.1f} GB available: try --dtypes bf16, or a GPU.")
        inf_rows = [(f"infinity {args.infinity} {d}", spawn(base, ["--dtype", d, "--infinity-child", args.infinity]))
                    for d in dtypes]
        var_rows = [(f"VAR {args.model} {d}", spawn(base, ["--dtype", d])) for d in dtypes]
        r0 = inf_rows[0][1]
        print_scales_table(f"Infinity {args.infinity}, {r0['pixels']} px, batch {args.batch}, cfg 3 (2 x batch rows); "
                           f"seconds (median of {args.repeat}); VAE scales", inf_rows, r0["scales"])
        pn = var_rows[0][1]["patch_nums"]
        print_scales_table(f"baseline VAR {args.model}, batch {args.batch}, same invocation", var_rows,
                           [f"{p}x{p}" for p in pn])
        print(f"\n{'dtype':<8}{'infinity s':>12}{'VAR s':>10}{'ratio':>8}{'inf MB':>9}{'VAR MB':>9}")
        for (_, a), (_, b), d in zip(inf_rows, var_rows, dtypes):
            print(f"{d:<8}{a['total']:12.3f}{b['total']:10.3f}{a['total'] / b['total']:7.2f}x{a['peak_mb']:9.0f}"
                  f"{b['peak_mb']:9.0f}")
        return
    car_pairs, cv_pairs = [], []
    if args.controlvar and not re.fullmatch(r"d\d+(-small)?", args.model):
        ap.error("--controlvar needs an official shape (--model d16 ...)")
    for d in dtypes:
        if not args.no_baseline:
            rows.append((f"{d} no cache", spawn(base, ["--dtype", d, "--no-cache"])))
        rows.append((f"{d} KV cache", spawn(base, ["--dtype", d])))
        if args.car:
            rows.append((f"{d} KV cache + CAR", spawn(base, ["--dtype", d, "--with-car"])))
            car_pairs.append((d, rows[-2][1], rows[-1][1]))
        if args.controlvar:
            plain = next(r for n, r in rows if n == f"{d} KV cache")
            rows.append((f"{d} ControlVAR", spawn(base, ["--dtype", d, "--as-controlvar"])))
            cv_pairs.append((d, plain, rows[-1][1]))
    patch_nums = next(r["patch_nums"] for _, r in rows if "patch_nums" in r)
    print_table(rows, patch_nums, args.batch)
    if car_pairs:
        print_car_table(car_pairs, args.batch)
    if cv_pairs:
        print_car_table(cv_pairs, args.batch, "ControlVAR")


if __name__ == "__main__":
    main()
