"""The world's domain nets at inference time: loading (strict, safe), depth, segmentation, class.

    from studio.domainnets import load_domain_nets, estimate_depth, segment, classify
    nets = load_domain_nets("assets/default")               # a bundle, or a folder of save_net files
    depth_m = estimate_depth(nets["depth"], pil_image)      # (H, W) float32 metres
    labels = segment(nets["seg"], pil_image)                # (H, W) int64 ids into SEG_CLASSES
    class_id = classify(nets["class"], pil_image)           # int id into CLASS_NAMES

The nets (models/domain.py) are trained by the lab (python -m lab.domain). Files: `{kind}.safetensors`
(float32 state dict; the config as JSON in the safetensors metadata) and `{kind}.json`; in a bundle the
tensors sit next to config.json and the configs live under config.json["domain"][kind].
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.domain import NETS, ClassNet, DepthNet, SegNet, build
from studio import images as im

TRAIN_SEED_LIMIT = 10_000_000  # training renders use seeds below this ...
EVAL_SEED_START = 10_000_000  # ... held-out renders use seeds from here on
KINDS = ("depth", "seg", "class")
FILE_FORMAT = "var-studio-domain-net"


def world():
    import studio.world as w

    return w


def default_config(kind: str, size: int = 128, **overrides) -> dict:
    """The config of a net for this world (class counts and the sky depth read from studio.world)."""
    w = world()
    base = {"depth": {"far": float(w.FAR_DEPTH)},
            "seg": {"num_classes": len(w.SEG_CLASSES)},
            "class": {"num_classes": len(w.CLASS_NAMES)}}[kind]
    cfg = NETS[kind][0].from_dict({**base, "resolution": int(size), **overrides})
    return cfg.to_dict()


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


# ---------------------------------------------------------------------------------------------
# files


def _state_dict_f32(net: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu()
            for k, v in net.state_dict().items()}


def save_net(net: nn.Module, path: Union[str, Path], kind: str, info: Optional[dict] = None) -> None:
    """Write `path` (.safetensors, config in its metadata) and the same name with .json (config + info)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = net.cfg.to_dict()
    meta = {"format": FILE_FORMAT, "kind": kind, "config": json.dumps(cfg)}
    save_file(_state_dict_f32(net), str(path), metadata=meta)
    path.with_suffix(".json").write_text(json.dumps({"kind": kind, "config": cfg, **(info or {})}, indent=2))


