"""The trainers of the embedded default model (and of any VAR of our architecture), on `accelerate`.

    python -m lab.train {vqvae,var,control,decoder} --out RUN ...     (python -m lab.train -h)

    task.py       Task (one trainer's networks, loss, eval, samples, export), register, TASKS, TrainError
    data.py       render / shard sources, BatchStream (batches as a pure function of seed and step)
    tokencache.py token pyramids of a data source encoded once (var --token-cache)
    config.py     model configs from flags and --config JSON
    artifacts.py  checkpoints, VQVAE files, metrics.jsonl, loss.png, samples.png
    loop.py       the loop every trainer shares (Run: resume, schedule, logging, Ctrl-C, export)
    vqvae.py, var.py, control.py, decoder.py   the trainers
    cli.py        flags and main

Adding a trainer: subclass `Task`, fill in `build` / `training_step` (and optionally `evaluate`,
`write_samples`, `export`), decorate it with `@register`, and import its module in cli.py.
"""
from lab.train.artifacts import CHECKPOINT, image_grid, load_vqvae, save_vqvae
from lab.train.cli import build_parser, main
from lab.train.data import (
    EVAL_SEED_START,
    TRAIN_SEED_LIMIT,
    BatchStream,
    RenderSource,
    ShardSource,
    make_source,
    to_resolution,
)
from lab.train.loop import Schedule, run
from lab.train.task import TASKS, Task, TrainError, psnr, register

__all__ = [
    "CHECKPOINT", "EVAL_SEED_START", "TASKS", "TRAIN_SEED_LIMIT", "BatchStream", "RenderSource", "Schedule",
    "ShardSource", "Task", "TrainError", "build_parser", "image_grid", "load_vqvae", "main", "make_source", "psnr",
    "register", "run", "save_vqvae", "to_resolution",
]
