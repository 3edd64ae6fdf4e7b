"""Training, saving, loading and inference for the world's domain nets (models/domain.py).

    python -m lab.domain pool --cache runs/domain/pool128.npz --pool 1024     # optional: render once
    python -m lab.domain train --net depth --out runs/domain --minutes 4 [--cache runs/domain/pool128.npz]
    python -m lab.domain info --dir runs/domain          # params, CPU latency, held-out metrics

    from lab.domain import load_domain_nets, estimate_depth, segment, classify
    nets = load_domain_nets("runs/domain")                  # or a bundle folder
    depth_m = estimate_depth(nets["depth"], pil_image)      # (H, W) float32 metres
    labels = segment(nets["seg"], pil_image)                # (H, W) int64 ids into SEG_CLASSES
    class_id = classify(nets["class"], pil_image)           # int id into CLASS_NAMES

Training data is rendered on the fly by the world (studio.world.render_batch) from seeds below
TRAIN_SEED_LIMIT; held-out evaluation uses seeds from EVAL_SEED_START on. Rendering costs about as
much as a training step, so images come from a replay pool: `pool` renders up front (optionally
cached on disk and shared by the three nets), then `fresh_per_step` new renders replace the oldest
ones at every step. Every batch is augmented (flips, small colour jitter) and, with probability
`degrade_p`, degraded by blur, down-and-up scaling, JPEG and noise, so the nets also read the
slightly blurry, blocky images that the VQVAE and the generator produce.

Files: `{kind}.safetensors` (float32 state dict; the config as JSON in the safetensors metadata)
and `{kind}.json` (config + training metrics). In a bundle the tensors are `{kind}.safetensors`
next to config.json and the configs live under config.json["domain"][kind].
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from models.domain import NETS, ClassNet, DepthNet, SegNet, build, count_params
from lab import metrics
from studio.domainnets import (  # noqa: F401  (re-exported: the lab's one name for the domain nets)
    EVAL_SEED_START, FILE_FORMAT, default_config, KINDS, TRAIN_SEED_LIMIT, bundle_parts, class_features, classify,
    estimate_depth, load_domain_nets, load_net, net_from_state_dict, normalise_depth, save_net, segment, world,
    _device, _state_dict_f32)
from studio import images
from studio.images import images_to_tensor, tensor_to_images  # noqa: F401  (re-exported likewise)




# ---------------------------------------------------------------------------------------------
# data


def render_arrays(seeds: Sequence[int], size: int) -> Dict[str, np.ndarray]:
    b = world().render_batch(list(seeds), size=size)
    return {"images": b.images, "depth": b.depth, "labels": b.labels.astype(np.int64),
            "class_ids": np.asarray(b.class_ids, np.int64), "seeds": np.asarray(list(seeds), np.int64)}


def held_out_seeds(n: int, offset: int = 0) -> list:
    return list(range(EVAL_SEED_START + offset, EVAL_SEED_START + offset + n))


class RenderPool:
    """A replay pool of training renders (seeds drawn from [0, TRAIN_SEED_LIMIT) by `seed`).

    The first `capacity` seeds are rendered up front (or read from `cache`, an .npz written on first
    use); `refresh(k)` renders the next k seeds of the stream over the oldest entries."""

    def __init__(self, size: int, capacity: int, seed: int, cache: Optional[Union[str, Path]] = None,
                 log=print):
        self.size, self.capacity = int(size), int(capacity)
        self._seeds = np.random.default_rng([int(seed), 77]).permutation(TRAIN_SEED_LIMIT)  # no repeats
        self._next, self._oldest = 0, 0
        data = self._load_cache(cache) if cache else None
        if data is None:
            t0 = time.perf_counter()
            data = render_arrays(self._take(self.capacity), self.size)
            log(f"[domain] rendered a pool of {self.capacity} images at {self.size} px in "
                f"{time.perf_counter() - t0:.0f}s")
            if cache:
                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(str(cache) + ".tmp.npz")
                np.savez(tmp, version=world().WORLD_VERSION, **data)
                tmp.replace(cache)
        else:
            self._next = self.capacity
            log(f"[domain] read a pool of {self.capacity} renders from {cache}")
        self.data = data
        self.rendered = self.capacity

    def _take(self, k: int) -> np.ndarray:
        s = self._seeds[self._next:self._next + k]
        self._next += k
        return s

    def _load_cache(self, cache) -> Optional[dict]:
        p = Path(cache)
        if not p.exists():
            return None
        z = np.load(p)
        expect = self._seeds[:self.capacity]
        if (int(z["version"]) != world().WORLD_VERSION or z["images"].shape[1] != self.size
                or len(z["seeds"]) < self.capacity or not np.array_equal(z["seeds"][:self.capacity], expect)):
            return None  # a cache of another world version, size or seed stream: render afresh
        return {k: z[k][:self.capacity] for k in ("images", "depth", "labels", "class_ids", "seeds")}

    def refresh(self, k: int) -> None:
        if k <= 0:
            return
        new = render_arrays(self._take(k), self.size)
        idx = (self._oldest + np.arange(k)) % self.capacity
        self._oldest = int((self._oldest + k) % self.capacity)
        for key, v in new.items():
            self.data[key][idx] = v
        self.rendered += k

    def sample(self, batch_size: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        idx = rng.integers(0, self.capacity, batch_size)
        return {k: v[idx] for k, v in self.data.items()}


# ---------------------------------------------------------------------------------------------
# augmentation


def _jpeg(x_13HW: torch.Tensor, quality: int) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(tensor_to_images(x_13HW)[0]).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return images_to_tensor(np.asarray(Image.open(buf).convert("RGB"))[None])


def degrade(x_N3HW: torch.Tensor, rng: np.random.Generator, p: float = 0.6) -> torch.Tensor:
    """Make some images look like VQVAE reconstructions / generated images: with probability p an
    image gets one or more of down-and-up scaling, Gaussian blur, JPEG blocking and noise."""
    out = []
    H, W = x_N3HW.shape[-2:]
    for x in x_N3HW.split(1):
        if rng.random() < p:
            ops = rng.random(4) < (0.5, 0.4, 0.4, 0.3)
            if not ops.any():
                ops[rng.integers(4)] = True
            if ops[0]:
                f = rng.uniform(1.5, 3.5)
                small = F.interpolate(x, size=(max(4, round(H / f)), max(4, round(W / f))), mode="bilinear",
                                      antialias=True, align_corners=False)
                x = F.interpolate(small, size=(H, W), mode="bicubic" if rng.random() < 0.5 else "bilinear",
                                  align_corners=False)
            if ops[1]:
                blurred = images.gaussian_blur(x[0].permute(1, 2, 0).numpy(), float(rng.uniform(0.4, 1.4)))
                x = torch.from_numpy(blurred).permute(2, 0, 1)[None]
            if ops[2]:
                x = _jpeg(x.clamp(-1, 1), int(rng.integers(25, 85)))
            if ops[3]:
                g = torch.Generator().manual_seed(int(rng.integers(2**31)))
                x = x + torch.randn(x.shape, generator=g) * float(rng.uniform(0.01, 0.05))
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def colour_jitter(x_N3HW: torch.Tensor, rng: np.random.Generator, amount: float = 0.08) -> torch.Tensor:
    """Small per-image brightness, contrast and saturation changes (hue is left alone: it tells the
    time of day apart, which is part of the class)."""
    N = x_N3HW.shape[0]
    def u():
        return torch.from_numpy(rng.uniform(1 - amount, 1 + amount, N).astype(np.float32)).view(N, 1, 1, 1)

    x = (x_N3HW + 1) * 0.5
    x = x * u()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u() + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * u() + gray
    return (x.clamp(0, 1) * 2 - 1)


def make_batch(raw: Dict[str, np.ndarray], rng: np.random.Generator, augment: bool = True,
               degrade_p: float = 0.6) -> Dict[str, torch.Tensor]:
    """Pool arrays -> tensors: image (B,3,H,W) [-1,1], depth (B,H,W) metres, labels (B,H,W), class_id (B,)."""
    x = images_to_tensor(raw["images"])
    depth = torch.from_numpy(np.ascontiguousarray(raw["depth"])).float()
    labels = torch.from_numpy(np.ascontiguousarray(raw["labels"])).long()
    if augment:
        flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        depth = torch.where(flip.view(-1, 1, 1), depth.flip(-1), depth)
        labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
        x = degrade(colour_jitter(x, rng), rng, degrade_p)
    return {"image": x, "depth": depth, "labels": labels,
            "class_id": torch.from_numpy(np.asarray(raw["class_ids"], np.int64))}


# ---------------------------------------------------------------------------------------------
# losses and held-out evaluation


def loss_fn(kind: str, net: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    x = batch["image"]
    if kind == "depth":
        t = net.normalise(batch["depth"])[:, None]  # (B,1,H,W) normalised log-depth
        pred = net(x)
        gx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
        gy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
        # L1 on the values, plus L1 on their gradients for crisp silhouettes (ridges, shores)
        return (pred - t).abs().mean() + 0.5 * ((gx(pred) - gx(t)).abs().mean() + (gy(pred) - gy(t)).abs().mean())
    if kind == "seg":
        return F.cross_entropy(net(x), batch["labels"])
    if kind == "class":
        return F.cross_entropy(net(x), batch["class_id"], label_smoothing=0.05)
    raise ValueError(f"unknown domain net {kind!r}")


@torch.no_grad()
def evaluate(kind: str, net: nn.Module, data: Dict[str, np.ndarray], batch_size: int = 32,
             degraded: bool = False, seed: int = 0) -> dict:
    """Held-out metrics of one net on render arrays (see render_arrays); degraded=True scores the
    same images after a fixed random degradation (how the net fares on generated-looking images)."""
    was = net.training
    net.eval()
    rng = np.random.default_rng([seed, 5])
    preds = []
    for i in range(0, len(data["images"]), batch_size):
        x = images_to_tensor(data["images"][i:i + batch_size]).to(_device(net))
        if degraded:
            x = degrade(x.cpu(), rng, p=1.0).to(x.device)
        if kind == "depth":
            preds.append(net(x)[:, 0].float().clamp(0, 1).cpu())  # as estimate_depth
        elif kind == "seg":
            preds.append(net(x).argmax(1).cpu())
        else:
            preds.append(net(x).float().cpu())
    net.train(was)
    pred = torch.cat(preds)
    if kind == "depth":
        gt = net.normalise(torch.from_numpy(data["depth"]))
        ground = data["depth"] < world().FAR_DEPTH
        pm, gm = net.to_metres(pred).numpy(), data["depth"]
        absrel = float(np.mean(np.abs(pm[ground] - gm[ground]) / gm[ground])) if ground.any() else float("nan")
        return {"depth_rel_rmse": metrics.depth_rel_rmse(pred, gt),
                "depth_rel_rmse_aligned": metrics.depth_rel_rmse(pred, gt, align=True),
                "depth_absrel_ground_m": absrel}
    if kind == "seg":
        n = net.cfg.num_classes
        iou = metrics.iou_per_class(pred, data["labels"], n)
        names = world().SEG_CLASSES if len(world().SEG_CLASSES) == n else [str(i) for i in range(n)]
        return {"miou": metrics.miou(pred, data["labels"], n),
                "pixel_accuracy": metrics.pixel_accuracy(pred, data["labels"]),
                "iou": {names[i]: (None if np.isnan(v) else round(float(v), 4)) for i, v in enumerate(iou)}}
    return {"accuracy": metrics.accuracy(pred, data["class_ids"])}


# ---------------------------------------------------------------------------------------------
# training


def train(kind: str, out_dir: Optional[Union[str, Path]] = None, steps: Optional[int] = None,
          minutes: Optional[float] = None, batch_size: int = 12, size: int = 128, seed: int = 0,
          device: Union[str, torch.device] = "cpu", config: Optional[dict] = None, lr: float = 2e-3,
          pool: int = 512, fresh_per_step: int = 1, cache: Optional[Union[str, Path]] = None,
          eval_n: int = 64, degrade_p: float = 0.6, log_every: int = 25, log=print,
          pool_obj: Optional[RenderPool] = None) -> Tuple[nn.Module, dict]:
    """Train one domain net; stop after `steps` or `minutes` (whichever comes first; at least one
    must be given). Returns the net (eval mode, on `device`) and a metrics dict; with out_dir, also
    writes {kind}.safetensors and {kind}.json there."""
    if kind not in KINDS:
        raise ValueError(f"unknown domain net {kind!r}; known: {KINDS}")
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    torch.manual_seed(seed)
    device = torch.device(device)
    net = build(kind, config or default_config(kind, size)).to(device)
    if net.cfg.resolution != size:
        raise ValueError(f"config resolution {net.cfg.resolution} differs from size {size}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    rng = np.random.default_rng([seed, 11, KINDS.index(kind)])
    pool_obj = pool_obj or RenderPool(size, pool, seed, cache, log)
    held = render_arrays(held_out_seeds(eval_n), size) if eval_n > 0 else None

    budget_s = float("inf") if minutes is None else 60.0 * float(minutes)
    max_steps = steps if steps is not None else 10**9
    warmup = 20
    t0 = time.perf_counter()
    history, window = [], []
    step = 0
    net.train()
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            break
        progress = min(1.0, max(step / max_steps if steps is not None else 0.0, elapsed / budget_s))
        for g in opt.param_groups:  # linear warm-up, then cosine decay over steps or time
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        batch = make_batch(pool_obj.sample(batch_size, rng), rng, degrade_p=degrade_p)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_fn(kind, net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        step += 1
        pool_obj.refresh(fresh_per_step)
        if step % log_every == 0:
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "loss": float(np.mean(window))}
            history.append(row)
            log(f"[domain:{kind}] step {step} {row['seconds']:.0f}s loss {row['loss']:.4f}")
            window = []
    train_s = time.perf_counter() - t0
    net.eval()
    result = {"kind": kind, "steps": step, "train_seconds": round(train_s, 1), "batch_size": batch_size,
              "size": size, "seed": seed, "images_seen": step * batch_size, "renders_used": pool_obj.rendered,
              "final_loss": float(np.mean(window)) if window else (history[-1]["loss"] if history else None),
              "params": count_params(net), "history": history}
    if held is not None:
        result["held_out"] = {"n": eval_n, "seeds": f"{EVAL_SEED_START}..{EVAL_SEED_START + eval_n - 1}",
                              "clean": evaluate(kind, net, held), "degraded": evaluate(kind, net, held, degraded=True)}
    result["cpu_ms_per_image"] = round(inference_ms(net.cpu(), size), 2)
    net.to(device)
    if out_dir is not None:
        save_net(net, Path(out_dir) / f"{kind}.safetensors", kind, result)
    return net, result


def train_depth(out_dir=None, steps=None, minutes=None, batch_size=12, size=128, seed=0, device="cpu", **kw):
    return train("depth", out_dir, steps, minutes, batch_size, size, seed, device, **kw)


def train_seg(out_dir=None, steps=None, minutes=None, batch_size=12, size=128, seed=0, device="cpu", **kw):
    return train("seg", out_dir, steps, minutes, batch_size, size, seed, device, **kw)


def train_class(out_dir=None, steps=None, minutes=None, batch_size=32, size=128, seed=0, device="cpu", **kw):
    return train("class", out_dir, steps, minutes, batch_size, size, seed, device, **kw)


@torch.no_grad()
def inference_ms(net: nn.Module, size: int, repeats: int = 10) -> float:
    """Median CPU milliseconds of one forward pass on one size x size image (batch 1)."""
    was = net.training
    net.eval()
    x = torch.zeros(1, 3, size, size, device=_device(net))
    for _ in range(2):
        net(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        net(x)
        times.append(time.perf_counter() - t)
    net.train(was)
    return 1000.0 * float(np.median(times))


def _summary(kind: str, info: dict) -> str:
    ho = info.get("held_out", {})
    key = {"depth": "depth_rel_rmse", "seg": "miou", "class": "accuracy"}[kind]
    clean = ho.get("clean", {}).get(key)
    deg = ho.get("degraded", {}).get(key)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    ms = info.get("cpu_ms_per_image", float("nan"))
    return (f"{kind:6s} params {info.get('params', 0):>9,d}  cpu {ms:6.1f} ms/img  "
            f"steps {info.get('steps', 0):>6d}  held-out {key} {fmt(clean)} (degraded {fmt(deg)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.domain", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one domain net on on-the-fly renders")
    t.add_argument("--net", choices=KINDS, required=True)
    t.add_argument("--out", required=True, help="folder for {net}.safetensors and {net}.json")
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="default 12 (depth, seg), 32 (class)")
    t.add_argument("--size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--pool", type=int, default=512, help="renders kept in the replay pool")
    t.add_argument("--fresh-per-step", type=int, default=1, help="new renders per step")
    t.add_argument("--cache", default=None, help=".npz to read/write the initial pool (shared by the nets)")
    t.add_argument("--eval-n", type=int, default=64)
    t.add_argument("--widths", default=None, help="comma-separated channel widths (default: the config's)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pl = sub.add_parser("pool", help="render the initial replay pool into a cache file (shared by the nets)")
    pl.add_argument("--cache", required=True)
    pl.add_argument("--pool", type=int, default=512)
    pl.add_argument("--size", type=int, default=128)
    pl.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("info", help="params, CPU latency and held-out metrics of saved nets")
    i.add_argument("--dir", required=True)
    i.add_argument("--eval-n", type=int, default=0, help="re-evaluate on this many held-out renders")
    i.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.cmd == "train":
        if args.minutes is None and args.steps is None:
            p.error("give --minutes or --steps")
        overrides = {"widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}
        bs = args.batch_size or (32 if args.net == "class" else 12)
        _, info = train(args.net, args.out, args.steps, args.minutes, bs, args.size, args.seed, args.device,
                        config=default_config(args.net, args.size, **overrides), lr=args.lr, pool=args.pool,
                        fresh_per_step=args.fresh_per_step, cache=args.cache, eval_n=args.eval_n)
        print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))
        print(_summary(args.net, info))
        print(f"wrote {Path(args.out) / (args.net + '.safetensors')}")
        return 0
    if args.cmd == "pool":
        RenderPool(args.size, args.pool, args.seed, args.cache)
        return 0
    nets = load_domain_nets(args.dir)
    if not nets:
        print(f"no domain nets in {args.dir}", file=sys.stderr)
        return 1
    size = max(n.cfg.resolution for n in nets.values())
    held = render_arrays(held_out_seeds(args.eval_n), size) if args.eval_n else None
    for kind, net in nets.items():
        js = Path(args.dir) / f"{kind}.json"
        info = json.loads(js.read_text()) if js.exists() else {}
        info["params"] = count_params(net)
        info["cpu_ms_per_image"] = inference_ms(net, net.cfg.resolution)
        if held is not None:
            info["held_out"] = {"n": args.eval_n, "clean": evaluate(kind, net, held),
                                "degraded": evaluate(kind, net, held, degraded=True)}
        print(_summary(kind, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
