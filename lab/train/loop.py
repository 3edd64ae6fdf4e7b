"""The loop every trainer shares: resumable checkpoints (`OUT/checkpoint.pt`, readable with
`torch.load(weights_only=True)`; re-running the same command resumes), AdamW with warmup + cosine
decay over the step or wall-time budget, gradient clipping, tqdm with throughput, `metrics.jsonl`,
`loss.png` and `samples.png` every `--log-every` steps, Ctrl-C to stop cleanly, and an export at the end.

On the CPU, bf16 autocast is much faster where the CPU has bf16 instructions (AVX512-BF16, AMX);
on a machine whose cores are shared with other work, `--threads 1` beats oversubscribed threads.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from lab.train.artifacts import (
    CHECKPOINT,
    atomic_torch_save,
    plot_metrics,
    read_metrics,
    rng_state,
    set_rng_state,
    truncate_metrics,
)
from lab.train.data import BatchStream, held_out_batch, make_source, to_resolution
from lab.train.task import TASKS, TrainError

NO_DECAY_NAMES = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss", "embedding")


def adamw(model: nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, positional/level embeddings, temperatures, codebooks."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))


@dataclasses.dataclass
class Schedule:
    """Linear warmup, then cosine decay to min_lr_ratio over the budget: the step budget, the
    wall-time budget, or whichever runs out first when both are given."""

    lr: float
    warmup_steps: int
    total_steps: Optional[int]
    total_seconds: Optional[float]
    min_lr_ratio: float = 0.1

    def progress(self, step: int, elapsed: float) -> float:
        p = 0.0
        if self.total_steps:
            p = max(p, step / self.total_steps)
        if self.total_seconds:
            p = max(p, elapsed / self.total_seconds)
        return min(p, 1.0)

    def lr_at(self, step: int, elapsed: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        cos = 0.5 * (1 + math.cos(math.pi * self.progress(step, elapsed)))
        return self.lr * warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


def make_accelerator(args, task_cls):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    gpu = torch.cuda.is_available() and not args.cpu
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "fp32"
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mp) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # a second run in the same process (tests, notebooks)
    kw = [DistributedDataParallelKwargs(find_unused_parameters=task_cls.find_unused_parameters)]
    return Accelerator(mixed_precision=mp, cpu=args.cpu, kwargs_handlers=kw), precision



def resolve_checkpoint(args, out: Path) -> Optional[Path]:
    """The checkpoint to resume from: --resume, else OUT/checkpoint.pt when it exists (None: a fresh run)."""
    if args.fresh:
        return None
    if args.resume:
        p = Path(args.resume)
        p = p / CHECKPOINT if p.is_dir() else p
        if not p.exists():
            raise TrainError(f"--resume {args.resume}: no checkpoint there")
        return p
    p = out / CHECKPOINT
    return p if p.exists() else None


def jsonable_args(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, tuple, list, type(None)))}


class MetricsWindow:
    """Sums over the steps since the last metrics line: loss, the task's metrics, images, seconds."""

    def __init__(self):
        self.loss, self.n, self.images, self.seconds, self.extra = 0.0, 0, 0, 0.0, {}

    def add(self, loss: float, metrics: Dict[str, torch.Tensor], gnorm, images: int, seconds: float) -> None:
        self.seconds += seconds
        self.images += images
        self.n += 1
        self.loss += loss
        for k, v in metrics.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)
        if gnorm is not None:
            self.extra["grad_norm"] = self.extra.get("grad_norm", 0.0) + float(gnorm)

    def means(self, acc) -> Dict[str, float]:
        """Mean loss and metrics over the window and over the processes."""
        vec = acc.reduce(torch.tensor([self.loss / self.n] + [v / self.n for v in self.extra.values()],
                                      device=acc.device), reduction="mean").tolist()
        return {"loss": vec[0], **dict(zip(self.extra.keys(), vec[1:]))}


