"""Small domain networks of the embedded default model: depth, segmentation, class recogniser.

They serve the landscape world (studio/world) twice: as its preprocessors (the depth and
segmentation maps that drive the control adapters, estimated from any image) and as judges (control
adherence, class accuracy, a domain Frechet distance from ClassNet's penultimate features).

    depth = DepthNet(DepthConfig())        # image (B,3,H,W) in [-1,1] -> (B,1,H,W) normalised log-depth
    seg = SegNet(SegConfig())              # image -> logits (B, num_classes, H, W)
    cls = ClassNet(ClassConfig())          # image -> logits (B, num_classes); .features(x) -> (B, D)

Depth representation: normalised log-depth t = log(d / near) / log(far / near), so t = 0 at `near`
metres and t = 1 at `far` (the world's sky depth, 20 km). Log-depth rather than inverse depth
because the world spans 2 m to 16 km plus sky: inverse depth squeezes every mountain beyond a few
hundred metres into ~0, log-depth keeps relief at every distance. The prediction is absolute (the
world has one scale: trees, haze and the horizon fix it), so no per-image alignment is needed;
`DepthNet.metric_depth` turns it into metres.

Networks only: tensors in, tensors out; saving and loading live in studio/domainnets.py, training in lab/domain.py. Inputs whose
side is not a multiple of the UNet's stride are padded (reflect) and the output cropped back.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Config:
    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
        return cls(**d)


@dataclass
class DepthConfig(_Config):
    widths: Sequence[int] = (16, 32, 64, 96, 128)  # channels per UNet level (1/2 ... 1/32 resolution)
    convs_per_level: int = 2
    stem_stride: int = 2  # 2: the UNet runs at half resolution, plus one full-resolution refine conv
    resolution: int = 128  # the image side it was trained at; the studio wrappers resize to it
    near: float = 1.0  # metres at t = 0
    far: float = 20000.0  # metres at t = 1 (the world's sky depth)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if not 0 < self.near < self.far:
            raise ValueError(f"need 0 < near < far, got near={self.near}, far={self.far}")


@dataclass
class SegConfig(_Config):
    num_classes: int = 8  # len(studio.world.SEG_CLASSES)
    widths: Sequence[int] = (16, 32, 64, 96, 128)
    convs_per_level: int = 2
    stem_stride: int = 2
    resolution: int = 128

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)


@dataclass
class ClassConfig(_Config):
    num_classes: int = 10  # len(studio.world.CLASS_NAMES)
    widths: Sequence[int] = (32, 48, 64, 96, 128)  # one stride-2 stage each; the last is the feature width
    convs_per_stage: int = 2
    dropout: float = 0.1
    resolution: int = 128

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)


def _stage(c_in: int, c_out: int, n: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*[ConvBNReLU(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)])


class UNet(nn.Module):
    """A compact UNet: stride-2 conv downsampling, a global-context vector added at the bottleneck
    (so every pixel knows the whole picture: time of day, where the horizon is), bilinear
    upsampling with skip concatenation, a 1x1 head.

    stem_stride=2 runs the UNet at half resolution (4x fewer operations) and adds one full-resolution
    `refine` conv over [upsampled features, input image], which puts boundaries back on the pixel."""

    def __init__(self, out_channels: int, widths: Tuple[int, ...], convs_per_level: int, stem_stride: int = 1):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        w, n = widths, convs_per_level
        self.stride = stem_stride * 2 ** (len(w) - 1)
        self.down = nn.ModuleList([_stage(3, w[0], n, stem_stride)] +
                                  [_stage(w[i - 1], w[i], n, 2) for i in range(1, len(w))])
        self.context = nn.Linear(w[-1], w[-1])
        self.up = nn.ModuleList([_stage(w[i] + w[i - 1], w[i - 1], n) for i in range(len(w) - 1, 0, -1)])
        self.refine = ConvBNReLU(w[0] + 3, w[0]) if stem_stride == 2 else None
        self.head = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        H, W = x_B3HW.shape[-2:]
        s = self.stride
        ph, pw = (-H) % s, (-W) % s
        h = x_pad = F.pad(x_B3HW, (0, pw, 0, ph), mode="reflect") if ph or pw else x_B3HW
        skips = []
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        h = h + F.relu(self.context(h.mean((2, 3))))[:, :, None, None]
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = stage(torch.cat([h, skip], 1))
        if self.refine is not None:
            h = F.interpolate(h, size=x_pad.shape[-2:], mode="bilinear", align_corners=False)
            h = self.refine(torch.cat([h, x_pad], 1))
        return self.head(h)[..., :H, :W]


class DepthNet(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> normalised log-depth (B,1,H,W), ~0..1 (see the module docstring)."""

    def __init__(self, cfg: DepthConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(1, cfg.widths, cfg.convs_per_level, cfg.stem_stride)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.unet(x_B3HW)

    def normalise(self, depth_m: torch.Tensor) -> torch.Tensor:
        """Metres -> normalised log-depth t (clamped to [0, 1])."""
        c = self.cfg
        return (torch.log(depth_m.clamp(min=c.near, max=c.far) / c.near) / math.log(c.far / c.near))

    def to_metres(self, t: torch.Tensor) -> torch.Tensor:
        """Normalised log-depth -> metres (the world's units), clamped to [near, far]."""
        c = self.cfg
        return c.near * torch.exp(t.clamp(0.0, 1.0) * math.log(c.far / c.near))

    def metric_depth(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Image -> depth in metres (B,1,H,W); sky comes out near `far`."""
        return self.to_metres(self(x_B3HW))


class SegNet(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, cfg: SegConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.num_classes, cfg.widths, cfg.convs_per_level, cfg.stem_stride)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.unet(x_B3HW)


class ClassNet(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> class logits (B, num_classes).

    `features(x)` is the globally average-pooled last stage, (B, widths[-1]): the penultimate layer
    whose statistics give the domain Frechet distance (like Inception's pool3 for FID, but trained
    on this world only, so its numbers are not comparable to published FID)."""

    def __init__(self, cfg: ClassConfig):
        super().__init__()
        self.cfg = cfg
        w, n = cfg.widths, cfg.convs_per_stage
        self.stages = nn.Sequential(*[_stage(3 if i == 0 else w[i - 1], w[i], n, 2) for i in range(len(w))])
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(w[-1], cfg.num_classes)

    def features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.stages(x_B3HW).mean((2, 3))  # (B, D)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x_B3HW)))


# kind -> (config class, network class); the kinds are also the file names in a bundle
NETS = {"depth": (DepthConfig, DepthNet), "seg": (SegConfig, SegNet), "class": (ClassConfig, ClassNet)}


def build(kind: str, config: dict | None = None) -> nn.Module:
    """A fresh network of `kind` ("depth", "seg", "class") from a config dict (defaults if None)."""
    if kind not in NETS:
        raise ValueError(f"unknown domain net {kind!r}; known: {sorted(NETS)}")
    cfg_cls, net_cls = NETS[kind]
    return net_cls(cfg_cls.from_dict(config or {}))


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
