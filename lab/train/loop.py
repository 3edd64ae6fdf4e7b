"""Training CLI for the embedded default model (and any VAR of our architecture), on `accelerate`.

    python -m studio.world --out data/world128 --count 12000     # shards (or train on --data render:128)
    python -m lab.train vqvae --data data/world128 --out runs/vqvae --minutes 20 --precision bf16
    python -m lab.train var --data data/world128 --vae runs/vqvae --out runs/var --minutes 40 \
        --precision bf16 --export runs/var_export
    accelerate launch -m lab.train var ...          # the same command on several GPUs

On the CPU, bf16 autocast is much faster where the CPU has bf16 instructions (AVX512-BF16, AMX);
on a machine whose cores are shared with other work, `--threads 1` beats oversubscribed threads.

Every subcommand shares one loop (`run`): resumable checkpoints (`OUT/checkpoint.pt`, readable with
`torch.load(weights_only=True)`; re-running the same command resumes), AdamW with warmup + cosine
decay over the step or wall-time budget, gradient clipping, tqdm with throughput, `metrics.jsonl`,
`loss.png` and `samples.png` every `--log-every` steps, and an export at the end.

Data: `--data render[:SIZE]` renders the procedural world on the fly in DataLoader workers from
training seeds (< 10_000_000; held-out evaluation uses seeds >= 10_000_000), `--data DIR` reads
shards written by `python -m studio.world --out DIR`. Batches are a pure function of (seed, step),
so a resumed run sees exactly the batches an uninterrupted one would have seen.

Adding a trainer: subclass `Task`, fill in `build` / `training_step` (and optionally `evaluate`,
`write_samples`, `export`), and decorate it with `@register`.
"""
from __future__ import annotations

import argparse
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.var import VAR, VARConfig, token_weights
from models.vqvae import VQVAE, VQVAEConfig

TRAIN_SEED_LIMIT = 10_000_000  # training renders seeds below this ...
EVAL_SEED_START = 10_000_000  # ... and held-out evaluation renders seeds from here on
CHECKPOINT = "checkpoint.pt"
VQVAE_FORMAT = "var-studio-vqvae"

