"""Batching variations and re-rolls: N waiting jobs of each kind, batching off and on, one invocation.

    python -m lab.bench_batch_kinds                       # the embedded default, 8 jobs of each kind
    python -m lab.bench_batch_kinds --jobs 16 --model my_bundle/ --device cuda

Two worker pools (studio.serve.pool, no web server) on the same model, one with batching off and one
with it on, run the same rounds back to back: N jobs of one kind (generate; guide: variations of one
picture keeping 40% of the scales; reroll: re-rolls of one result from half its scales; mixed: a third
of each), each from its own session, submitted at once while a first job runs (so they all wait).
Each kind runs off, on, on, off (a drift in the machine's load hits both alike). Printed per
kind: the mean wall time of a round from the first submit to the last result, jobs/min, the mean
batch size the worker ran, and "x off" (jobs/min over the same round without batching). Every batched
job's images are compared with the unbatched run's (same seeds): "same" must say yes.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from typing import List

import numpy as np
from PIL import Image

from studio.serve.pool import ModelSpec, WorkerPool


def _asks(kind: str, n: int, picture: bytes, source: bytes) -> List[tuple]:
    kinds = ["generate", "guide", "reroll"] if kind == "mixed" else [kind]
    out = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        a = dict(seed=500 + i, preview="none")
        if k == "guide":
            a.update(image=picture)
        elif k == "reroll":
            a.update(source_png=source)
        out.append((k, a))
    return out


def run_round(pool: WorkerPool, asks: List[tuple]):
    blocker = pool.submit("generate", dict(seed=1, preview="none"), session="blocker")
    for view in blocker.updates(poll=0.01):
        if view.status != "queued":
            break
    t0 = time.perf_counter()
    jobs = [pool.submit(kind, a, session=f"user{i}") for i, (kind, a) in enumerate(asks)]
    for j in jobs:
        j.wait()
    seconds = time.perf_counter() - t0
    blocker.wait()
    failed = [j.error for j in jobs if j.status != "done"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed[:3]}")
    sizes = [j.result.timings.get("batch_images", 1) for j in jobs]
    images = [[np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in j.result.images] for j in jobs]
    return seconds, float(np.mean(sizes)), images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Batching of variations and re-rolls: off vs on")
    ap.add_argument("--model", default=None, help="a bundle or official folder (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=8, help="waiting jobs per round (default 8)")
    ap.add_argument("--kinds", default="generate,guide,reroll,mixed")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    out = tempfile.mkdtemp(prefix="var-bench-batch-")
    common = dict(devices=[args.device], outputs=out, preview="none", torch_threads=args.threads,
                  max_batch_images=max(16, args.jobs), max_queued_per_session=4)
    spec = [ModelSpec("m", args.model)]
    rows = []
    with WorkerPool(spec, batching=False, **common) as off, WorkerPool(spec, batching=True, **common) as on:
        src = off.submit("generate", dict(seed=7, preview="none"))
        src.wait()
        source = src.result.images[0]
        picture = io.BytesIO()
        Image.open(io.BytesIO(source)).convert("RGB").save(picture, format="PNG")
        for pool in (off, on):  # warm-up: the first job of each kind
            for kind, a in _asks("mixed", 3, picture.getvalue(), source):
                pool.submit(kind, a).wait()
        for kind in kinds:
            asks = _asks(kind, args.jobs, picture.getvalue(), source)
            # off, on, on, off: a drift in the machine's load hits both alike; the times are summed
            s_off, b_off, im_off = run_round(off, asks)
            s_on, b_on, im_on = run_round(on, asks)
            s_on2, _, _ = run_round(on, asks)
            s_off2, _, _ = run_round(off, asks)
            s_off, s_on = (s_off + s_off2) / 2, (s_on + s_on2) / 2
            same = all(np.array_equal(x, y) for a, b in zip(im_off, im_on) for x, y in zip(a, b))
            rows.append((kind, s_off, b_off, s_on, b_on, same))
            print(f"{kind}: off {s_off:.1f} s, on {s_on:.1f} s (mean of two rounds each)", flush=True)
    n = args.jobs
    head = ["kind", "jobs", "off s", "off jobs/min", "on s", "on jobs/min", "mean batch on", "x off", "same"]
    table = [head] + [[k, str(n), f"{so:.1f}", f"{60 * n / so:.1f}", f"{sn:.1f}", f"{60 * n / sn:.1f}", f"{bn:.1f}",
                       f"{so / sn:.2f}x", "yes" if same else "NO"] for k, so, bo, sn, bn, same in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    print(f"VAR Studio batching by kind · model {args.model or 'embedded default'} · {args.device} · "
          f"{n} waiting jobs per round, one session each")
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table))
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
