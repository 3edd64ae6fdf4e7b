"""Render the landscape world (studio.world) to dataset shards, read them back, or benchmark the renderer.

    python -m lab.worlddata --out data/world128 --count 50000 --size 128 --shard-size 1000 --workers 2
    python -m lab.worlddata --bench

Shards are ``shard_00000.npz`` ... (np.savez_compressed): images uint8 (N,H,W,3), depth float16
(N,H,W, metres along the view ray, FAR_DEPTH for sky), labels uint8 (N,H,W), class_ids int16 (N,),
seeds int64 (N,). Shard i holds seeds start_seed + i*shard_size ... in order, whatever the number
of workers, so a dataset is a pure function of (start_seed, count, size, supersample, version).
``meta.json`` describes the classes, the palette and the shards. ``WorldShards`` reads them as a
torch Dataset.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import time
from collections import OrderedDict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from studio.world import CLASS_NAMES, FAR_DEPTH, SEG_CLASSES, SEG_PALETTE, WORLD_VERSION, render_batch

SHARD_PATTERN = "shard_{:05d}.npz"


def _render_shard(job):
    out_dir, index, seeds, size, supersample = job
    t0 = time.perf_counter()
    batch = render_batch(seeds, size=size, supersample=supersample)
    path = Path(out_dir) / SHARD_PATTERN.format(index)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        images=batch.images,
        depth=batch.depth.astype(np.float16),
        labels=batch.labels.astype(np.uint8),
        class_ids=batch.class_ids.astype(np.int16),
        seeds=batch.seeds.astype(np.int64),
    )
    os.replace(tmp, path)  # a shard is either complete or absent
    return index, len(seeds), time.perf_counter() - t0


def dataset_meta(count: int, size: int, shard_size: int, start_seed: int, supersample: int) -> dict:
    shards = []
    for i, first in enumerate(range(start_seed, start_seed + count, shard_size)):
        n = min(shard_size, start_seed + count - first)
        shards.append({"file": SHARD_PATTERN.format(i), "count": n, "first_seed": first})
    return {
        "format": "var-studio-world-shards",
        "world_version": WORLD_VERSION,
        "size": size,
        "supersample": supersample,
        "count": count,
        "start_seed": start_seed,
        "shard_size": shard_size,
        "classes": list(CLASS_NAMES),
        "class_of_seed": "seed % len(classes)",
        "seg_classes": list(SEG_CLASSES),
        "seg_palette": [list(c) for c in SEG_PALETTE],
        "depth": {"units": "metres", "convention": "distance from the camera centre along the view ray",
                  "far": FAR_DEPTH, "far_means": "sky or cloud", "dtype": "float16"},
        "arrays": {"images": "uint8 (N,H,W,3)", "depth": "float16 (N,H,W)", "labels": "uint8 (N,H,W)",
                   "class_ids": "int16 (N,)", "seeds": "int64 (N,)"},
        "shards": shards,
    }


def write_dataset(out: str | Path, count: int, size: int = 128, shard_size: int = 1000, start_seed: int = 0,
                  workers: int = 1, supersample: int = 2, resume: bool = False, log=print) -> dict:
    """Render seeds [start_seed, start_seed + count) into shards under out; returns the meta dict."""
    if count < 1 or shard_size < 1 or workers < 1 or start_seed < 0:
        raise ValueError("count, shard_size and workers must be >= 1 and start_seed >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dataset_meta(count, size, shard_size, start_seed, supersample)
    meta_path = out / "meta.json"
    if resume and meta_path.exists():
        old = json.loads(meta_path.read_text())
        keys = ("world_version", "size", "supersample", "start_seed", "shard_size")
        if any(old.get(k) != meta[k] for k in keys):
            raise ValueError(f"{meta_path} describes another dataset; use another --out")
    jobs = []
    for i, sh in enumerate(meta["shards"]):
        if resume and (out / sh["file"]).exists():
            continue
        seeds = list(range(sh["first_seed"], sh["first_seed"] + sh["count"]))
        jobs.append((str(out), i, seeds, size, supersample))
    todo = sum(len(j[2]) for j in jobs)
    log(f"world v{WORLD_VERSION}: {todo} images at {size}px in {len(jobs)} shards -> {out} "
        f"({workers} worker{'s' if workers > 1 else ''})")
    t0, done = time.perf_counter(), 0
    if workers == 1:
        results = map(_render_shard, jobs)
        pool = None
    else:
        pool = get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_render_shard, jobs)
    try:
        for k, (index, n, secs) in enumerate(results, 1):
            done += n
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else float("inf")
            eta = (todo - done) / rate if rate > 0 else 0.0
            log(f"  shard {index:5d} ({n} images, {secs:.1f}s)  {k}/{len(jobs)} shards  {done}/{todo} images"
                f"  {rate:.1f} img/s  eta {eta:.0f}s")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"done: {done} images in {time.perf_counter() - t0:.1f}s; wrote {meta_path}")
    return meta


def bench(sizes=(64, 128, 256), counts=(256, 256, 64), supersample: int = 2, log=print) -> list[dict]:
    """Single-process render throughput per size (one core: numpy here does not multithread)."""
    rows = []
    render_batch([0], size=sizes[0], supersample=supersample)  # warm caches / imports
    for size, n in zip(sizes, counts):
        t0 = time.perf_counter()
        render_batch(range(n), size=size, supersample=supersample)
        secs = time.perf_counter() - t0
        rows.append({"size": size, "images": n, "seconds": secs, "images_per_s": n / secs,
                     "ms_per_image": 1000.0 * secs / n})
    log(f"world v{WORLD_VERSION} render benchmark (one process, supersample {supersample}x{supersample})")
    log(f"{'size':>6} {'images':>7} {'seconds':>8} {'img/s':>8} {'ms/img':>8}")
    for r in rows:
        log(f"{r['size']:>6} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>8.1f} {r['ms_per_image']:>8.1f}")
    return rows


# ---------------------------------------------------------------------------------------------
# reading shards back


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.worlddata", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder for shards and meta.json")
    p.add_argument("--count", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--start-seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--supersample", type=int, default=2, help="sub-samples per pixel side (default 2)")
    p.add_argument("--resume", action="store_true", help="keep shards already in --out")
    p.add_argument("--bench", action="store_true", help="print render throughput at 64/128/256 px and exit")
    p.add_argument("--bench-counts", default="256,256,64", help="images per size for --bench")
    a = p.parse_args(argv)
    if a.bench:
        counts = tuple(int(c) for c in a.bench_counts.split(","))
        bench(counts=counts, supersample=a.supersample)
        return 0
    if not a.out:
        p.error("--out is required (or --bench)")
    try:
        write_dataset(a.out, a.count, a.size, a.shard_size, a.start_seed, a.workers, a.supersample, a.resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