# The embedded default: 128 px, a 16x16 latent and the official ten scales (L = 680 tokens), sized
# for about an hour of training on two CPU cores: VQVAE 3.2M parameters, VAR 5M (64-wide heads as
# in the official shape rule). One image takes about 0.5 s on one CPU core; the fp16 bundle is 16 MB.
DEFAULT_VQVAE = dict(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                     using_sa=False, using_mid_sa=True, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
DEFAULT_VAR = dict(depth=6, embed_dim=192, num_heads=3, mlp_ratio=4.0, cond_drop_rate=0.1, drop_path_rate=0.0)


def load_world():
    """The world module (`studio.world`): render_batch, CLASS_NAMES, dataset.WorldShards.
    Imported lazily (and replaceable in tests) so this file imports without it."""
    import studio.world as world

    return world


# ---------------------------------------------------------------------------------------------
# data: every source is a numbered collection; a BatchStream turns (seed, batch number) into indices


# A batch is a dict of tensors: image (B,3,H,W) float in [-1,1] and class_id (B,) int64 always;
# depth (B,H,W) float32 and labels (B,H,W) int64 when the task lists them in `Task.data_fields`.
SPATIAL_FIELDS = ("image", "depth", "labels")


class RenderSource:
    """Index i -> the world rendered from seed offset + i (training: below TRAIN_SEED_LIMIT)."""

    def __init__(self, size: int, pool: int = TRAIN_SEED_LIMIT, offset: int = 0, fields=("image", "class_id")):
        if offset + pool > TRAIN_SEED_LIMIT and offset < EVAL_SEED_START:
            raise ValueError(f"training seeds must stay below {TRAIN_SEED_LIMIT} (held-out seeds start there)")
        self.size, self.pool, self.offset, self.fields = int(size), int(pool), int(offset), tuple(fields)

    def __len__(self):
        return self.pool

    def get(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        images, depth, labels, class_ids = load_world().render_batch([self.offset + int(i) for i in indices],
                                                                     size=self.size)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        out = {"image": x, "class_id": torch.as_tensor(np.asarray(class_ids), dtype=torch.long)}
        if "depth" in self.fields:
            out["depth"] = torch.as_tensor(np.asarray(depth), dtype=torch.float32)
        if "labels" in self.fields:
            out["labels"] = torch.as_tensor(np.asarray(labels).astype(np.int64))
        return out


class ShardSource:
    """Index i -> item i of `studio.world.dataset.WorldShards(dir)`.

    `block_offsets` (the shard boundaries) lets BatchStream read one shard at a time: a shard is
    decompressed whole (about 0.5 s for 1000 images at 128 px) and only the last two are cached."""

    def __init__(self, folder: str, fields=("image", "class_id")):
        from importlib import import_module

        self.fields = tuple(fields)
        world = load_world()
        dataset = getattr(world, "dataset", None) or import_module(world.__name__ + ".dataset")
        self.ds = dataset.WorldShards(folder)
        if len(self.ds) == 0:
            raise ValueError(f"{folder}: no images in the shards")
        self.block_offsets = getattr(self.ds, "offsets", None)

    def __len__(self):
        return len(self.ds)

    def get(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        items = [self.ds[int(i)] for i in indices]
        out = {"class_id": torch.as_tensor([int(it["class_id"]) for it in items], dtype=torch.long)}
        for key, dtype in (("image", torch.float32), ("depth", torch.float32), ("labels", torch.long)):
            if key in self.fields:
                out[key] = torch.stack([torch.as_tensor(np.asarray(it[key])).to(dtype) for it in items])
        return out


class BatchStream(torch.utils.data.IterableDataset):
    """Endless batches; batch k of process `rank` is a pure function of (seed, k, rank).

    Sources up to PERMUTE_MAX items are walked in a fresh permutation per epoch (every item once per
    epoch); bigger ones (the 10M render seeds) are sampled uniformly. A source with `block_offsets`
    (shards) is permuted block-wise: blocks in random order, items shuffled inside each block, so
    reading stays within one or two shards at a time. DataLoader workers take every num_workers-th
    batch, which keeps the batch order of the single-process stream."""

    PERMUTE_MAX = 2_000_000

    def __init__(self, source, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1, hflip: bool = True):
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.start_batch, self.rank, self.world_size, self.hflip = int(start_batch), rank, world_size, hflip
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, 1, epoch])
            offsets = getattr(self.source, "block_offsets", None)
            if offsets is not None and len(offsets) > 2:
                perm = np.concatenate([offsets[b] + rng.permutation(offsets[b + 1] - offsets[b])
                                       for b in rng.permutation(len(offsets) - 1)])
            else:
                perm = rng.permutation(len(self.source))
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def indices(self, k: int) -> List[int]:
        n, B = len(self.source), self.batch_size
        if n > self.PERMUTE_MAX:
            return np.random.default_rng([self.seed, 2, k, self.rank]).integers(0, n, B).tolist()
        first = (k * self.world_size + self.rank) * B
        return [int(self._perm(p // n)[p % n]) for p in range(first, first + B)]

    def batch(self, k: int) -> Dict[str, torch.Tensor]:
        out = self.source.get(self.indices(k))
        if self.hflip:
            flip = torch.from_numpy(np.random.default_rng([self.seed, 3, k, self.rank]).random(self.batch_size) < 0.5)
            for key in SPATIAL_FIELDS:
                if key in out:
                    t = out[key]
                    out[key] = torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t)
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        k = self.start_batch + wid
        while True:
            yield self.batch(k)
            k += nw


def make_source(spec: str, default_size: int, fields):
    """`render`, `render:SIZE` or a shard folder."""
    if spec == "render" or spec.startswith("render:"):
        size = int(spec.split(":", 1)[1]) if ":" in spec else default_size
        return RenderSource(size, fields=fields)
    if not Path(spec).is_dir():
        raise SystemExit(f"--data {spec}: not a folder of shards, nor render[:SIZE]")
    return ShardSource(spec, fields)


def held_out_batch(args, size: int, n: int, fields) -> Optional[Dict[str, torch.Tensor]]:
    """The fixed evaluation batch: `--eval-data DIR` items, else renders of seeds >= EVAL_SEED_START."""
    if n <= 0:
        return None
    if args.eval_data:
        src = ShardSource(args.eval_data, fields)
        return src.get(range(min(n, len(src))))
    try:
        return RenderSource(size, pool=n, offset=EVAL_SEED_START, fields=fields).get(range(n))
    except (ImportError, AttributeError) as e:
        print(f"[train] no held-out batch (the world renderer is unavailable: {e})", file=sys.stderr)
        return None


def to_resolution(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------------------------
# configs from flags / JSON


def parse_ints(s) -> Tuple[int, ...]:
    if isinstance(s, (list, tuple)):
        return tuple(int(v) for v in s)
    return tuple(int(v) for v in str(s).replace("(", "").replace(")", "").replace(" ", "").split(",") if v)


def add_config_flags(parser, cls, builtin: dict, skip=()):
    """One flag per dataclass field (`--ch-mult 1,2,2,4`, `--using-sa/--no-using-sa`). Unset flags
    take the value from --config, else from `builtin` (the embedded default), else the dataclass."""
    g = parser.add_argument_group(f"{cls.__name__} fields (override --config; unset: the embedded default)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        d = f.default
        shown = builtin.get(f.name, d)
        shown = ",".join(map(str, shown)) if isinstance(shown, (tuple, list)) else shown
        kw = dict(dest=f"cfg_{f.name}", default=None, help=f"(default: {shown})")
        if isinstance(d, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(d, (tuple, list)):
            g.add_argument(flag, type=parse_ints, metavar="A,B,..", **kw)
        else:
            g.add_argument(flag, type=type(d), metavar=f.name.upper(), **kw)


def config_json(args, cls) -> dict:
    """The --config JSON (a file or an inline object), checked against the dataclass fields."""
    if not args.config:
        return {}
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config: neither a file nor valid JSON ({e})") from e
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SystemExit(f"--config: unknown {cls.__name__} fields {unknown}")
    return given


def config_from_args(cls, args, base: dict, skip=()) -> dict:
    """base <- --config JSON <- individual flags."""
    cfg = dict(base)
    cfg.update({k: v for k, v in config_json(args, cls).items() if k not in skip})
    for f in dataclasses.fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None and f.name not in skip:
            cfg[f.name] = v
    return cfg


# ---------------------------------------------------------------------------------------------
# shared helpers: optimizer, schedule, RNG, checkpoints, VQVAE files, plots, grids


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


def rng_state() -> dict:
    py = random.getstate()
    st = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}
    npst = np.random.get_state()
    st["numpy"] = [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])]
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_vqvae(folder: Path, vae: VQVAE, info: Optional[dict] = None) -> None:
    """`vae.safetensors` (fp32, with usage statistics) + `vae_config.json`: loadable by `var --vae`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
               for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    cfg = {"format": VQVAE_FORMAT, "version": 1, "vae": vae.cfg.to_dict(), "training": info or {}}
    (folder / "vae_config.json").write_text(json.dumps(cfg, indent=2))


def load_vqvae(path: str) -> VQVAE:
    """A VQVAE from a bundle folder, a `vqvae` export (vae.safetensors + vae_config.json), a
    `vqvae` training folder or its checkpoint.pt."""
    from studio import checkpoints

    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if p.is_dir() and (p / "vae_config.json").exists():
        cfg = json.loads((p / "vae_config.json").read_text())
        vae = VQVAE(VQVAEConfig(**cfg["vae"]))
        checkpoints.load_into(vae, checkpoints.read_safetensors(p / "vae.safetensors"), f"{p}/vae.safetensors",
                              checkpoints.COMPUTED_BUFFERS)
        return vae
    if p.is_dir() and (p / "config.json").exists():
        cfg = checkpoints.read_bundle_config(p)
        vae = VQVAE(VQVAEConfig(**cfg["vae"]))
        checkpoints.load_into(vae, checkpoints.read_safetensors(p / "vae.safetensors"), f"{p}/vae.safetensors",
                              checkpoints.COMPUTED_BUFFERS)
        return vae
    if p.is_dir() and (p / CHECKPOINT).exists():
        p = p / CHECKPOINT
    if p.is_file():
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("task") != "vqvae":
            raise SystemExit(f"--vae {path}: not a vqvae training checkpoint")
        vae = VQVAE(VQVAEConfig(**ck["config"]))
        checkpoints.load_into(vae, ck["model"], str(p))
        return vae
    raise SystemExit(f"--vae {path}: expected a bundle folder, a vqvae export (vae.safetensors + "
                     f"vae_config.json) or a vqvae checkpoint")


def read_metrics(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            pass
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be written again)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_metrics(rows: List[dict], panels, path: Path) -> bool:
    """loss.png: one panel per (title, kind, keys, log_y). Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, kind, keys, log_y) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=key, marker="o" if kind == "eval" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def image_grid(rows: Sequence[torch.Tensor], path: Path, pad: int = 2) -> None:
    """samples.png: rows of (n, 3, H, W) images in [-1, 1], one row per tensor."""
    from PIL import Image

    n = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        arr = r.detach().float().cpu().add(1).mul(127.5).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
        for j, a in enumerate(arr):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y:y + H, x:x + W] = a
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] measured in [0, 1]."""
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


# ---------------------------------------------------------------------------------------------
# trainers


TASKS: Dict[str, type] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls


class Task:
    """One trainer. The loop in `run` owns optimizer, schedule, data, checkpoints and logging;
    a task owns its networks, its loss, its evaluation, its samples and its export."""

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
        """Create the networks (from `ckpt` when resuming) and return the module to optimise."""
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


@torch.no_grad()
def teacher_forcing(vae: VQVAE, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, L), transformer inputs (B, L-1, Cvae)) of images from a frozen VQVAE (fp32, outside autocast)."""
    tokens = vae.quantize.f_to_tokens(vae.img_to_f(x))
    return torch.cat(tokens, 1), vae.quantize.tokens_to_var_input(tokens)


