"""Torch access to world shards written by ``python -m studio.world --out DIR``."""
from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class WorldShards(Dataset):
    """A Dataset over the shards in ``root`` (see ``meta.json``).

    Item i is a dict: image float32 (3, H, W) in [-1, 1]; depth float32 (H, W) in metres along the
    view ray (FAR_DEPTH for sky); labels int64 (H, W); class_id int64 scalar tensor; seed int.
    Shards are compressed, so a shard is decompressed whole on first use and the last
    ``cache_shards`` are kept; read in shard order (``ShardShuffleSampler``) or ``preload=True``.
    """

    def __init__(self, root: str | Path, cache_shards: int = 2, preload: bool = False):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: not a world shard folder")
        self.meta = json.loads(meta_path.read_text())
        self.shards = self.meta["shards"]
        missing = [s["file"] for s in self.shards if not (self.root / s["file"]).exists()]
        if missing:
            raise FileNotFoundError(f"{self.root}: missing shards {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards]).tolist()
        self.class_names = self.meta["classes"]
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, dict] = OrderedDict()
        if preload:
            self.cache_shards = len(self.shards)
            for i in range(len(self.shards)):
                self._shard(i)

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, i: int) -> dict:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        with np.load(self.root / self.shards[i]["file"]) as z:
            arrays = {k: z[k] for k in ("images", "depth", "labels", "class_ids", "seeds")}
        if len(arrays["seeds"]) != self.shards[i]["count"]:
            raise ValueError(f"{self.shards[i]['file']}: {len(arrays['seeds'])} images, meta says {self.shards[i]['count']}")
        self._cache[i] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of item index."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def __getitem__(self, index: int) -> dict:
        s, r = self.locate(int(index))
        a = self._shard(s)
        image = torch.from_numpy(a["images"][r]).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {
            "image": image.contiguous(),
            "depth": torch.from_numpy(a["depth"][r].astype(np.float32)),
            "labels": torch.from_numpy(a["labels"][r].astype(np.int64)),
            "class_id": torch.tensor(int(a["class_ids"][r]), dtype=torch.int64),
            "seed": int(a["seeds"][r]),
        }


class ShardShuffleSampler(Sampler[int]):
    """Random order that visits shards one at a time (shards and rows shuffled), so each shard is
    decompressed once per epoch. Call ``set_epoch`` for a new order each epoch."""

    def __init__(self, data: WorldShards, seed: int = 0):
        self.offsets, self.seed, self.epoch = data.offsets, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.offsets[-1]

    def __iter__(self):
        g = np.random.default_rng([self.seed, self.epoch])
        for s in g.permutation(len(self.offsets) - 1):
            lo, hi = self.offsets[s], self.offsets[s + 1]
            yield from (lo + g.permutation(hi - lo)).tolist()
