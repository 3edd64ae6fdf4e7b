"""What a trainer is: `Task` (networks, loss, evaluation, samples, export), the registry, and
`TrainError`, the exception of every bad input (flags, data, checkpoints)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn


class TrainError(ValueError):
    """A run cannot start as asked (a missing or wrong flag, data folder, checkpoint or config); the
    message says which. The command line (`main`) prints it as one line and exits with status 1."""


TASKS: Dict[str, type] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls


class Task:
    """One trainer. The loop (`lab.train.loop`) owns optimizer, schedule, data, checkpoints and
    logging; a task owns its networks, its loss, its evaluation, its samples and its export."""

    name = ""
    help = ""
    # defaults of the common flags; a subclass's `defaults` override some of them
    base_defaults = dict(lr=3e-4, batch_size=16, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                         warmup_steps=100, num_samples=4)
    defaults: dict = {}
    find_unused_parameters = False  # for DDP
    data_fields = ("image", "class_id")  # add "depth" / "labels" to get them in every batch
    panels: list = []  # loss.png: (title, kind "train"|"eval", keys, log_y)

    def __init__(self, args, accelerator):
        self.args, self.acc = args, accelerator
        self.device = accelerator.device

    @classmethod
    def add_arguments(cls, parser):
        pass

    def build(self, ckpt: Optional[dict]) -> nn.Module:
        """Create the networks (from `ckpt` when resuming) and return the module to optimise.
        Raises TrainError when the flags do not describe a run."""
        raise NotImplementedError

    def resolution(self) -> int:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint stores besides the optimiser: at least `config` and `model`."""
        raise NotImplementedError

    def training_step(self, model, batch, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        pass

    def window_metrics(self) -> dict:
        """Extra metrics over the steps since the last metrics line (called on every process)."""
        return {}

    def data_source(self, source):
        """The source the loop draws batches from, given the one `--data` names (default: that one).
        A task may replace it, e.g. by cached token pyramids of it; a replacement without images sets
        `size` and may set `in_process = True` (cheap to read: no DataLoader worker)."""
        return source

    def set_eval_batch(self, batch: Optional[Dict[str, torch.Tensor]]) -> None:
        """The fixed held-out batch (on the CPU, at the data's size; None on other processes)."""
        self.eval_batch = batch

    def evaluate(self) -> dict:
        """Held-out metrics (main process only)."""
        return {}

    def write_samples(self, path: Path) -> None:
        pass

    def export(self, folder: Path, info: dict) -> None:
        pass

    def final_files(self, out: Path, info: dict) -> None:
        """Files written into --out at the end of every run (besides the checkpoint)."""


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] measured in [0, 1] (the trainers' reconstruction measure)."""
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)