USAGE_EMA_DECAY = 0.97  # per-step decay of MultiScaleQuantizer.ema_vocab_hit_SV (models/vqvae.py)


@torch.no_grad()
def quantizer_queries(q, f_BChw) -> torch.Tensor:
    """Every vector the multi-scale quantiser looks up for `f`, as (N, C, 1, 1): the area-downsampled
    residual at each scale. Dead codes restarted onto these land where the lookups are (raw latent
    vectors would only serve the first scale: later scales quantise small residuals)."""
    f = f_BChw.detach().float()
    B, C, H, W = f.shape
    tokens = q.f_to_tokens(f)
    SN = len(q.patch_nums)
    queries = []
    for si, pn in enumerate(q.patch_nums):
        rest = f if si == 0 else f - q.tokens_to_fhat(tokens[:si])
        z = F.interpolate(rest, size=(pn, pn), mode="area") if si != SN - 1 else rest
        queries.append(z.permute(0, 2, 3, 1).reshape(-1, C))
    return torch.cat(queries).view(-1, C, 1, 1)


@register
class VQVAETask(Task):
    name = "vqvae"
    help = "train the multi-scale VQVAE tokenizer"
    defaults = dict(lr=1e-3, batch_size=8, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                    warmup_steps=100, num_samples=8)
    find_unused_parameters = True  # with few scales some shared Phi convs serve no scale
    panels = [("train loss", "train", ["loss", "rec", "vq", "edge"], True),
              ("held-out PSNR (dB)", "eval", ["psnr", "psnr_half_scales"], False),
              ("codebook", "train", ["codes_used_pct"], False)]

    @classmethod
    def add_arguments(cls, p):
        add_config_flags(p, VQVAEConfig, DEFAULT_VQVAE)
        g = p.add_argument_group("vqvae loss")
        g.add_argument("--rec-loss", choices=["l1", "l2", "l1+l2"], default="l1+l2",
                       help="reconstruction loss on the decoded straight-through f_hat")
        g.add_argument("--vq-weight", type=float, default=1.0, help="weight of the quantiser loss")
        g.add_argument("--edge-weight", type=float, default=0.0,
                       help="weight of an L1 loss on image gradients (sharper edges)")
        g.add_argument("--codebook-init", choices=["data", "random"], default="data",
                       help="data: after the first step, move every unused code onto a vector the quantiser "
                            "looked up (fresh runs only)")
        g.add_argument("--restart-every", type=int, default=25, help="restart dead codes every N steps (0: never)")
        g.add_argument("--restart-after", type=int, default=25, help="... from this step on")
        g.add_argument("--restart-threshold", type=float, default=1e-4,
                       help="a code is dead when its usage EMA summed over scales is below this")
        g.add_argument("--restart-grace", type=int, default=25,
                       help="a restarted code that no scale picks is dead again after this many steps")

    class Module(nn.Module):
        """The training pass as one forward (what DDP and autocast wrap)."""

        def __init__(self, vae: VQVAE):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            f = self.vae.img_to_f(x)
            f_hat, vq_loss, usage = self.vae.quantize(f)
            rec = self.vae.decoder(self.vae.post_quant_conv(f_hat))
            return rec.float(), vq_loss, usage, f.detach()

    def build(self, ckpt):
        if ckpt is not None:
            cfg = dict(ckpt["config"])
            note_ignored_config(VQVAEConfig, self.args, cfg)
        else:
            cfg = config_from_args(VQVAEConfig, self.args, DEFAULT_VQVAE)
        self.vae = VQVAE(VQVAEConfig(**cfg))
        if ckpt is not None:
            self.vae.load_state_dict(ckpt["model"])
        self.usage = torch.zeros(len(self.vae.cfg.patch_nums), self.vae.cfg.vocab_size, device=self.device)
        self.last_f = None
        return self.Module(self.vae)

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.vae.cfg.to_dict(), "model": self.vae.state_dict()}

    def training_step(self, model, batch, step):
        x = batch["image"]
        rec, vq_loss, usage, f = model(x)
        a = self.args
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).square().mean()
        rec_loss = {"l1": l1, "l2": l2, "l1+l2": l1 + l2}[a.rec_loss]
        loss = rec_loss + a.vq_weight * vq_loss
        m = {"rec": rec_loss.detach(), "vq": vq_loss.detach(), "l1": l1.detach(),
             "psnr_train": psnr(rec.detach().clamp(-1, 1), x).mean()}
        if a.edge_weight > 0:
            edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
            loss = loss + a.edge_weight * edge
            m["edge"] = edge.detach()
        self.usage += usage.detach()
        self.last_f = f
        return loss, m

    def after_step(self, step):
        a = self.args
        init = step == 1 and a.codebook_init == "data"
        periodic = a.restart_every > 0 and step >= a.restart_after and step % a.restart_every == 0
        if (init or periodic) and self.last_f is not None:
            q = self.vae.quantize
            before = q.embedding.weight.detach().clone()
            n = q.restart_dead_codes(quantizer_queries(q, self.last_f), threshold=a.restart_threshold)
            if n:  # the quantiser marks restarted codes as used for ~100 steps: shorten that to the grace
                moved = (q.embedding.weight.detach() != before).any(1)
                SN = q.ema_vocab_hit_SV.shape[0]
                q.ema_vocab_hit_SV[:, moved] = a.restart_threshold / SN / USAGE_EMA_DECAY ** max(a.restart_grace, 0)
            if self.acc.num_processes > 1:  # every process must keep the same codebook
                from accelerate.utils import broadcast

                broadcast(q.embedding.weight.data, from_process=0)
                broadcast(q.ema_vocab_hit_SV, from_process=0)
            self.restarted = getattr(self, "restarted", 0) + n
        self.last_f = None

    def window_metrics(self):
        u = self.acc.reduce(self.usage, reduction="sum").sum(0)
        self.usage.zero_()
        total = u.sum()
        if total == 0:
            return {}
        p = u / total
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        out = {"codes_used_pct": 100.0 * float((u > 0).float().mean()), "perplexity": float(ent.exp())}
        out["codes_restarted"] = getattr(self, "restarted", 0)
        self.restarted = 0
        return out

    def set_eval_batch(self, batch):
        self.eval_x = None if batch is None else to_resolution(batch["image"], self.resolution()).to(self.device)

    @torch.no_grad()
    def evaluate(self):
        if self.eval_x is None:
            return {}
        self.vae.eval()
        try:
            tokens = self.vae.img_to_tokens(self.eval_x)
            rec = self.vae.tokens_to_img(tokens)
            half = self.vae.tokens_to_img(tokens[: (len(tokens) + 1) // 2])
            used = torch.cat(tokens, 1).unique().numel()
        finally:
            self.vae.train()
        self.eval_rec, self.eval_half = rec, half
        return {"psnr": float(psnr(rec, self.eval_x).mean()), "psnr_half_scales": float(psnr(half, self.eval_x).mean()),
                "eval_codes_used": used}

    def write_samples(self, path):
        """Rows: originals, reconstructions from all scales, from the first half of the scales."""
        if self.eval_x is None:
            return
        if not hasattr(self, "eval_rec"):
            self.evaluate()
        n = self.args.num_samples
        image_grid([self.eval_x[:n], self.eval_rec[:n], self.eval_half[:n]], path)

    def final_files(self, out, info):
        save_vqvae(out, self.vae, info)

    def export(self, folder, info):
        save_vqvae(folder, self.vae, info)


@register
class VARTask(Task):
    name = "var"
    help = "train the VAR transformer on the tokens of a frozen VQVAE"
    defaults = dict(lr=4e-4, batch_size=16, weight_decay=0.05, beta1=0.9, beta2=0.95, grad_clip=2.0,
                    warmup_steps=100, num_samples=4)
    panels = [("train cross-entropy", "train", ["loss", "ce_coarse", "ce_mid", "ce_fine"], False),
              ("held-out cross-entropy", "eval", ["ce", "ce_coarse", "ce_mid", "ce_fine"], False),
              ("token accuracy", "train", ["acc", "acc_coarse", "acc_mid", "acc_fine"], False)]
    DERIVED = ("vocab_size", "z_channels", "num_classes", "patch_nums")  # taken from the VQVAE and classes

    @classmethod
    def add_arguments(cls, p):
        p.add_argument("--vae", help="frozen VQVAE: a vqvae run/export folder, its checkpoint.pt, or a bundle "
                                     "(needed for a fresh run; a resumed run uses the copy in its checkpoint)")
        add_config_flags(p, VARConfig, DEFAULT_VAR, skip=cls.DERIVED)
        g = p.add_argument_group("var loss and samples")
        g.add_argument("--scale-weighting", choices=["token", "equal"], default="token",
                       help="token: every token counts the same (official); equal: every scale counts the same")
        g.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy")
        g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the sample grid")
        g.add_argument("--top-k", type=int, default=0, help="top-k of the sample grid (0: off)")
        g.add_argument("--top-p", type=float, default=0.0, help="top-p of the sample grid (0: off)")

    def class_names(self) -> List[str]:
        return list(load_world().CLASS_NAMES)

    def build(self, ckpt):
        if ckpt is not None:
            vcfg = VQVAEConfig(**ckpt["vae_config"])
            self.vae = VQVAE(vcfg)
            self.vae.load_state_dict(ckpt["vae"])
            self.names = list(ckpt["class_names"])
            cfg = dict(ckpt["config"])
            note_ignored_config(VARConfig, self.args, cfg, skip=self.DERIVED)
            if self.args.vae:
                print("[train] resuming: the VQVAE is the copy in the checkpoint; --vae is ignored", file=sys.stderr)
        else:
            if not self.args.vae:
                raise SystemExit("var: --vae is required (a trained VQVAE) for a fresh run")
            self.vae = load_vqvae(self.args.vae)
            self.names = self.class_names()
            cfg = config_from_args(VARConfig, self.args, DEFAULT_VAR, skip=self.DERIVED)
            vc = self.vae.cfg
            derived = dict(vocab_size=vc.vocab_size, z_channels=vc.z_channels, num_classes=len(self.names),
                           patch_nums=vc.patch_nums)
            for k, v in config_json(self.args, VARConfig).items():
                if k in derived and tuple(np.atleast_1d(v).tolist()) != tuple(np.atleast_1d(derived[k]).tolist()):
                    raise SystemExit(f"--config: {k}={v} contradicts the VQVAE / classes ({k}={derived[k]})")
            cfg.update(derived)
        self.vae.eval().requires_grad_(False).to(self.device)
        self.var = VAR(VARConfig(**cfg))
        if ckpt is not None:
            self.var.load_state_dict(ckpt["model"])
        pn = self.var.cfg.patch_nums
        sizes = torch.tensor([p * p for p in pn], dtype=torch.float32)
        self.scale_of_token = torch.repeat_interleave(torch.arange(len(pn)), sizes.long()).to(self.device)
        self.token_weight = token_weights(pn, self.args.scale_weighting).to(self.device)
        groups = np.array_split(np.arange(len(pn)), 3)
        self.groups = {g: [int(i) for i in idx] for g, idx in zip(("coarse", "mid", "fine"), groups) if len(idx)}
        self.window = None
        return self.var

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.var.cfg.to_dict(), "model": self.var.state_dict(), "vae_config": self.vae.cfg.to_dict(),
                "vae": self.vae.state_dict(), "class_names": list(self.names)}

    @torch.no_grad()
    def tokens(self, x):
        return teacher_forcing(self.vae, x)

    def per_scale(self, ce_BL, hit_BL):
        """Mean CE and accuracy per scale: two (SN,) tensors."""
        SN = len(self.var.cfg.patch_nums)
        cnt = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, torch.ones_like(ce_BL[0]))
        ce = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, ce_BL.mean(0)) / cnt
        acc = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, hit_BL.float().mean(0)) / cnt
        return ce, acc

    def training_step(self, model, batch, step):
        target, x_in = self.tokens(batch["image"])
        logits = model(batch["class_id"], x_in)  # (B, L, V) fp32; class dropout inside
        B, L, V = logits.shape
        ce = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none",
                             label_smoothing=self.args.label_smoothing).view(B, L)
        loss = (ce.mean(0) * self.token_weight).sum()
        with torch.no_grad():
            hit = logits.argmax(-1) == target
            ce_s, acc_s = self.per_scale(ce.detach(), hit)
            acc = hit.float().mean()
        w = torch.stack([ce_s, acc_s])
        self.window = w if self.window is None else self.window + w
        self.window_n = getattr(self, "window_n", 0) + 1
        return loss, {"acc": acc, "ce_token_mean": ce.detach().mean()}

    def _group_metrics(self, ce_s, acc_s, prefix=""):
        out = {}
        for g, idx in self.groups.items():
            out[f"{prefix}ce_{g}"] = float(ce_s[idx].mean())
            out[f"{prefix}acc_{g}"] = float(acc_s[idx].mean())
        out[f"{prefix}ce_per_scale"] = [round(float(v), 4) for v in ce_s]
        out[f"{prefix}acc_per_scale"] = [round(float(v), 4) for v in acc_s]
        return out

    def window_metrics(self):
        if self.window is None:
            return {}
        w = self.acc.reduce(self.window / self.window_n, reduction="mean")
        self.window, self.window_n = None, 0
        return self._group_metrics(w[0], w[1])

    def set_eval_batch(self, batch):
        self.eval_batch = None
        if batch is not None:
            x = to_resolution(batch["image"], self.resolution()).to(self.device)
            target, x_in = self.tokens(x)
            self.eval_batch = (batch["class_id"].to(self.device), target, x_in)

    @torch.no_grad()
    def evaluate(self):
        if self.eval_batch is None:
            return {}
        labels, target, x_in = self.eval_batch
        self.var.eval()
        try:
            logits = self.var(labels, x_in, cond_drop_rate=0.0)
        finally:
            self.var.train()
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none").view(target.shape)
        hit = logits.argmax(-1) == target
        ce_s, acc_s = self.per_scale(ce, hit)
        return {"ce": float(ce.mean()), "acc": float(hit.float().mean()), **self._group_metrics(ce_s, acc_s)}

    def pipeline(self):
        """A sampling pipeline over a copy of the current weights (the pipeline freezes its models)."""
        from studio.pipeline import VARPipeline

        var = VAR(self.var.cfg)
        var.load_state_dict(self.var.state_dict())
        return VARPipeline(self.vae, var, self.names, device=self.device)

    def write_samples(self, path):
        """One row per class, `--num-samples` images each, always from the same generator seed."""
        pipe = self.pipeline()
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        n = self.args.num_samples
        out = pipe(class_labels=list(range(len(self.names))), num_images_per_label=n, guidance_scale=self.args.guidance,
                   top_k=self.args.top_k, top_p=self.args.top_p, generator=gen, output_type="pt")
        imgs = out.images.mul(2).sub(1)
        image_grid([imgs[i * n:(i + 1) * n] for i in range(len(self.names))], path)

    def export(self, folder, info):
        from studio import checkpoints

        checkpoints.save_bundle(folder, self.vae, self.var, self.names, dtype=torch.float16,
                                extra_config={"training": info})
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"[train] bundle written to {folder} ({size / 2**20:.1f} MiB)")
        if size > 64 * 2**20:
            print("[train] warning: the bundle is over 64 MiB", file=sys.stderr)


