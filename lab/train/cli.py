"""Training CLI for the embedded default model (and any VAR of our architecture), on `accelerate`.

    python -m lab.worlddata --out data/world128 --count 12000     # shards (or train on --data render:128)
    python -m lab.train vqvae --data data/world128 --out runs/vqvae --minutes 20 --precision bf16
    python -m lab.train var --data data/world128 --vae runs/vqvae --out runs/var --minutes 40 \
        --precision bf16 --export runs/var_export --token-cache runs/tokens128   # encode the shards once
    python -m lab.train var --init assets/default --data render --token-cache runs/tokens \
        --cache-images 6000 --out runs/var_more --minutes 120      # train the shipped transformer further
    python -m lab.train control --base runs/var_export --control-type depth --out runs/ctl_depth ...
    python -m lab.train decoder --base runs/var_export --out runs/decoder --minutes 120
    accelerate launch -m lab.train var ...          # the same command on several GPUs

Every trainer shares one loop (lab/train/loop.py): re-running the same command resumes from
OUT/checkpoint.pt; `--steps` and/or `--minutes` set the budget. Errors in the flags, the data or a
checkpoint end the command with one line that says which (TrainError in the library).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lab.train.loop import run
from lab.train.task import TASKS, Task, TrainError

# the trainers, in the order a model is made: importing a module registers its trainer, and --help
# lists them in this order
import lab.train.vqvae  # noqa: E402,F401  isort: skip
import lab.train.var  # noqa: E402,F401  isort: skip
import lab.train.control  # noqa: E402,F401  isort: skip
import lab.train.decoder  # noqa: E402,F401  isort: skip


def add_common_arguments(p, defaults: dict):
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, loss.png, samples.png")
    g.add_argument("--data", default="render", help="render[:SIZE] (render the world on the fly) or a shard folder")
    g.add_argument("--eval-data", help="shard folder for the held-out batch (unset: renders of seeds >= 10M)")
    g.add_argument("--eval-size", type=int, default=16, help="images in the held-out batch")
    g.add_argument("--config", help="JSON file or inline JSON object with model config fields")
    g.add_argument("--export", help="write the final model here (var: a bundle for VARPipeline.from_pretrained)")
    g.add_argument("--resume", help="resume from this checkpoint (unset: OUT/checkpoint.pt when it exists)")
    g.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out and start over")
    g = p.add_argument_group("budget and optimisation")
    g.add_argument("--steps", type=int, help="total optimizer steps (resumed runs count from the checkpoint)")
    g.add_argument("--minutes", type=float, help="total wall-time budget, resumed time included; then export")
    g.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine")
    g.add_argument("--warmup-steps", type=int, default=defaults["warmup_steps"], help="linear lr warmup")
    g.add_argument("--weight-decay", type=float, default=defaults["weight_decay"], help="AdamW decoupled decay")
    g.add_argument("--beta1", type=float, default=defaults["beta1"], help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=defaults["beta2"], help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=defaults["grad_clip"], help="max grad norm (0: off)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    g.add_argument("--seed", type=int, default=0, help="weights, batches and the sample grid")
    g = p.add_argument_group("hardware and logging")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on a GPU that has it (else fp16), fp32 on the CPU")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (rendering runs there)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--metrics-every", type=int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--log-every", type=int, default=250,
                   help="steps between held-out eval, loss.png, samples.png and a checkpoint")
    g.add_argument("--save-every", type=int, default=0, help="extra checkpoints between --log-every ones (0: none)")
    g.add_argument("--num-samples", type=int, default=defaults["num_samples"],
                   help="samples.png: images (vqvae) or images per class (var)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset (None) ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for name, cls in TASKS.items():
        p = sub.add_parser(name, help=cls.help, description=cls.help,
                           formatter_class=_HelpFormatter)
        add_common_arguments(p, {**Task.base_defaults, **cls.defaults})
        cls.add_arguments(p)
    return parser



def main(argv: Optional[Sequence[str]] = None) -> dict:
    """`python -m lab.train TASK ...`: parse, train, return the summary. Bad flags, data or
    checkpoints end here with a one-line message (SystemExit) instead of a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.steps is None and args.minutes is None:
        args.steps = 1000
        print("[train] neither --steps nor --minutes given: training 1000 steps", file=sys.stderr)
    try:
        return run(args)
    except TrainError as e:
        raise SystemExit(f"[train] error: {e}") from e
