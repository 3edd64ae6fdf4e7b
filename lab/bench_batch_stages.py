"""Where a batched job's time goes: one batch of N generations against N single jobs, per stage.

    python -m lab.bench_batch_stages                      # the embedded default, N = 16, 1 thread
    python -m lab.bench_batch_stages --jobs 8 --preview full --model my_bundle/ --threads 2

Runs the worker's own code (studio.serve.runner.Runner: `answer` for a job alone, `run_batch` for a
batch) in this process, on a connection that pickles and unpickles every message as the pipe to the
web process does, with a timer around each stage (the stages' functions are wrapped in this process
only; a stage called inside another counts for the outer one):

- transformer: the blocks, every scale (the guided half included);
- head: final AdaLN + the logits over the vocabulary;
- top-k / top-p: filtering the logits;
- token draw: the categorical draw (torch.multinomial: one exponential per vocabulary entry);
- latent update: the scale's codes upsampled, through Phi, added to f_hat;
- preview: the per-scale picture (the fast latent-to-RGB map, or a decode with --preview full);
- preview JPEG: its JPEG for the stream;
- final decode: the VQVAE decoder on the last f_hat;
- PNG encode: the result's PNG with its metadata and token pyramid;
- PNG save: write, fsync, link, folder fsync;
- messages: pickling every message (per-scale previews, the result) and unpickling it;
- other: the rest of the pass's time (Python glue, embeddings, slicing and concatenation).

Times are this process's CPU seconds (time.process_time; torch runs in this thread with --threads 1),
so other programs on a busy machine do not inflate one pass more than another; the wall time of
each pass is printed too.

The passes run singles, batch, batch, singles (a drift in the machine's load hits both alike) with
the same seeds; the table sums the two of each. The last column says what a stage costs per image
in the batch against per job alone: near 1.00 the stage is linear in the images and batching
cannot remove it. The web process's own work per job (Gradio's streaming) is not in this table:
`python -m lab.bench_load` prints it (CPU seconds per job of the web process and of the workers).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import pickle
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from typing import Dict, List

import torch

import models.var as var_module
from studio.serve import outputs as saving
from studio.serve import runner as worker

STAGES = ["transformer", "head", "top-k / top-p", "token draw", "latent update", "preview", "preview JPEG",
          "final decode", "PNG encode", "PNG save", "messages"]


CLOCK = time.process_time  # CPU seconds of this process: another program's load does not inflate them


class Stages:
    """CPU seconds per stage; only the outermost timed call counts (a decode inside a preview is preview)."""

    def __init__(self):
        self.seconds: Dict[str, float] = collections.defaultdict(float)
        self.bytes = 0
        self.messages = 0
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        self._depth += 1
        t = CLOCK()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds[name] += CLOCK() - t

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            with self.stage(name):
                return fn(*a, **k)
        return timed


class PicklingConn:
    """The worker's end of the pipe: every message pickled as multiprocessing does, then unpickled as
    the web process's reader does; kept to count the jobs' results."""

    def __init__(self, stages: Stages):
        self.stages, self.received = stages, []

    def send(self, msg):
        with self.stages.stage("messages"):
            data = ForkingPickler.dumps(msg)
            self.received.append(pickle.loads(data))
        self.stages.bytes += len(data)
        self.stages.messages += 1


def instrument(runner: "worker.Runner", stages: Stages) -> None:
    """Wrap the stages' functions (module globals the sampler and the worker call by name, and the
    model's own methods) so that `stages` times them."""
    for name, attr in (("top-k / top-p", "filter_top_k_top_p_"), ("token draw", "sample_tokens"),
                       ("token draw", "gumbel_soft_codes")):
        setattr(var_module, attr, stages.wrap(name, getattr(var_module, attr)))
    worker.jpeg = stages.wrap("preview JPEG", worker.jpeg)
    worker.encode_png = stages.wrap("PNG encode", worker.encode_png)
    saving.save_png = stages.wrap("PNG save", saving.save_png)
    for pipe in runner.pipes.values():
        for blk in pipe.var.blocks:
            blk.forward = stages.wrap("transformer", blk.forward)
        pipe.var.get_logits = stages.wrap("head", pipe.var.get_logits)
        q = pipe.vae.quantize
        q.next_input = stages.wrap("latent update", q.next_input)
        pipe.vae.fhat_to_img = stages.wrap("final decode", pipe.vae.fhat_to_img)
    cls = type(next(iter(runner.previewers.values())))  # a call looks __call__ up on the class
    cls.__call__ = stages.wrap("preview", cls.__call__)
    cls.from_images = stages.wrap("preview", cls.from_images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Per-stage time of one batch of N jobs against N single jobs")
    ap.add_argument("--model", default=None, help="a bundle or official folder (default: the embedded model)")
    ap.add_argument("--jobs", type=int, default=16, help="N: jobs in the batch, and single jobs (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--preview", choices=["fast", "full", "none"], default="fast",
                    help="each job's live preview (default fast, as the load benchmark asks)")
    ap.add_argument("--class", dest="class_name", default="0")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from studio.pipeline import VARPipeline

    pipe = VARPipeline.from_pretrained(args.model, device="cpu")
    previewer = worker.Previewer(pipe, 384)
    previewer.prepare()
    out = tempfile.mkdtemp(prefix="var-bench-stages-")
    stages = Stages()
    conn = PicklingConn(stages)
    config = dict(outputs=out, preview="fast", preview_size=384, scale_delay=0.0)
    runner = worker.Runner(config, conn, [0], {"m": pipe}, {"m": previewer}, "cpu")
    instrument(runner, stages)
    seq = [0]

    def items(n: int, base: int) -> List[tuple]:
        made = []
        for i in range(n):
            seq[0] += 1
            made.append((seq[0], f"job{seq[0]:06d}", "generate", "m",
                         dict(seed=base + i, class_name=args.class_name, preview=args.preview)))
        return made

    def singles():
        for it in items(args.jobs, 1000):  # as worker_main runs a job alone
            conn.send(("started", it[1]))
            conn.send(runner.answer(*it))

    def batch():
        runner.run_batch(items(args.jobs, 1000))

    def measured(fn):
        stages.seconds.clear()
        stages.bytes = stages.messages = 0
        conn.received.clear()
        t, w = CLOCK(), time.perf_counter()
        fn()
        cpu, wall = CLOCK() - t, time.perf_counter() - w
        done = sum(1 for m in conn.received if m[0] == "done")
        if done != args.jobs:
            raise RuntimeError(f"{done} of {args.jobs} jobs finished: {[m for m in conn.received if m[0] != 'scale'][:3]}")
        return cpu, dict(stages.seconds), stages.bytes, stages.messages, wall

    conn.send(runner.answer(*items(1, 0)[0]))  # warm-up
    runner.run_batch(items(2, 0))
    runs = {"singles": [], "batch": []}
    for name, fn in (("singles", singles), ("batch", batch), ("batch", batch), ("singles", singles)):
        runs[name].append(measured(fn))
        print(f"{name}: {runs[name][-1][0]:.2f} CPU s ({runs[name][-1][4]:.2f} s wall)", flush=True)
    print()
    print(format_table(runs, args))
    return 0


def format_table(runs: dict, args) -> str:
    def total(name):
        wall = sum(r[0] for r in runs[name])
        per = collections.defaultdict(float)
        for r in runs[name]:
            for k, v in r[1].items():
                per[k] += v
        per["other"] = wall - sum(per.values())
        return wall, per, sum(r[2] for r in runs[name]), sum(r[3] for r in runs[name])

    s_wall, s_per, s_bytes, s_msgs = total("singles")
    b_wall, b_per, b_bytes, b_msgs = total("batch")
    n, k = args.jobs, len(runs["singles"])
    head = ["stage (CPU time)", f"{n} singles s", f"batch of {n} s", "singles ms/job", "batch ms/image", "share of batch",
            "batch / singles"]
    rows = [head]
    for name in STAGES + ["other"]:
        s, b = s_per.get(name, 0.0), b_per.get(name, 0.0)
        rows.append([name, f"{s / k:.2f}", f"{b / k:.2f}", f"{1000 * s / k / n:.1f}", f"{1000 * b / k / n:.1f}",
                     f"{100 * b / b_wall:.0f}%", "-" if s <= 0 else f"{b / s:.2f}"])
    rows.append(["total", f"{s_wall / k:.2f}", f"{b_wall / k:.2f}", f"{1000 * s_wall / k / n:.1f}",
                 f"{1000 * b_wall / k / n:.1f}", "100%", f"{b_wall / s_wall:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    try:
        import os
        load = " · load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    title = (f"VAR Studio batch stages · model {args.model or 'embedded default'} · cpu, {args.threads} thread(s) · "
             f"preview {args.preview} · mean of {k} passes each{load}")
    foot = (f"messages: {s_msgs // k} ({s_bytes / k / 2 ** 20:.2f} MB) alone, {b_msgs // k} ({b_bytes / k / 2 ** 20:.2f} "
            f"MB) batched per pass · batching speeds the worker up {s_wall / b_wall:.2f}x in CPU time (wall: "
            f"{sum(r[4] for r in runs['singles']) / k:.1f} s alone, {sum(r[4] for r in runs['batch']) / k:.1f} s batched)")
    return "\n".join([title] + lines + [foot])


if __name__ == "__main__":
    sys.exit(main())