DEFAULT_CONTROL = dict(widths=(32, 64, 128, 256), hidden=256, inject_blocks=None)
CONTROL_DERIVED = ("control_type", "in_channels", "label_map", "embed_dim", "depth", "patch_nums", "map_size")


@register
class ControlTask(Task):
    """A control adapter (models/control.py) on a frozen VAR bundle, from the world's ground truth:
    canny edges of the renders, their exact depth (normalised log-depth) or their labels."""

    name = "control"
    help = "train a control adapter (canny, depth or segmentation) for a frozen VAR bundle"
    defaults = dict(lr=5e-4, batch_size=16, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                    warmup_steps=50, num_samples=8)
    find_unused_parameters = True
    panels = [("train cross-entropy", "train", ["loss"], False),
              ("held-out cross-entropy", "eval", ["ce", "ce_base"], False),
              ("held-out scale-balanced cross-entropy", "eval", ["wce", "wce_base"], False),
              ("held-out token accuracy", "eval", ["acc", "acc_base"], False)]

    @classmethod
    def add_arguments(cls, p):
        from models.control import CONTROL_TYPES, ControlConfig

        p.add_argument("--base", help="the frozen model: a bundle folder (e.g. a `var --export`); needed for a fresh "
                                      "run, a resumed run uses the copy in its checkpoint")
        p.add_argument("--control-type", choices=CONTROL_TYPES, default="canny")
        add_config_flags(p, ControlConfig, DEFAULT_CONTROL, skip=CONTROL_DERIVED)
        g = p.add_argument_group("control maps, loss and samples")
        g.add_argument("--canny-low", type=float, default=100.0, help="canny maps: low threshold")
        g.add_argument("--canny-high", type=float, default=200.0, help="canny maps: high threshold")
        g.add_argument("--class-drop-rate", type=float, default=0.1,
                       help="replace the class by the null class (the control stays) this often")
        g.add_argument("--scale-weighting", choices=["token", "equal"], default="equal",
                       help="equal: every scale counts the same in the loss (the coarse scales fix the layout, "
                            "where a depth or segmentation map says most); token: every token the same")
        g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the sample grid")

    @property
    def data_fields(self):
        extra = {"depth": ("depth",), "segmentation": ("labels",)}.get(self.control_type, ())
        return ("image", "class_id") + extra

    def build(self, ckpt):
        from models.control import ControlAdapter, ControlConfig

        if ckpt is not None:
            self.vae = VQVAE(VQVAEConfig(**ckpt["vae_config"]))
            self.vae.load_state_dict(ckpt["vae"])
            self.var = VAR(VARConfig(**ckpt["var_config"]))
            self.var.load_state_dict(ckpt["var"])
            self.names = list(ckpt["class_names"])
            self.base = ckpt.get("base")
            cfg = ControlConfig.from_dict(ckpt["config"])
            if self.args.control_type != cfg.control_type:
                print(f"[train] resuming a {cfg.control_type} adapter; --control-type is ignored", file=sys.stderr)
        else:
            if not self.args.base:
                raise SystemExit("control: --base is required (the bundle to steer) for a fresh run")
            from studio import checkpoints

            try:
                loaded = checkpoints.resolve_and_load(self.args.base)
            except checkpoints.CheckpointError as e:
                raise SystemExit(f"--base {self.args.base}: {e}") from e
            self.vae, self.var, self.names = loaded.vae.float(), loaded.var.float(), list(loaded.class_names)
            self.base = str(loaded.source)
            over = config_from_args(ControlConfig, self.args, DEFAULT_CONTROL, skip=CONTROL_DERIVED)
            n_seg = len(load_world().SEG_CLASSES) if self.args.control_type == "segmentation" else None
            cfg = ControlConfig.for_var(self.var.cfg, self.args.control_type, num_classes=n_seg,
                                        map_size=self.vae.cfg.resolution, **over)
        self.control_type = cfg.control_type
        for m in (self.vae, self.var):
            m.eval().requires_grad_(False).to(self.device)
        self.adapter = ControlAdapter(cfg)
        if ckpt is not None:
            self.adapter.load_state_dict(ckpt["model"])
        self.module = self.Module(self.adapter, self.var)
        return self.module

    class Module(nn.Module):
        """adapter + frozen VAR: the teacher-forced loss as one forward (under autocast and DDP)."""

        def __init__(self, adapter, var):
            super().__init__()
            self.adapter, self.var = adapter, var

        def train(self, mode: bool = True):
            self.adapter.train(mode)
            self.var.eval()  # frozen: no dropout / drop-path
            return self

        def forward(self, labels, x_in, maps, targets, class_drop_rate, scale_weighting="token"):
            from models.control import control_loss

            return control_loss(self.var, self.adapter, labels, x_in, maps, targets, class_drop_rate,
                                scale_weighting=scale_weighting)

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.adapter.cfg.to_dict(), "model": self.adapter.state_dict(),
                "var_config": self.var.cfg.to_dict(), "var": self.var.state_dict(),
                "vae_config": self.vae.cfg.to_dict(), "vae": self.vae.state_dict(),
                "class_names": list(self.names), "base": self.base}

    def maps(self, batch) -> torch.Tensor:
        from studio.preprocess import ground_truth_maps

        a = self.args
        m = ground_truth_maps(self.control_type, images=batch["image"], depth_m=batch.get("depth"),
                              labels=batch.get("labels"), low=a.canny_low, high=a.canny_high)
        return m.to(self.device)

    def tokens(self, x):
        return teacher_forcing(self.vae, x)

    def training_step(self, model, batch, step):
        target, x_in = self.tokens(batch["image"])
        loss = model(batch["class_id"], x_in, self.maps(batch), target, self.args.class_drop_rate,
                     self.args.scale_weighting)
        return loss, {}

    def set_eval_batch(self, batch):
        self.eval_batch = None
        if batch is not None:
            x = to_resolution(batch["image"], self.resolution()).to(self.device)
            target, x_in = self.tokens(x)
            self.eval_batch = (batch["class_id"].to(self.device), target, x_in, self.maps(batch), x)

    @torch.no_grad()
    def evaluate(self):
        """Held-out teacher-forced cross-entropy and token accuracy with the adapter, beside the
        frozen base model's (the gain is what the control map tells the model); wce: the same with
        every scale weighing the same (token_weights "equal"), where the layout scales show."""
        from models.control import Control, ControlHook

        if self.eval_batch is None:
            return {}
        labels, target, x_in, maps, _ = self.eval_batch
        self.adapter.eval()
        try:
            hook = ControlHook([Control(self.adapter, maps)], labels.shape[0], self.var.begin_ends)
            out = {}
            for suffix, h in (("", hook), ("_base", None)):
                logits = self.var(labels, x_in, cond_drop_rate=0.0, block_hook=h)
                ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, L)
                out["ce" + suffix] = float(ce.mean())
                out["wce" + suffix] = float((ce * token_weights(self.var.cfg.patch_nums, "equal")).sum(1).mean())
                out["acc" + suffix] = float((logits.argmax(-1) == target).float().mean())
        finally:
            self.adapter.train()
        return out

    def pipeline(self):
        from models.control import ControlAdapter
        from studio.pipeline import VARPipeline

        pipe = VARPipeline(self.vae, self.var, self.names, device=self.device)
        adapter = ControlAdapter(self.adapter.cfg)
        adapter.load_state_dict(self.adapter.state_dict())
        pipe.add_control(adapter)
        return pipe

    def write_samples(self, path):
        """Rows: held-out renders, their control maps, images generated under those maps (same classes)."""
        if self.eval_batch is None:
            return
        from studio import preprocess as pp

        labels, _, _, maps, x = self.eval_batch
        n = min(self.args.num_samples, x.shape[0])
        pipe = self.pipeline()
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        out = pipe(class_labels=labels[:n].tolist(), guidance_scale=self.args.guidance, generator=gen,
                   control_image=maps[:n], control_type=self.control_type, output_type="pt")
        shown = [torch.from_numpy(np.asarray(pp.map_preview(self.control_type, m, self.adapter.cfg.in_channels),
                                             np.float32)).permute(2, 0, 1) / 127.5 - 1 for m in maps[:n].cpu()]
        image_grid([x[:n].cpu(), torch.stack(shown), out.images.float().cpu() * 2 - 1], path)

    def final_files(self, out, info):
        from safetensors.torch import save_file

        name = f"control_{self.control_type}"
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.adapter.state_dict().items()},
                  str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps({"control": self.adapter.cfg.to_dict(), "training": info},
                                                     indent=2))

    def export(self, folder, info):
        """Add the adapter to a bundle: `folder` becomes a copy of the base bundle (unless it is the
        base) with control_<type>.safetensors (fp16) and its config under config.json["control"]."""
        import shutil

        from safetensors.torch import save_file

        from studio import checkpoints

        folder.mkdir(parents=True, exist_ok=True)
        base = Path(self.base) if self.base else None
        if base is not None and base.is_dir() and base.resolve() != folder.resolve():
            for f in base.iterdir():
                if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name == "MODEL_CARD.md"):
                    shutil.copy2(f, folder / f.name)
        if not (folder / "config.json").exists():
            checkpoints.save_bundle(folder, self.vae, self.var, self.names, dtype=torch.float16)
        cfg = checkpoints.read_bundle_config(folder)
        cfg.setdefault("control", {})[self.control_type] = self.adapter.cfg.to_dict()
        cfg.setdefault("control_training", {})[self.control_type] = info
        save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.adapter.state_dict().items()},
                  str(folder / f"control_{self.control_type}.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"[train] {self.control_type} adapter added to {folder} ({size / 2**20:.1f} MiB of weights)")


# ---------------------------------------------------------------------------------------------
# the loop


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
    if args.fresh:
        return None
    if args.resume:
        p = Path(args.resume)
        p = p / CHECKPOINT if p.is_dir() else p
        if not p.exists():
            raise SystemExit(f"--resume {args.resume}: no checkpoint there")
        return p
    p = out / CHECKPOINT
    return p if p.exists() else None


def note_ignored_config(cls, args, cfg: dict, skip=()) -> None:
    """On resume the model config comes from the checkpoint: say so when the flags ask otherwise."""
    asked = config_from_args(cls, args, cfg, skip)
    norm = lambda d: {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}  # noqa: E731
    diff = sorted(k for k, v in norm(asked).items() if norm(cfg).get(k) != v)
    if diff:
        print(f"[train] resuming: the model config comes from the checkpoint; ignored flags for {diff}",
              file=sys.stderr)


def jsonable_args(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, tuple, list, type(None)))}


