"""The fast live preview: a small latent-to-colour map, fitted on the model's own images.

A full decode of every scale's f_hat costs a decoder pass per scale; the fast preview maps each
latent vector to a colour by a tiny MLP instead and upsamples. The map is fitted to the decoder's
output, pooled to the latent grid, on f_hat *as the model makes it*:
the f_hat after every scale of a few of the model's own samples (coarse prefixes included: they
are what the preview shows first). A map fitted on random colour patches, as before, gave the
early scales of a desert-dusk image a green cast while the image ended brown and pink.

    fmap = fit_fast_map(pipe)                   # FastMap: a per-pixel MLP, C -> 32 -> 3
    rgb = fmap(f_hat, size=128)                 # (B, 3, size, size) in [-1, 1]
    err = colour_error_per_scale(pipe, fmap)    # mean |fast - decode| per scale, 0..255
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


class FastMap(torch.nn.Module):
    """Per-latent-vector colour: a 1x1-conv MLP (C -> hidden -> 3, SiLU), then bilinear upsampling."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(channels, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 3))

    @torch.no_grad()
    def forward(self, f_hat_BChw: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        p = next(self.parameters())
        rgb = self.net(f_hat_BChw.to(p.device, p.dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).float()
        if size is not None and rgb.shape[-1] != size:
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
        return rgb.clamp(-1, 1)


@torch.no_grad()
def sample_prefixes(pipe, num_images: int = 4, seed: int = 0, class_labels: Optional[Sequence[int]] = None):
    """f_hat after every scale of `num_images` samples of the model: a list, one (N, C, h, w) per scale."""
    g = torch.Generator(device=pipe.device).manual_seed(seed)
    if class_labels is None:
        C = pipe.num_classes
        class_labels = torch.randperm(C, generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
        class_labels = [class_labels[i % len(class_labels)] for i in range(num_images)]
    f_hats: List[torch.Tensor] = []
    pipe(class_labels=list(class_labels), generator=g, output_type="pt",
         callback_on_scale_end=lambda ev: f_hats.append(ev.f_hat.detach().float().clone()))
    return f_hats


@torch.no_grad()
def decoded_on_grid(pipe, f_hat: torch.Tensor) -> torch.Tensor:
    """The decode of f_hat, area-pooled to the latent grid: what the fast map should reproduce."""
    return F.adaptive_avg_pool2d(pipe.decode_fhat(f_hat).float(), f_hat.shape[-2:])


def fit_fast_map(pipe, num_images: int = 8, seed: int = 0, f_hats: Optional[List[torch.Tensor]] = None,
                 hidden: int = 32, steps: int = 400, lr: float = 1e-2) -> FastMap:
    """Fit the map (L1, Adam, full batch, deterministic) to the decoder's colours over every scale's f_hat
    of `num_images` of the model's own samples. About 3 s on a laptop CPU for the embedded model."""
    f_hats = sample_prefixes(pipe, num_images, seed) if f_hats is None else f_hats
    def vectors(t):  # (N, C, h, w) -> (N*h*w, C)
        return t.float().cpu().permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    X = torch.cat([vectors(f) for f in f_hats])
    with torch.no_grad():
        Y = torch.cat([vectors(decoded_on_grid(pipe, f)) for f in f_hats])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fmap = FastMap(X.shape[1], hidden)
    opt = torch.optim.Adam(fmap.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (fmap.net(X) - Y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return fmap.eval().requires_grad_(False).to(pipe.device)


@torch.no_grad()
def colour_error_per_scale(pipe, fmap: FastMap, num_images: int = 4, seed: int = 1,
                           f_hats: Optional[List[torch.Tensor]] = None) -> List[float]:
    """Mean absolute colour error (0..255) of the fast preview against the decode of the same f_hat,
    both on the latent grid, per scale, on samples other than the fit's (seed)."""
    f_hats = sample_prefixes(pipe, num_images, seed) if f_hats is None else f_hats
    return [float((fmap(f) - decoded_on_grid(pipe, f)).abs().mean() * 127.5) for f in f_hats]


# -- in a bundle: preview.safetensors beside config.json, its settings under config.json["preview"] ----------
PREVIEW_FILE = "preview.safetensors"


def bundle_parts(fmap: FastMap, about: str = "") -> tuple:
    """(extra_config, extra_tensors) for studio.checkpoints.save_bundle."""
    cfg = {"preview": {"channels": fmap.net[0].in_features, "hidden": fmap.net[0].out_features, "about": about}}
    return cfg, {PREVIEW_FILE[: -len(".safetensors")]: {k: v.float() for k, v in fmap.state_dict().items()}}


def load_from_bundle(folder, config: dict) -> Optional[FastMap]:
    """The bundle's fitted map, or None when it has none."""
    from pathlib import Path

    from studio.checkpoints import load_into, read_safetensors

    spec = config.get("preview")
    path = Path(folder) / PREVIEW_FILE
    if not spec or not path.exists():
        return None
    fmap = FastMap(int(spec["channels"]), int(spec["hidden"]))
    load_into(fmap, {k: v.float() for k, v in read_safetensors(path).items()}, f"{Path(folder).name}/{PREVIEW_FILE}")
    return fmap.eval().requires_grad_(False)
