"""The whole embedded bundle from nothing, one command, with a size knob.

    python -m lab.recipe --size cpu --runs runs/recipe --out runs/recipe/bundle    # this laptop-class CPU
    python -m lab.recipe --size gpu --runs runs/recipe --out runs/recipe/bundle    # one big GPU, ~15 min
    python -m lab.recipe --size tiny --runs /tmp/r --out /tmp/r/bundle             # a smoke test (~2 min)
    python -m lab.recipe --size cpu --dry-run                                      # print the commands

Steps, in order (each is one of the lab's own commands, run as a subprocess, so this file is also
the documentation of how the bundle is made): world renders -> tokenizer (vqvae) -> decoder
fine-tune (perceptual + adversarial) -> transformer (var) -> control adapters (canny, depth,
segmentation) -> domain nets (depth, seg, class) -> assembly (fp16, <= 64 MB) -> eval. A step
whose output already exists is skipped, so an interrupted recipe is resumed by running it again
(the trainers themselves resume from their checkpoints); `--redo STEP` runs a step again.
`--only` / `--from` pick steps. Sizes differ in data, model widths and budgets only.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CONTROL_TYPES = ("canny", "depth", "segmentation")
DOMAIN_KINDS = ("depth", "seg", "class")


@dataclass
class Size:
    images: int  # world renders in the training shards
    resolution: int
    vqvae: Dict[str, object]  # config overrides (None: the trainer's default = the shipped config)
    var: Sequence[str]  # VAR size flags
    budget: Dict[str, Sequence[str]]  # per step: budget flags (--minutes / --steps) and batch size
    common: Sequence[str] = ()  # flags every trainer gets
    eval_n: int = 100
    domain: Sequence[str] = ()  # flags of every domain-net training
    threads: int = 0
    extra: Dict[str, Sequence[str]] = field(default_factory=dict)


SIZES: Dict[str, Size] = {
    # seconds: a 32 px world, a few optimizer steps per trainer; checks that the steps fit together
    "tiny": Size(
        images=32, resolution=32,
        vqvae={"vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
               "using_sa": False, "using_mid_sa": False, "patch_nums": [1, 2, 4, 8]},
        var=["--depth", "2", "--embed-dim", "64", "--num-heads", "2"],
        budget={k: ["--steps", "3", "--batch-size", "4"] for k in ("vqvae", "decoder", "var", "control")},
        common=["--num-workers", "0", "--quiet", "--eval-size", "4", "--num-samples", "2", "--log-every", "1000"],
        eval_n=4, domain=["--steps", "3", "--batch-size", "4", "--pool", "8", "--eval-n", "4", "--widths", "8,8,8"],
        threads=1, extra={"decoder": ["--disc-start", "1", "--perceptual-weight", "0"]}),
    # about 2.5 hours of 2 CPU cores, as the shipped bundle was trained (see its model card)
    "cpu": Size(
        images=12000, resolution=128, vqvae={}, var=[],
        budget={"vqvae": ["--minutes", "42", "--batch-size", "16", "--lr", "6e-4"],
                "decoder": ["--minutes", "140", "--batch-size", "8"],
                "var": ["--minutes", "60", "--batch-size", "16", "--lr", "8e-4", "--warmup-steps", "50"],
                "control": ["--minutes", "60", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "30"]},
        common=["--precision", "bf16", "--log-every", "300"], eval_n=100,
        domain=["--minutes", "4.2"], threads=2),
    # one large GPU (an H100/H200) in about 15 minutes: more data, a wider transformer, longer runs
    "gpu": Size(
        images=100000, resolution=128, vqvae={},
        var=["--depth", "10", "--embed-dim", "320", "--num-heads", "5"],
        budget={"vqvae": ["--minutes", "2", "--batch-size", "64", "--lr", "1e-3"],
                "decoder": ["--minutes", "2", "--batch-size", "32"],
                "var": ["--minutes", "5", "--batch-size", "128", "--lr", "1e-3", "--warmup-steps", "100"],
                "control": ["--minutes", "1", "--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "30"]},
        common=["--precision", "bf16", "--num-workers", "8", "--log-every", "500"], eval_n=200,
        domain=["--minutes", "0.5", "--device", "cuda", "--batch-size", "64"], threads=0),
}


@dataclass
class Step:
    name: str
    argv: List[str]
    done: Path  # the step is skipped when this exists


def steps(size: Size, runs: Path, out: Path) -> List[Step]:
    py = sys.executable
    data, r = runs / "world", runs
    thr = ["--threads", str(size.threads)] if size.threads else []
    train = [py, "-m", "lab.train"]
    s: List[Step] = [Step("world", [py, "-m", "lab.worlddata", "--out", str(data), "--count", str(size.images),
                                    "--size", str(size.resolution), "--shard-size", str(min(1000, size.images))],
                          data / "meta.json")]
    vq_cfg = ["--config", json.dumps(size.vqvae)] if size.vqvae else []
    s.append(Step("vqvae", train + ["vqvae", "--out", str(r / "vqvae"), "--data", str(data), *vq_cfg,
                                    *size.budget["vqvae"], *size.common, *thr, "--export", str(r / "vqvae_export")],
                  r / "vqvae_export" / "vae.safetensors"))
    s.append(Step("decoder", train + ["decoder", "--base", str(r / "vqvae_export"), "--out", str(r / "decoder"),
                                      "--data", str(data), "--fixed-norm-levels", "3",  # the blob's remedy
                                      *size.budget["decoder"], *size.extra.get("decoder", ()),
                                      *size.common, *thr, "--export", str(r / "decoder_export")],
                  r / "decoder_export" / "vae.safetensors"))
    s.append(Step("var", train + ["var", "--out", str(r / "var"), "--data", str(data), "--vae", str(r / "decoder_export"),
                                  "--token-cache", str(r / "tokens"), *size.var, *size.budget["var"], *size.common, *thr, "--export", str(r / "var_export")],
                  r / "var_export" / "config.json"))
    for t in CONTROL_TYPES:
        s.append(Step(f"control-{t}", train + ["control", "--base", str(r / "var_export"), "--control-type", t,
                                               "--out", str(r / f"ctl_{t}"), "--data", str(data),
                                               *size.budget["control"], *size.common, *thr,
                                               "--export", str(r / f"ctl_{t}_bundle")],
                      r / f"ctl_{t}_bundle" / f"control_{t}.safetensors"))
    for k in DOMAIN_KINDS:
        s.append(Step(f"domain-{k}", [py, "-m", "lab.domain", "train", "--net", k, "--out", str(r / "domain"),
                                      "--size", str(size.resolution), *size.domain, *thr],
                      r / "domain" / f"{k}.safetensors"))
    tools = Path(__file__).resolve().parents[1] / "tools"
    ctl = [a for t in CONTROL_TYPES for a in ("--control", str(r / f"ctl_{t}_bundle"))]
    s.append(Step("assemble", [py, str(tools / "assemble_default.py"), "--var", str(r / "var_export"),
                               "--domain", str(r / "domain"), *ctl, "--out", str(out)], out / "config.json"))
    s.append(Step("eval", [py, "-m", "lab.eval", "--model", str(out), "--n", str(size.eval_n),
                           "--out", str(r / "eval")], r / "eval" / "eval.json"))
    return s


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.recipe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--runs", default="runs/recipe", help="folder for the data, every run and its export")
    p.add_argument("--out", default=None, help="the assembled bundle (default: RUNS/bundle)")
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--from", dest="start", default=None, help="start at this step")
    p.add_argument("--redo", default="", help="comma-separated steps to run even if their output exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    out = Path(args.out) if args.out else runs / "bundle"
    plan = steps(SIZES[args.size], runs, out)
    names = [st.name for st in plan]
    for given in filter(None, (args.only or "").split(",") + (args.redo or "").split(",") + [args.start]):
        if given not in names:
            p.error(f"unknown step {given!r}; the steps: {', '.join(names)}")
    if args.start:
        plan = plan[names.index(args.start):]
    if args.only:
        plan = [st for st in plan if st.name in args.only.split(",")]
    redo = set(filter(None, args.redo.split(",")))
    for st in plan:
        cmd = " ".join(shlex.quote(a) for a in st.argv)
        if st.done.exists() and st.name not in redo:
            print(f"[recipe] {st.name}: done ({st.done} exists)", flush=True)
            continue
        print(f"[recipe] {st.name}: {cmd}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(st.argv)
        if rc != 0:
            print(f"[recipe] {st.name} failed (exit {rc}); fix it and run the recipe again to resume", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
