"""Training data: every source is a numbered collection; a BatchStream turns (seed, batch number) into indices.

`--data render[:SIZE]` renders the procedural world on the fly (in DataLoader workers) from training
seeds (< TRAIN_SEED_LIMIT; held-out evaluation uses seeds >= EVAL_SEED_START), `--data DIR` reads
shards written by `python -m lab.worlddata --out DIR`. Batches are a pure function of (seed, step),
so a resumed run sees exactly the batches an uninterrupted one would have seen.

A batch is a dict of tensors: image (B,3,H,W) float in [-1,1] and class_id (B,) int64 always;
depth (B,H,W) float32 and labels (B,H,W) int64 when the task lists them in `Task.data_fields`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lab.train.task import TrainError

TRAIN_SEED_LIMIT = 10_000_000  # training renders seeds below this ...
EVAL_SEED_START = 10_000_000  # ... and held-out evaluation renders seeds from here on
SPATIAL_FIELDS = ("image", "depth", "labels")


def load_world():
    """The world (`studio.world`): render_batch, CLASS_NAMES, SEG_CLASSES. Imported lazily, and
    replaced by a stand-in in the tests (patch `lab.train.data.load_world`)."""
    import studio.world as world

    return world


def open_shards(folder: str):
    """A shard folder as a Dataset (`lab.worlddata.WorldShards`); replaced by a stand-in in the tests."""
    from lab.worlddata import WorldShards

    return WorldShards(folder)


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
    """Index i -> item i of `open_shards(folder)` (a `lab.worlddata.WorldShards`).

    `block_offsets` (the shard boundaries) lets BatchStream read one shard at a time: a shard is
    decompressed whole (about 0.5 s for 1000 images at 128 px) and only the last two are cached."""

    def __init__(self, folder: str, fields=("image", "class_id")):
        self.fields = tuple(fields)
        self.ds = open_shards(folder)
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
    """`render`, `render:SIZE` or a shard folder. Raises TrainError for anything else."""
    spec = str(spec)
    if spec == "render" or spec.startswith("render:"):
        try:
            size = int(spec.split(":", 1)[1]) if ":" in spec else default_size
        except ValueError:
            raise TrainError(f"--data {spec}: the size of render:SIZE must be a whole number") from None
        return RenderSource(size, fields=fields)
    if not Path(spec).is_dir():
        raise TrainError(f"--data {spec}: not a folder of shards, nor render[:SIZE]")
    try:
        return ShardSource(spec, fields)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"--data {spec}: {e}") from e


def held_out_batch(args, size: int, n: int, fields) -> Optional[Dict[str, torch.Tensor]]:
    """The fixed evaluation batch: `--eval-data DIR` items, else renders of seeds >= EVAL_SEED_START."""
    if n <= 0:
        return None
    if args.eval_data:
        try:
            src = ShardSource(args.eval_data, fields)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(f"--eval-data {args.eval_data}: {e}") from e
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
