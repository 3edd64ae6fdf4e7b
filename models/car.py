"""CAR: a ControlNet-like branch that steers a frozen VAR with a condition picture (Yao et al. 2024,
"CAR: Controllable Autoregressive Modeling for Visual Generation"), in the released format.

The released adapters (`car_<type>_d16.pth`: canny, hed, depth, normal, sketch) hold only the
branch's own weights; the VAR stays the official one. Per scale si (pn x pn tokens):

    feat_si  = stem(map resized to 16pn x 16pn)                       # (B, C, pn, pn), stride 16
    c        = car_var_conv(VAR input of si as a pn x pn map) + feat_si  # input WITHOUT lvl/pos
    c        = flatten(c) + lvl_embed + pos_1LC (this scale's rows)     # (B, pn*pn, C)
    c_0..c_{D/2-1} = the D/2 car_blocks in turn (AdaLN, same class condition, own KV cache)
    before VAR block D/2 + j:  x = car_skip_linear[j](LN_fp32(cat[x, c_{D/2-1-j}]))   # replaces x

so the deepest branch output feeds the middle of the VAR (U-Net order). The same control goes to
the conditional and the unconditional rows of guidance (guidance is on the class only). Nothing
here draws random numbers: sampling is VAR's.

    car = CAR(CARConfig.for_var(var.cfg, "canny"))          # load a released file with studio.checkpoints
    hook = CARHook(car, var, maps, batch_size=B)             # maps: per scale (B, 3, 16pn, 16pn) in [-1, 1]
    var.sample(quantizer, labels, block_hook=hook)

The hook plugs into VAR's `block_hook` (models/var.py): `begin` runs the branch on each scale's input,
`__call__` after block b fuses into the input of block b + 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .var import AdaLNBlock, KVCache, VARConfig

CAR_TYPES = ("canny", "hed", "depth", "normal", "sketch")  # the released adapters


@dataclass
class CARConfig:
    control_type: str = "canny"
    embed_dim: int = 1024  # width C of the VAR it steers
    num_heads: int = 16
    var_depth: int = 16  # depth of that VAR; the branch has var_depth // 2 blocks
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    in_channels: int = 3  # RGB condition pictures
    stem_widths: Sequence[int] = (64, 128, 256, 512, 1024)  # every width after the first halves the size
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    def __post_init__(self):
        self.stem_widths = tuple(int(w) for w in self.stem_widths)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.var_depth < 2 or self.var_depth % 2:
            raise ValueError(f"CAR needs a VAR of even depth >= 2 (it fuses into the second half), got {self.var_depth}")

    @property
    def num_blocks(self) -> int:
        return self.var_depth // 2

    @property
    def stride(self) -> int:
        """Pixels per token: the map of a pn x pn scale is (stride * pn) px square."""
        return 2 ** (len(self.stem_widths) - 1)

    @classmethod
    def for_var(cls, var_cfg: VARConfig, control_type: str, **kw) -> "CARConfig":
        return cls(control_type=control_type, embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
                   var_depth=var_cfg.depth, mlp_ratio=var_cfg.mlp_ratio, norm_eps=var_cfg.norm_eps,
                   shared_aln=var_cfg.shared_aln, attn_l2_norm=var_cfg.attn_l2_norm,
                   patch_nums=var_cfg.patch_nums, **kw)

    def block_config(self) -> VARConfig:
        return VARConfig(depth=self.var_depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                         mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps, shared_aln=self.shared_aln,
                         attn_l2_norm=self.attn_l2_norm, patch_nums=self.patch_nums)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ControlConditionEmbedding(nn.Module):
    """Condition picture (B, 3, 16pn, 16pn) -> (B, C, pn, pn): conv_in + SiLU, then per width step
    [conv w->w, SiLU, stride-2 conv w->w', SiLU], then conv_out to C (no activation)."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, map_B3HW):
        h = F.silu(self.conv_in(map_B3HW))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (B, C, H/16, W/16)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (the released skip norms)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CAR(nn.Module):
    """The branch alone; attribute names are the released keys (car_control_convs, car_var_conv,
    car_blocks.i, car_skip_norm.j, car_skip_linear.j)."""

    def __init__(self, cfg: CARConfig):
        super().__init__()
        self.cfg = cfg
        C, n = cfg.embed_dim, cfg.num_blocks
        self.car_control_convs = ControlConditionEmbedding(cfg.in_channels, cfg.stem_widths, C)
        self.car_var_conv = nn.Conv2d(C, C, 3, padding=1)
        block_cfg = cfg.block_config()
        self.car_blocks = nn.ModuleList([AdaLNBlock(block_cfg) for _ in range(n)])
        self.car_skip_norm = nn.ModuleList([FP32LayerNorm(2 * C, eps=1e-6) for _ in range(n)])
        self.car_skip_linear = nn.ModuleList([nn.Linear(2 * C, C) for _ in range(n)])

    @property
    def dtype(self):
        return self.car_var_conv.weight.dtype

    def encode_maps(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per scale (B, 3, 16pn, 16pn) maps in [-1, 1] -> per scale stem features (B, C, pn, pn)."""
        feats = []
        for si, (m, pn) in enumerate(zip(maps, self.cfg.patch_nums)):
            f = self.car_control_convs(m.to(self.dtype))
            if tuple(f.shape[-2:]) != (pn, pn):
                raise ValueError(f"scale {si}: the control map is {tuple(m.shape[-2:])} px; a {pn}x{pn} scale needs "
                                 f"{self.cfg.stride * pn} px square")
            feats.append(f)
        return feats

    def branch_input(self, x_in_BlC, feat_BCpp, lvl_pos_BlC):
        """One scale's branch input (B, pn*pn, C) from VAR's input x_in (without lvl/pos) and the stem feature."""
        B, l, C = x_in_BlC.shape
        pn = feat_BCpp.shape[-1]
        var_x = self.car_var_conv(x_in_BlC.transpose(1, 2).reshape(B, C, pn, pn))
        return (var_x + feat_BCpp).view(B, C, l).transpose(1, 2) + lvl_pos_BlC

    def fuse(self, j: int, x_BLC, c_BLC):
        """The input of VAR block depth/2 + j: it replaces x (no residual)."""
        return self.car_skip_linear[j](self.car_skip_norm[j](torch.cat((x_BLC, c_BLC), dim=-1)))


class CARHook:
    """VAR block_hook that runs one CAR branch during a sampling run (or a teacher-forced pass).

    maps: per scale (1 or B, 3, 16pn, 16pn) in [-1, 1]. strength (1: the official fusion; 0: none)
    blends the fused input with the unfused one; active[si] False skips the fusion at scale si (the
    branch still runs so that its KV cache stays complete). Both are our extension; the defaults
    are the official computation exactly."""

    def __init__(self, car: CAR, var, maps: Sequence[torch.Tensor], batch_size: int, strength: float = 1.0,
                 active: Optional[Sequence[bool]] = None):
        cfg = car.cfg
        if (cfg.embed_dim, cfg.var_depth, cfg.patch_nums) != (var.cfg.embed_dim, var.cfg.depth, var.cfg.patch_nums):
            raise ValueError(f"the {cfg.control_type} CAR is for a VAR of depth {cfg.var_depth}, width {cfg.embed_dim}; "
                             f"this VAR has depth {var.cfg.depth}, width {var.cfg.embed_dim}")
        if len(maps) != len(cfg.patch_nums):
            raise ValueError(f"need one control map per scale ({len(cfg.patch_nums)}), got {len(maps)}")
        self.car, self.var, self.B = car, var, int(batch_size)
        self.half = cfg.var_depth // 2  # VAR blocks >= half are fused
        maps = [m.expand(self.B, -1, -1, -1) if m.shape[0] == 1 else m for m in maps]
        if any(m.shape[0] != self.B for m in maps):
            raise ValueError(f"the {cfg.control_type} control has {maps[0].shape[0]} maps for {self.B} images; "
                             "give one map or one per image")
        self.feats = car.encode_maps(maps)  # per scale (B, C, pn, pn)
        self.lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC  # (1, L, C)
        self.starts = {bg: si for si, (bg, _) in enumerate(var.begin_ends)}
        self.strength = float(strength)
        self.active = list(active) if active is not None else [True] * len(cfg.patch_nums)
        self.caches: List[KVCache] = []
        self.outputs: List[torch.Tensor] = []  # the branch's block outputs for the current positions
        self.scales: List[int] = []  # the scales those positions cover

    def _scales(self, start: int, L: int) -> List[int]:
        si = self.starts.get(start)
        if si is None:
            raise ValueError(f"position {start} is not the start of a scale")
        out, pos = [], start
        while pos < start + L:
            out.append(si)
            pos, si = self.var.begin_ends[si][1], si + 1
        if pos != start + L:
            raise ValueError(f"positions {start}..{start + L - 1} do not cover whole scales")
        return out

    def begin(self, x_in_BLC, start: int, cond_BD) -> None:
        """Run the branch on positions [start, start + L): with start 0 the caches start afresh
        (a new run, or the sampler without KV cache, which passes the whole prefix every scale)."""
        rows = x_in_BLC.shape[0]
        if rows not in (self.B, 2 * self.B):
            raise ValueError(f"CAR hook built for batch {self.B} got {rows} rows")
        self.scales = self._scales(start, x_in_BLC.shape[1])
        if start == 0:
            self.caches = [KVCache() for _ in self.car.car_blocks]
        for c in self.caches:  # the sampler dropped the guidance half
            if c.k is not None and c.k.shape[0] != rows:
                c.keep_first(rows)
        parts = []
        for si in self.scales:
            bg, ed = self.var.begin_ends[si]
            feat = self.feats[si] if rows == self.B else self.feats[si].repeat(2, 1, 1, 1)
            parts.append(self.car.branch_input(x_in_BLC[:, bg - start:ed - start], feat, self.lvl_pos[:, bg:ed]))
        c = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        L = c.shape[1]
        attn_bias = None if len(self.scales) == 1 else self.var.attn_bias_for_masking[:, :, start:start + L, :start + L]
        shared = self.var.shared_ada_lin(cond_BD)
        self.outputs = []
        for blk, cache in zip(self.car.car_blocks, self.caches):
            c = blk(c, blk.modulation(shared), attn_bias, cache if attn_bias is None else None)
            self.outputs.append(c)

    def __call__(self, block_index: int, x_BLC, start: int):
        j = block_index + 1 - self.half  # this output is the input of VAR block half + j
        if not 0 <= j < self.half or self.strength == 0.0 or not any(self.active[si] for si in self.scales):
            return x_BLC
        fused = self.car.fuse(j, x_BLC, self.outputs[self.half - 1 - j])
        if self.strength == 1.0 and all(self.active[si] for si in self.scales):
            return fused
        w = torch.cat([x_BLC.new_full((1, e - b, 1), self.strength if self.active[si] else 0.0)
                       for si in self.scales for b, e in [self.var.begin_ends[si]]], dim=1)
        return torch.lerp(x_BLC, fused, w)