def run(args) -> dict:
    """Train `args.task` per the flags. Returns a summary (also written to OUT/summary.json)."""
    from tqdm.auto import tqdm

    task_cls = TASKS[args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    acc, precision = make_accelerator(args, task_cls)
    main = acc.is_main_process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    ckpt_path = resolve_checkpoint(args, out)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path else None
    if ckpt is not None and ckpt.get("task") != task_cls.name:
        raise SystemExit(f"{ckpt_path} is a '{ckpt.get('task')}' checkpoint, not '{task_cls.name}'")
    step = int(ckpt["step"]) if ckpt else 0
    elapsed0 = float(ckpt["elapsed"]) if ckpt else 0.0
    images_seen = int(ckpt["images_seen"]) if ckpt else 0

    torch.manual_seed(args.seed)  # identical initial weights on every process
    task = task_cls(args, acc)
    model = task.build(ckpt)
    optimizer = adamw(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    model, optimizer = acc.prepare(model, optimizer)
    sched = Schedule(args.lr, args.warmup_steps, args.steps, args.minutes * 60 if args.minutes else None,
                     args.min_lr_ratio)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
        if acc.process_index > 0:
            torch.manual_seed(hash((args.seed, step, acc.process_index)) % 2**31)
        if main:
            truncate_metrics(metrics_path, step)
            print(f"[train] resumed {ckpt_path} at step {step} ({images_seen} images, {elapsed0 / 60:.1f} min)")
    else:
        torch.manual_seed(args.seed + acc.process_index)
        random.seed(args.seed + acc.process_index)
        np.random.seed(args.seed + acc.process_index)
        if main and metrics_path.exists():
            metrics_path.unlink()

    res = task.resolution()
    source = make_source(args.data, res, task.data_fields)
    stream = BatchStream(source, args.batch_size, args.seed, start_batch=step, rank=acc.process_index,
                         world_size=acc.num_processes, hflip=args.hflip)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                                         prefetch_factor=4 if args.num_workers else None,
                                         persistent_workers=False,
                                         # its own generator: starting the loader must not draw from
                                         # the global RNG (a resumed run would drift from an unbroken one)
                                         generator=torch.Generator().manual_seed(args.seed))
    task.set_eval_batch(held_out_batch(args, getattr(source, "size", res), args.eval_size, task.data_fields)
                        if main else None)
    if main:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[train] {task_cls.name}: {n_params / 1e6:.2f}M trainable parameters, {res}px, data {args.data}, "
              f"batch {args.batch_size} x {acc.num_processes} process(es), precision {precision}, device {acc.device}")
        (out / "args.json").write_text(json.dumps(jsonable_args(args), indent=2))

    def save(step):
        if main:
            state = task.state()
            state.update(task=task_cls.name, step=step, elapsed=elapsed(), images_seen=images_seen,
                         optimizer=optimizer.state_dict(), rng=rng_state(),
                         schedule=dataclasses.asdict(sched), args=jsonable_args(args))
            atomic_torch_save(state, out / CHECKPOINT)
        acc.wait_for_everyone()

    def log(row):
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint_and_report(step):
        if main:
            rng = rng_state()  # reporting must not change the training's random stream
            ev = task.evaluate()
            if ev:
                log({"kind": "eval", "step": step, "time": round(elapsed(), 2), **ev})
                shown = {k: round(v, 3) for k, v in ev.items() if isinstance(v, float)}
                bar.write(f"[train] step {step} eval {shown}")
            task.write_samples(out / "samples.png")
            plot_metrics(read_metrics(metrics_path), task.panels, out / "loss.png")
            set_rng_state(rng)
        save(step)

    t_start = time.time()

    def elapsed():
        return elapsed0 + time.time() - t_start

    def finished(step, now):
        return (args.steps is not None and step >= args.steps) or bool(args.minutes and now >= args.minutes * 60)

    bar = tqdm(total=args.steps, initial=step, disable=not main or args.quiet, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    # Ctrl-C: finish the current step, then checkpoint, report and export as at the end of the budget
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        if main:
            bar.write("[train] stopping after this step (Ctrl-C again to abort without saving)")

    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None

    def clock():
        """(elapsed seconds, stop asked): the main process's values on every process, so that all
        of them use the same learning rate and stop at the same step."""
        vals = [elapsed(), float(stop["asked"])]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            vals = broadcast(torch.tensor(vals, dtype=torch.float64, device=acc.device), from_process=0).tolist()
        return vals[0], vals[1] > 0

    win_loss, win_n, win_imgs, win_time, extra = 0.0, 0, 0, 0.0, {}
    model.train()
    t_step = time.time()
    try:
        it = iter(loader)
        now, asked = clock()  # now: elapsed seconds of the whole run (resumed time included)
        while not finished(step, now) and not asked:
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in next(it).items()}
            x = batch["image"] = to_resolution(batch["image"], res)  # depth/labels: the task's business
            lr = sched.lr_at(step, now)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, m = task.training_step(model, batch, step)
            acc.backward(loss)
            gnorm = acc.clip_grad_norm_(model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            task.after_step(step)
            n_img = x.shape[0] * acc.num_processes
            images_seen += n_img
            win_time += time.time() - t_step
            win_imgs += n_img
            win_n += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss is {lv} at step {step}; lower --lr or use --precision fp32")
            win_loss += lv
            for k, v in m.items():
                extra[k] = extra.get(k, 0.0) + float(v)
            if gnorm is not None:
                extra["grad_norm"] = extra.get("grad_norm", 0.0) + float(gnorm)
            bar.update(1)
            now, asked = clock()
            last = finished(step, now) or asked
            if step % args.metrics_every == 0 or last:
                vec = acc.reduce(torch.tensor([win_loss / win_n] + [v / win_n for v in extra.values()],
                                              device=acc.device), reduction="mean").tolist()
                row = {"kind": "train", "step": step, "time": round(elapsed(), 2), "images": images_seen,
                       "lr": lr, "img_per_s": round(win_imgs / max(win_time, 1e-9), 3), "loss": vec[0],
                       **dict(zip(extra.keys(), vec[1:])), **task.window_metrics()}
                log(row)
                bar.set_postfix(loss=f"{vec[0]:.4f}", img_s=f"{row['img_per_s']:.1f}", lr=f"{lr:.2e}")
                win_loss, win_n, win_imgs, win_time, extra = 0.0, 0, 0, 0.0, {}
            if step % args.log_every == 0 and not last:
                checkpoint_and_report(step)
            elif args.save_every and step % args.save_every == 0:
                save(step)
            t_step = time.time()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, old_handler)
    was_interrupted = stop["asked"] or (acc.num_processes > 1 and clock()[1])
    bar.close()
    checkpoint_and_report(step)
    summary = {"task": task_cls.name, "step": step, "images_seen": images_seen, "minutes": round(elapsed() / 60, 2),
               "interrupted": was_interrupted, "precision": precision, "data": args.data,
               "last_train": next((r for r in reversed(read_metrics(metrics_path)) if r["kind"] == "train"), None),
               "last_eval": next((r for r in reversed(read_metrics(metrics_path)) if r["kind"] == "eval"), None)}
    if main:
        info = {k: summary[k] for k in ("step", "images_seen", "minutes", "precision", "data")}
        info.update(batch_size=args.batch_size * acc.num_processes, lr=args.lr, seed=args.seed,
                    command="python -m lab.train " + " ".join(args.argv))
        if summary["last_eval"]:
            info["held_out"] = {k: v for k, v in summary["last_eval"].items() if isinstance(v, (int, float))}
        task.final_files(out, info)
        if args.export:
            task.export(Path(args.export), info)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return summary


# ---------------------------------------------------------------------------------------------
# command line


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.steps is None and args.minutes is None:
        args.steps = 1000
        print("[train] neither --steps nor --minutes given: training 1000 steps", file=sys.stderr)
    return run(args)


if __name__ == "__main__":
    main()
