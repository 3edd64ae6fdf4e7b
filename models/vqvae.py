"""Multi-scale residual VQVAE (the VAR tokenizer).

Encoder/decoder follow the taming/LDM VQ-f16 layout with GroupNorm + SiLU; the quantiser turns
the latent `f` into a pyramid of token maps (1x1 ... pn x pn) by repeatedly quantising the area-
downsampled residual, upsampling the chosen codes bicubically and passing them through a small
residual conv ("Phi") before accumulating them into `f_hat`. Key names and shapes match the
official `vae_ch160v4096z32.pth`; every size is a config field so small models share this code.

Shapes: images (B, 3, H, W) in [-1, 1]; latents (B, Cvae, h, w) with h = H / 2**(len(ch_mult)-1);
token maps per scale (B, pn*pn) int64, row-major.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True  # self-attention at the lowest resolution of encoder and decoder
    using_mid_sa: bool = True
    norm_groups: int = 32
    share_quant_resi: int = 4  # number of Phi convs shared across scales
    quant_resi: float = 0.5  # Phi(x) = (1 - r) x + r conv(x)
    beta: float = 0.25  # commitment weight (training only)
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    # our own addition (0 in every official tokenizer): the finest `decoder_fixed_norm` decoder levels and
    # its norm_out normalise with fixed, learned per-channel statistics (FixedNorm) instead of each image's
    # own. Per-image GroupNorm there lets the decoder carry global information in one channel that spikes
    # at a fixed place, which shows as a saturated blob (StyleGAN's "droplet"; StyleGAN2's remedy is the
    # same: no per-image statistics in the synthesis path).
    decoder_fixed_norm: int = 0

    def __post_init__(self):
        self.ch_mult = tuple(int(c) for c in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ValueError(f"every stage width ch*mult must be divisible by norm_groups={self.norm_groups}")
        if not 0 <= int(self.decoder_fixed_norm) <= len(self.ch_mult):
            raise ValueError(f"decoder_fixed_norm must be 0..{len(self.ch_mult)} (decoder levels), "
                             f"got {self.decoder_fixed_norm}")
        self.decoder_fixed_norm = int(self.decoder_fixed_norm)
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["patch_nums"] = list(self.ch_mult), list(self.patch_nums)
        return d


class FixedNorm(nn.Module):
    """A per-channel affine map `x * weight + bias` in the place of a GroupNorm: the same parameter names
    and shapes, but no statistics of the image itself (see VQVAEConfig.decoder_fixed_norm)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.addcmul(self.bias.view(1, -1, 1, 1).to(x.dtype), x, self.weight.view(1, -1, 1, 1).to(x.dtype))


