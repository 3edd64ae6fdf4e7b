"""The BSQ VAE of Infinity: a conv autoencoder whose latent is quantised into a pyramid of bit maps.

Encoder/decoder follow the FLUX/LDM layout (GroupNorm + swish, no attention): conv_in, per level
`num_res_blocks` ResnetBlocks and a stride-2 Downsample (zero pad right/bottom) on every level but
the last, two mid blocks, GroupNorm, swish, conv_out to `d` channels. The decoder mirrors it with
one more block per level and nearest-x2 + conv Upsamples. Key names match the released
`infinity_vae_d32reg.pth` / `infinity_vae_d56_f8_14_patchify.pth` (`{"vae": state_dict}`) in the
plain layout (`encoder.conv_in.weight`); the loader also takes the official wrapper layout
(`encoder.conv_in.conv.weight`, `...norm1.norm.weight`), see studio/infinity.py.

Bitwise spherical quantisation (BSQ), multi-scale: the latent `h` (B, d, H, W) is quantised scale
by scale: r = area-resize(residual) to (h, w); q = l2norm over d; bit = q > 0; the code is
sign(q) / sqrt(d) (a corner of the unit hypercube on the sphere); it is upsampled trilinearly to
(H, W) and subtracted from the residual. Decoding sums the upsampled codes of every scale.

Shapes: images (B, 3, H, W) in [-1, 1]; latents (B, d, H/p, W/p); bits per scale (B, h, w, d)
int64 0/1 (bit k = latent channel k).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BSQVAEConfig:
    codebook_dim: int = 32  # d: bits per latent position
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    def __post_init__(self):
        self.ch_mult = tuple(int(c) for c in self.ch_mult)

    @property
    def patch_size(self) -> int:  # pixels per latent position
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


def _norm(c: int) -> nn.GroupNorm:
    if c % 32 == 0:
        return nn.GroupNorm(32, c, eps=1e-6, affine=True)
    if c % 24 == 0:
        return nn.GroupNorm(24, c, eps=1e-6, affine=True)
    raise ValueError(f"a BSQ VAE width must be a multiple of 32 or 24, got {c}")


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n):
                level.block.append(ResnetBlock(cin, ch * m))
                cin = ch * m
            if i < len(mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.block_2 = ResnetBlock(cin, cin), ResnetBlock(cin, cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, cfg.codebook_dim, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.block_2 = ResnetBlock(cin, cin), ResnetBlock(cin, cin)
        ups = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n + 1):
                level.block.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
            if i >= 1:
                level.upsample = Upsample(cin)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)  # up[i] is level i; run from the last level down to 0
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class _BitMask(nn.Module):
    """Holds the released `quantizer.lfq.mask` buffer (2^(d-1) ... 1): the weights of the bits of an
    index. Bit labels never need it; it is kept so the released key layout loads strictly."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1))


class _Quantizer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lfq = _BitMask(d)


# ---------------------------------------------------------------------------------------------
# bits <-> codes (pure functions: the transformer's sampler uses them without the VAE's weights)


def bits_to_codes(bits_Bhwd: torch.Tensor) -> torch.Tensor:
    """(B, h, w, d) 0/1 -> (B, d, 1, h, w) float32 codes on the unit sphere: l2norm((2b-1)/sqrt(d))."""
    d = bits_Bhwd.shape[-1]
    s = 1 / math.sqrt(d)
    codes = bits_Bhwd.float() * s * 2 - s
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2).unsqueeze(2)


def upsample_codes(codes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, d, 1, h, w) -> (B, d, 1, H, W), trilinear (align_corners False), as the official sum."""
    return F.interpolate(codes, size=(1, *size), mode="trilinear")


def sum_codes(bits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The latent of a (possibly partial) bit pyramid: (B, d, 1, H, W) at the last given scale's size."""
    size = tuple(bits[-1].shape[1:3])
    out = 0
    for i, b in enumerate(bits):
        c = bits_to_codes(b)
        out = out + (c if i == len(bits) - 1 and tuple(c.shape[-2:]) == size else upsample_codes(c, size))
    return out


class BSQVAE(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = _Quantizer(cfg.codebook_dim)

    @torch.no_grad()
    def encode_bits(self, x: torch.Tensor, scales: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> bits per scale (B, h, w, d) int64, for a schedule whose last
        scale is the latent size (H/p, W/p)."""
        h = self.encoder(x.float()).float().unsqueeze(2)  # (B, d, 1, H', W')
        B, d, _, H, W = h.shape
        if tuple(scales[-1]) != (H, W):
            raise ValueError(f"the last scale {tuple(scales[-1])} must be the latent size {(H, W)}")
        residual, out = h, []
        for (sh, sw) in scales:
            r = residual if (sh, sw) == (H, W) else F.interpolate(residual, size=(1, sh, sw), mode="area")
            q = F.normalize(r.permute(0, 2, 3, 4, 1), dim=-1)  # (B, 1, h, w, d)
            zhat = torch.where(q > 0, 1.0, -1.0).to(q.dtype) * (1.0 / d ** 0.5)
            quantized = q + (zhat - q)  # the official straight-through form, kept for its rounding
            out.append((quantized > 0).long()[:, 0])
            quantized = quantized.permute(0, 4, 1, 2, 3)
            if (sh, sw) != (H, W):
                quantized = F.interpolate(quantized, size=(1, H, W), mode="trilinear")
            residual = residual - quantized
        return out

    @torch.no_grad()
    def decode_latent(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """(B, d, 1, H', W') or (B, d, H', W') -> images (B, 3, H, W) clamped to [-1, 1]."""
        if summed_codes.ndim == 5:
            summed_codes = summed_codes.squeeze(2)
        dt = next(self.decoder.parameters()).dtype
        return self.decoder(summed_codes.to(dt)).float().clamp(-1, 1)

    @torch.no_grad()
    def decode_bits(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode_latent(sum_codes(bits))