def net_from_state_dict(kind: str, config: dict, state_dict: Dict[str, torch.Tensor], what: str) -> nn.Module:
    from studio.checkpoints import CheckpointError, load_into

    try:
        net = build(kind, config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: bad {kind} config ({e})") from e
    load_into(net, state_dict, what)  # asserts every key and shape
    return net.eval()


def load_net(path: Union[str, Path], kind: Optional[str] = None, config: Optional[dict] = None) -> nn.Module:
    """A net from a .safetensors file; its kind and config come from the file's metadata unless given."""
    from safetensors import safe_open

    from studio.checkpoints import CheckpointError, read_safetensors

    path = Path(path)
    if config is None or kind is None:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FILE_FORMAT and config is None:
            raise CheckpointError(f"{path}: no domain-net config in its metadata; pass config=")
        kind = kind or meta.get("kind")
        config = config if config is not None else json.loads(meta["config"])
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown domain net kind {kind!r}")
    return net_from_state_dict(kind, config, read_safetensors(path), path.name)


def load_domain_nets(folder: Union[str, Path], kinds: Sequence[str] = KINDS, required: bool = False,
                     device="cpu") -> Dict[str, nn.Module]:
    """The domain nets found in `folder`: a bundle (configs under config.json["domain"]) or a folder
    of files written by save_net. Missing nets are left out, or raise with required=True."""
    from studio.checkpoints import CheckpointError, read_bundle_config

    folder = Path(folder)
    bundle_cfg = {}
    if (folder / "config.json").exists():
        bundle_cfg = read_bundle_config(folder).get("domain") or {}
    nets = {}
    for kind in kinds:
        path = folder / f"{kind}.safetensors"
        if not path.exists():
            if required:
                raise CheckpointError(f"{folder}: no {kind}.safetensors (train it: python -m lab.domain train "
                                      f"--net {kind} --out {folder})")
            continue
        nets[kind] = load_net(path, kind, bundle_cfg.get(kind)).to(device)
    return nets


def bundle_parts(nets: Dict[str, nn.Module]) -> Tuple[dict, Dict[str, Dict[str, torch.Tensor]]]:
    """(extra_config, extra_tensors) for studio.checkpoints.save_bundle:
    save_bundle(folder, vae, var, names, extra_config=cfg, extra_tensors=tensors)."""
    cfg = {"domain": {kind: net.cfg.to_dict() for kind, net in nets.items()}}
    return cfg, {kind: _state_dict_f32(net) for kind, net in nets.items()}


# ---------------------------------------------------------------------------------------------
# inference


def _batch(img, net: nn.Module) -> Tuple[torch.Tensor, bool]:
    """Images (see studio.images.to_tensor_batch) -> ((N,3,H,W) in [-1,1] on the net's device, single)."""
    x, single = im.to_tensor_batch(img)
    return x.to(_device(net)), single


def _at_net_resolution(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    R = net.cfg.resolution
    if x.shape[-2:] == (R, R):
        return x
    return F.interpolate(x, size=(R, R), mode="bilinear", antialias=True, align_corners=False)


def _back(y: torch.Tensor, hw) -> torch.Tensor:
    return y if y.shape[-2:] == tuple(hw) else F.interpolate(y, size=tuple(hw), mode="bilinear", align_corners=False)


@torch.no_grad()
def estimate_depth(net: DepthNet, img, units: str = "metres", batch_size: int = 32) -> np.ndarray:
    """Depth of an image: (H,W) float32 (or (N,H,W) for a batch) at the input's size.
    units: "metres" (the world's units, sky ~ FAR_DEPTH) or "normalised" (log-depth in [0, 1], the
    map the depth control and the metrics use). Images are resized to the net's resolution and the
    prediction back to the input's size."""
    if units not in ("metres", "normalised"):
        raise ValueError(f"units must be 'metres' or 'normalised', not {units!r}")
    x, single = _batch(img, net)
    out = []
    for xb in x.split(batch_size):
        t = _back(net(_at_net_resolution(net, xb)), xb.shape[-2:]).clamp(0, 1)
        out.append((net.to_metres(t) if units == "metres" else t)[:, 0].float().cpu())
    y = torch.cat(out).numpy().astype(np.float32)
    return y[0] if single else y


@torch.no_grad()
def segment(net: SegNet, img, batch_size: int = 32, return_probs: bool = False):
    """Semantic labels (H,W) int64 (or (N,H,W)) at the input's size; with return_probs also the
    (…, C, H, W) float32 softmax."""
    x, single = _batch(img, net)
    labels, probs = [], []
    for xb in x.split(batch_size):
        logits = _back(net(_at_net_resolution(net, xb)), xb.shape[-2:]).float()
        labels.append(logits.argmax(1).cpu())
        if return_probs:
            probs.append(logits.softmax(1).cpu())
    y = torch.cat(labels).numpy()
    if return_probs:
        p = torch.cat(probs).numpy()
        return (y[0], p[0]) if single else (y, p)
    return y[0] if single else y


@torch.no_grad()
def classify(net: ClassNet, img, batch_size: int = 64, return_probs: bool = False):
    """Class id (int for one image, (N,) int64 for a batch); with return_probs also the softmax."""
    x, single = _batch(img, net)
    logits = torch.cat([net(_at_net_resolution(net, xb)).float().cpu() for xb in x.split(batch_size)])
    ids = logits.argmax(1).numpy()
    if return_probs:
        p = logits.softmax(1).numpy()
        return (int(ids[0]), p[0]) if single else (ids, p)
    return int(ids[0]) if single else ids


@torch.no_grad()
def class_features(net: ClassNet, img, batch_size: int = 64) -> np.ndarray:
    """(N, D) float64 penultimate features (for the domain Frechet distance)."""
    x, _ = _batch(img, net)
    return torch.cat([net.features(_at_net_resolution(net, xb)).double().cpu() for xb in x.split(batch_size)]).numpy()


def normalise_depth(depth_m, near: float = 1.0, far: Optional[float] = None) -> np.ndarray:
    """Metres -> normalised log-depth in [0, 1] (the DepthNet's output space; defaults match DepthConfig
    with the world's sky depth)."""
    far = float(world().FAR_DEPTH) if far is None else far
    d = np.clip(np.asarray(depth_m, np.float64), near, far)
    return (np.log(d / near) / math.log(far / near)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# CLI
