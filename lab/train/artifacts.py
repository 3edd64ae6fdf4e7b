"""What a run reads and writes besides the data: checkpoints (with the RNG state), VQVAE files
(`vae.safetensors` + `vae_config.json`), `metrics.jsonl`, `loss.png` and `samples.png`."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from lab.train.task import TrainError
from models.vqvae import VQVAE, VQVAEConfig

CHECKPOINT = "checkpoint.pt"
VQVAE_FORMAT = "var-studio-vqvae"


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
    `vqvae` training folder or its checkpoint.pt. Raises TrainError for anything else."""
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
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load says little that is readable about a file that is not its own
            raise TrainError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ck, dict) or ck.get("task") != "vqvae":
            raise TrainError(f"{path}: not a vqvae training checkpoint")
        vae = VQVAE(VQVAEConfig(**ck["config"]))
        checkpoints.load_into(vae, ck["model"], str(p))
        return vae
    raise TrainError(f"{path}: expected a bundle folder, a vqvae export (vae.safetensors + vae_config.json) "
                     f"or a vqvae checkpoint")


def vqvae_for(path: str, flag: str) -> VQVAE:
    """`load_vqvae(path)`, its errors prefixed with the flag that named the path."""
    from studio.checkpoints import CheckpointError

    try:
        return load_vqvae(path)
    except (TrainError, CheckpointError) as e:
        raise TrainError(f"{flag} {e}") from e


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

