"""Training throughput of the transformer: a batch from images (render + encode every step) beside a
batch from the token cache (`var --token-cache`), in the same invocation.

    python -m lab.bench_train                      # the embedded default's transformer, 12 steps x 16
    python -m lab.bench_train --steps 30 --threads 2 --batch-size 16

Each row is one `python -m lab.train var --init BUNDLE` run in a fresh subprocess; CPU seconds count
the run and its DataLoader worker (where rendering happens), so the figure holds on a busy machine
where wall time does not. The cache is built first (its cost per image is reported on its own line).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd) -> tuple:
    """(wall s, CPU s of the command and its children)."""
    c0, t0 = child_cpu(), time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.time() - t0, child_cpu() - c0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.bench_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/default", help="the bundle whose transformer trains (--init)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per row (after one untimed step)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-images", type=int, default=64)
    args = ap.parse_args(argv)
    base = [sys.executable, "-m", "lab.train", "var", "--init", args.model, "--data", "render", "--batch-size",
            str(args.batch_size), "--threads", str(args.threads), "--quiet", "--eval-size", "0", "--log-every",
            "100000", "--precision", "bf16", "--cpu", "--lr", "1e-5"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = ["--token-cache", str(tmp / "tokens"), "--cache-images", str(args.cache_images)]
        # build the cache with a one-step run; its cost beyond the same run on the built cache is the encoding
        _, build_cpu = timed(base + ["--out", str(tmp / "build"), "--steps", "1", "--num-workers", "0"] + cache)
        for name, extra in (("images (render + encode per step)", ["--num-workers", "1"]),
                            ("token cache", cache)):
            out = tmp / name.split()[0]
            # two fresh runs, 1 and 1 + steps steps: the difference is `steps` steps without the start-up
            w1, c1 = timed(base + ["--out", str(out), "--fresh", "--steps", "1"] + extra)
            w2, c2 = timed(base + ["--out", str(out), "--fresh", "--steps", str(1 + args.steps)] + extra)
            assert json.loads((out / "summary.json").read_text())["step"] == 1 + args.steps
            rows.append((name, (w2 - w1) / args.steps, (c2 - c1) / args.steps))
        encode_s = (build_cpu - c1) / (2 * args.cache_images)  # the same one-step run, less the cache read
    print(f"\ntransformer training, {args.model}, batch {args.batch_size}, {args.threads} thread(s), bf16, "
          f"{args.steps} steps per row")
    print(f"{'data':<36} {'wall s/step':>12} {'CPU s/step':>11} {'vs images':>10}")
    for name, w, c in rows:
        print(f"{name:<36} {w:>12.2f} {c:>11.2f} {rows[0][2] / c:>9.2f}x")
    print(f"token cache build: {encode_s * 1000:.0f} CPU ms per encoded image (each image is encoded twice: as "
          f"it is and mirrored)")
    return rows


if __name__ == "__main__":
    main()