def _norm(cfg: VQVAEConfig, c: int, fixed: bool = False) -> nn.Module:
    return FixedNorm(c) if fixed else nn.GroupNorm(cfg.norm_groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQVAEConfig, c_in: int, c_out: int, fixed_norm: bool = False):
        super().__init__()
        self.norm1 = _norm(cfg, c_in, fixed_norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = _norm(cfg, c_out, fixed_norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a feature map."""

    def __init__(self, cfg: VQVAEConfig, c: int):
        super().__init__()
        self.norm = _norm(cfg, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        # explicit bmm/softmax (not SDPA): keeps fp32 rounding close to the reference encoder,
        # which matters for argmin ties in the quantiser; the map is at most 32x32 here.
        w = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)  # (B, HWq, HWk)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block.{i}`, optional `attn.{i}`, optional down/upsample."""

    def __init__(self, blocks, attns, resample_name: Optional[str], resample: Optional[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample_name is not None:
            self.add_module(resample_name, resample)
        self._resample_name = resample_name

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class _Mid(nn.Module):
    def __init__(self, cfg: VQVAEConfig, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, c, c)
        self.attn_1 = AttnBlock(cfg, c) if cfg.using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(cfg, c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        in_mult = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        levels = []
        for i in range(n):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c_in, c_out))
                c_in = c_out
                if i == n - 1 and cfg.using_sa:
                    attns.append(AttnBlock(cfg, c_out))
            last = i == n - 1
            levels.append(_Level(blocks, attns, None if last else "downsample", None if last else Downsample2x(c_out)))
        self.down = nn.ModuleList(levels)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(cfg, c)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(cfg, c_in)
        levels = [None] * n  # indexed by level, run from n-1 down to 0
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, c_in, c_out, fixed_norm=i < cfg.decoder_fixed_norm))
                c_in = c_out
                if i == n - 1 and cfg.using_sa:
                    attns.append(AttnBlock(cfg, c_out))
            levels[i] = _Level(blocks, attns, "upsample" if i else None, Upsample2x(c_out) if i else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, c_in, fixed=cfg.decoder_fixed_norm > 0)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual 3x3 conv applied to each scale's upsampled codes: (1-r) x + r conv(x)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


def phi_index_per_scale(num_phi: int, num_scales: int) -> List[int]:
    """Which of the `num_phi` shared Phi convs serves each scale (official partial sharing).

    Scale si sits at si/(SN-1) in [0, 1] and takes the Phi whose tick is nearest. The ticks and
    the argmin are evaluated in float64 numpy exactly as the reference does, because two scales
    (si=2 and si=7 for SN=10) are exact ties in real arithmetic that rounding decides.
    """
    if num_scales == 1:
        return [0]
    k = num_phi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1))).item()) for si in range(num_scales)]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = _PhiBank(cfg)
        # usage statistics kept for checkpoint compatibility (and codebook health while training)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    # -- helpers ------------------------------------------------------------------------------
    def _phi(self, si: int, h):
        return self.quant_resi(si, h)

    def _to_full(self, si: int, h_BChw, size: int):
        """Upsample one scale's codes to the latent size (bicubic, not at the last scale), apply Phi."""
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(size, size), mode="bicubic")
        return self._phi(si, h_BChw)

    def lookup(self, idx_Bl, pn: int):
        """Token ids (B, pn*pn) -> codes (B, Cvae, pn, pn)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)

    def nearest(self, z_NC):
        """Index of the nearest codebook entry (Euclidean; first index on ties)."""
        E = self.embedding.weight.float()
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1)
        d.addmm_(z_NC, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    # -- encode -----------------------------------------------------------------------------
    def f_to_tokens(self, f_BChw, return_fhat: bool = False):
        """Latent f -> list of (B, pn*pn) token maps (and the quantised f_hat when asked)."""
        B, C, H, W = f_BChw.shape
        if H != self.patch_nums[-1] or W != self.patch_nums[-1]:
            raise ValueError(f"latent is {H}x{W} but the last scale is {self.patch_nums[-1]}")
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(self.patch_nums)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self._to_full(si, self.lookup(idx, pn), H)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(idx)
        return (out, f_hat) if return_fhat else out

    # -- training ---------------------------------------------------------------------------
    def forward(self, f_BChw):
        """Training pass: (f_hat with straight-through gradient to f, VQ loss, per-scale usage (SN, V)).

        The loss averages over scales beta * |sg(f_hat) - f|^2 (commitment, trains the encoder) +
        |f_hat - sg(f)|^2 (trains codebook and Phi)."""
        B, C, H, W = f_BChw.shape
        f_ng = f_BChw.detach().float()
        f_rest = f_ng.clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(self.patch_nums)
        loss = f_ng.new_zeros(())
        usage = f_ng.new_zeros(SN, self.cfg.vocab_size)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            with torch.no_grad():
                idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            usage[si].index_add_(0, idx, torch.ones_like(idx, dtype=usage.dtype))
            h = self._to_full(si, self.lookup(idx.view(B, pn * pn), pn).float(), H)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.cfg.beta * F.mse_loss(f_hat.detach(), f_BChw.float()) + F.mse_loss(f_hat, f_ng)
        if self.training:
            with torch.no_grad():
                hit = usage / usage.sum(dim=1, keepdim=True).clamp_min(1)
                self.ema_vocab_hit_SV.mul_(0.97).add_(hit, alpha=0.03)
        f_hat_st = (f_hat.detach() - f_ng) + f_BChw.float()
        return f_hat_st, loss / SN, usage

    @torch.no_grad()
    def restart_dead_codes(self, f_BChw, threshold: float = 1e-4) -> int:
        """Re-seed codebook entries that (almost) no scale uses with random latent vectors.

        Keeps the codebook healthy while training: dead codes are moved onto real encoder outputs
        (a slight jitter keeps duplicates apart). Returns how many codes were restarted."""
        dead = self.ema_vocab_hit_SV.sum(0) < threshold
        n = int(dead.sum())
        if n == 0:
            return 0
        C = f_BChw.shape[1]
        pool = f_BChw.detach().float().permute(0, 2, 3, 1).reshape(-1, C)
        pick = pool[torch.randint(0, pool.shape[0], (n,), device=pool.device)]
        pick = pick + 0.01 * pick.std() * torch.randn_like(pick)
        self.embedding.weight.data[dead] = pick.to(self.embedding.weight.dtype)
        self.ema_vocab_hit_SV[:, dead] = 1.0 / self.cfg.vocab_size
        return n

    # -- decode -----------------------------------------------------------------------------
    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor], soft_codes: Optional[Sequence] = None):
        """Token maps (all scales, or a prefix of them) -> accumulated f_hat (B, Cvae, h, h) fp32."""
        size = self.patch_nums[-1]
        f_hat = None
        for si, idx in enumerate(tokens):
            pn = self.patch_nums[si]
            h = self.lookup(idx, pn).float() if soft_codes is None or soft_codes[si] is None else soft_codes[si]
            h = self._to_full(si, h, size)
            f_hat = h.float() if f_hat is None else f_hat.add_(h)
        return f_hat

    def next_input(self, si: int, f_hat, h_BChw):
        """Add scale si's codes to f_hat; return (f_hat, the next scale's input map).

        The next input is f_hat area-downsampled to scale si+1 (f_hat itself after the last)."""
        SN = len(self.patch_nums)
        f_hat.add_(self._to_full(si, h_BChw, self.patch_nums[-1]))
        if si == SN - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    def tokens_to_var_input(self, tokens: Sequence[torch.Tensor]):
        """Teacher-forcing input for the transformer: (B, L - 1, Cvae) fp32.

        For every scale but the last, f_hat after that scale downsampled to the next scale."""
        B = tokens[0].shape[0]
        size = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.cfg.z_channels, size, size, device=tokens[0].device)
        chunks = []
        for si in range(len(self.patch_nums) - 1):
            f_hat, nxt = self.next_input(si, f_hat, self.lookup(tokens[si], self.patch_nums[si]).float())
            chunks.append(nxt.reshape(B, self.cfg.z_channels, -1).transpose(1, 2))
        return torch.cat(chunks, dim=1)


class _PhiBank(nn.Module):
    """`qresi_ls.{k}`: K Phi convs shared across the scales by `phi_index_per_scale`."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        k = max(1, cfg.share_quant_resi)
        self.qresi_ls = nn.ModuleList([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(k)])
        self.mapping = phi_index_per_scale(k, len(cfg.patch_nums))

    def forward(self, si: int, h):
        phi = self.qresi_ls[self.mapping[si]]
        return phi(h.to(phi.weight.dtype)).float()


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    @property
    def patch_nums(self):
        return self.cfg.patch_nums

    def img_to_f(self, img_B3HW):
        return self.quant_conv(self.encoder(img_B3HW.to(self.quant_conv.weight.dtype))).float()

    @torch.no_grad()
    def img_to_tokens(self, img_B3HW) -> List[torch.Tensor]:
        """Images in [-1, 1] -> token maps per scale."""
        return self.quantize.f_to_tokens(self.img_to_f(img_B3HW))

    def fhat_to_img(self, f_hat):
        x = self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))
        return self.decoder(x).float().clamp_(-1, 1)

    @torch.no_grad()
    def tokens_to_img(self, tokens: Sequence[torch.Tensor]):
        """Token maps (all scales, or a coarse prefix) -> images in [-1, 1]."""
        return self.fhat_to_img(self.quantize.tokens_to_fhat(tokens))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the usage-statistics buffer may have another number of rows (other patch_nums): keep ours
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