class Run:
    """One training run: the state its steps share (accelerator, task, model, optimizer, schedule,
    data, counters, clock) and the steps themselves. `train()` runs it to the end of the budget or
    to Ctrl-C, then checkpoints, reports and exports."""

    def __init__(self, args):
        self.args = args
        self.task_cls = TASKS[args.task]
        if args.threads:
            torch.set_num_threads(args.threads)
        self.acc, self.precision = make_accelerator(args, self.task_cls)
        self.main = self.acc.is_main_process
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        ckpt_path = resolve_checkpoint(args, self.out)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path else None
        if ckpt is not None and ckpt.get("task") != self.task_cls.name:
            raise TrainError(f"{ckpt_path} is a '{ckpt.get('task')}' checkpoint, not '{self.task_cls.name}'")
        self.step = int(ckpt["step"]) if ckpt else 0
        self.elapsed0 = float(ckpt["elapsed"]) if ckpt else 0.0
        self.images_seen = int(ckpt["images_seen"]) if ckpt else 0
        self._build(ckpt)
        self._seed(ckpt, ckpt_path)
        self._data()
        self.stop_asked = False
        self.t_start = time.time()

    def _build(self, ckpt: Optional[dict]) -> None:
        """Task, networks and optimizer (from the checkpoint when resuming), under the accelerator."""
        args, acc = self.args, self.acc
        torch.manual_seed(args.seed)  # identical initial weights on every process
        self.task = self.task_cls(args, acc)
        model = self.task.build(ckpt)
        optimizer = adamw(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.sched = Schedule(args.lr, args.warmup_steps, args.steps, args.minutes * 60 if args.minutes else None,
                              args.min_lr_ratio)

    def _seed(self, ckpt: Optional[dict], ckpt_path: Optional[Path]) -> None:
        """The random streams: the checkpoint's when resuming, else fresh ones per process."""
        args, acc = self.args, self.acc
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
            if acc.process_index > 0:
                torch.manual_seed(hash((args.seed, self.step, acc.process_index)) % 2**31)
            if self.main:
                truncate_metrics(self.metrics_path, self.step)
                print(f"[train] resumed {ckpt_path} at step {self.step} ({self.images_seen} images, "
                      f"{self.elapsed0 / 60:.1f} min)")
        else:
            torch.manual_seed(args.seed + acc.process_index)
            random.seed(args.seed + acc.process_index)
            np.random.seed(args.seed + acc.process_index)
            if self.main and self.metrics_path.exists():
                self.metrics_path.unlink()

    def _data(self) -> None:
        """The batch stream (resumed at this step), its loader and the fixed held-out batch."""
        args, acc, task = self.args, self.acc, self.task
        self.res = res = task.resolution()
        data_source = make_source(args.data, res, task.data_fields)
        source = task.data_source(data_source)
        stream = BatchStream(source, args.batch_size, args.seed, start_batch=self.step, rank=acc.process_index,
                             world_size=acc.num_processes, hflip=args.hflip)
        workers = 0 if getattr(source, "in_process", False) else args.num_workers
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                  prefetch_factor=4 if workers else None,
                                                  persistent_workers=False,
                                                  # its own generator: starting the loader must not draw from
                                                  # the global RNG (a resumed run would drift from an unbroken one)
                                                  generator=torch.Generator().manual_seed(args.seed))
        task.set_eval_batch(held_out_batch(args, getattr(data_source, "size", res), args.eval_size, task.data_fields)
                            if self.main else None)
        if self.main:
            n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"[train] {self.task_cls.name}: {n_params / 1e6:.2f}M trainable parameters, {res}px, data "
                  f"{args.data}, batch {args.batch_size} x {acc.num_processes} process(es), precision "
                  f"{self.precision}, device {acc.device}")
            (self.out / "args.json").write_text(json.dumps(jsonable_args(args), indent=2))

    # ----------------------------------------------------------------------- clock and stopping

    def elapsed(self) -> float:
        """Seconds of training, resumed time included."""
        return self.elapsed0 + time.time() - self.t_start

    def finished(self, now: float) -> bool:
        args = self.args
        return (args.steps is not None and self.step >= args.steps) or bool(args.minutes and now >= args.minutes * 60)

    def clock(self):
        """(elapsed seconds, stop asked): the main process's values on every process, so that all
        of them use the same learning rate and stop at the same step."""
        vals = [self.elapsed(), float(self.stop_asked)]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            vals = broadcast(torch.tensor(vals, dtype=torch.float64, device=self.acc.device), from_process=0).tolist()
        return vals[0], vals[1] > 0

    def on_sigint(self, signum, frame):
        """Ctrl-C: finish the current step, then checkpoint, report and export as at the end of the
        budget; a second Ctrl-C aborts without saving."""
        if self.stop_asked:
            raise KeyboardInterrupt
        self.stop_asked = True
        if self.main:
            self.bar.write("[train] stopping after this step (Ctrl-C again to abort without saving)")

    # ----------------------------------------------------------------------- files

    def log(self, row: dict) -> None:
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self) -> None:
        if self.main:
            state = self.task.state()
            state.update(task=self.task_cls.name, step=self.step, elapsed=self.elapsed(),
                         images_seen=self.images_seen, optimizer=self.optimizer.state_dict(), rng=rng_state(),
                         schedule=dataclasses.asdict(self.sched), args=jsonable_args(self.args))
            atomic_torch_save(state, self.out / CHECKPOINT)
        self.acc.wait_for_everyone()

    def report(self) -> None:
        """Held-out eval, samples.png and loss.png, then a checkpoint."""
        if self.main:
            rng = rng_state()  # reporting must not change the training's random stream
            ev = self.task.evaluate()
            if ev:
                self.log({"kind": "eval", "step": self.step, "time": round(self.elapsed(), 2), **ev})
                shown = {k: round(v, 3) for k, v in ev.items() if isinstance(v, float)}
                self.bar.write(f"[train] step {self.step} eval {shown}")
            self.task.write_samples(self.out / "samples.png")
            plot_metrics(read_metrics(self.metrics_path), self.task.panels, self.out / "loss.png")
            set_rng_state(rng)
        self.save()

    # ----------------------------------------------------------------------- the loop

    def train(self) -> dict:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.args.steps, initial=self.step, disable=not self.main or self.args.quiet,
                        unit="step", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        in_main_thread = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, self.on_sigint) if in_main_thread else None
        try:
            self._loop()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, old_handler)
        interrupted = self.stop_asked or (self.acc.num_processes > 1 and self.clock()[1])
        self.bar.close()
        self.report()
        return self._finish(interrupted)

    def _loop(self) -> None:
        args, acc = self.args, self.acc
        window = MetricsWindow()
        self.model.train()
        t_step = time.time()
        it = iter(self.loader)
        now, asked = self.clock()  # now: elapsed seconds of the whole run (resumed time included)
        while not self.finished(now) and not asked:
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in next(it).items()}
            loss, metrics, gnorm, lr = self._step(batch, now)
            n_img = batch["class_id"].shape[0] * acc.num_processes
            self.images_seen += n_img
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss is {lv} at step {self.step}; lower --lr or use --precision fp32")
            window.add(lv, metrics, gnorm, n_img, time.time() - t_step)
            self.bar.update(1)
            now, asked = self.clock()
            last = self.finished(now) or asked
            if self.step % args.metrics_every == 0 or last:
                self._write_metrics(window, lr)
                window = MetricsWindow()
            if self.step % args.log_every == 0 and not last:
                self.report()
            elif args.save_every and self.step % args.save_every == 0:
                self.save()
            t_step = time.time()

    def _step(self, batch: Dict[str, torch.Tensor], now: float):
        """One optimizer step on `batch`: (loss, the task's metrics, grad norm or None, lr)."""
        args, acc, optimizer = self.args, self.acc, self.optimizer
        if "image" in batch:  # (a token cache has none)
            batch["image"] = to_resolution(batch["image"], self.res)  # depth/labels: the task's business
        lr = self.sched.lr_at(self.step, now)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, metrics = self.task.training_step(self.model, batch, self.step)
        acc.backward(loss)
        gnorm = acc.clip_grad_norm_(self.model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task.after_step(self.step)
        return loss, metrics, gnorm, lr

    def _write_metrics(self, window: MetricsWindow, lr: float) -> None:
        means = window.means(self.acc)
        row = {"kind": "train", "step": self.step, "time": round(self.elapsed(), 2), "images": self.images_seen,
               "lr": lr, "img_per_s": round(window.images / max(window.seconds, 1e-9), 3), **means,
               **self.task.window_metrics()}
        self.log(row)
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", lr=f"{lr:.2e}")

    def _finish(self, interrupted: bool) -> dict:
        """summary.json, the task's final files and export; the summary."""
        args, acc = self.args, self.acc
        rows = read_metrics(self.metrics_path)
        summary = {"task": self.task_cls.name, "step": self.step, "images_seen": self.images_seen,
                   "minutes": round(self.elapsed() / 60, 2), "interrupted": interrupted,
                   "precision": self.precision, "data": args.data,
                   "last_train": next((r for r in reversed(rows) if r["kind"] == "train"), None),
                   "last_eval": next((r for r in reversed(rows) if r["kind"] == "eval"), None)}
        if self.main:
            info = {k: summary[k] for k in ("step", "images_seen", "minutes", "precision", "data")}
            info.update(batch_size=args.batch_size * acc.num_processes, lr=args.lr, seed=args.seed,
                        command="python -m lab.train " + " ".join(args.argv))
            if summary["last_eval"]:
                info["held_out"] = {k: v for k, v in summary["last_eval"].items() if isinstance(v, (int, float))}
            self.task.final_files(self.out, info)
            if args.export:
                self.task.export(Path(args.export), info)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return summary


def run(args) -> dict:
    """Train `args.task` per the flags. Returns a summary (also written to OUT/summary.json).
    Raises TrainError when the flags, data or checkpoint do not describe a run."""
    return Run(args).train()
