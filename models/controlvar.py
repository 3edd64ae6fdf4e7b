"""ControlVAR: a VAR that predicts a control map and the image together, scale by scale (Li et al.
2024, "ControlVAR: Exploring Controllable Visual Autoregressive Modeling"), in the released format.

The released checkpoints (`dNN.pth`, d12..d30, one joint model for four condition types) are full
fine-tunes of VAR. Each scale holds the control map's tokens, then the image's:

    L = sum 2 pn^2 (1360 for the 256 px scales)        [ctrl pn^2 ; image pn^2] per scale
    scale 0 input = [cond_embed(type), class_emb(label)] + pos_start (1, 2, C) + lvl/pos
    scale si>0    = word_embed(cat[next ctrl map, next image map]) + lvl_embed + pos_1LC

`pos_1LC` is a full 1360-row table, used as stored. The AdaLN condition is the class only; the
condition type enters only as the first token. Attention is plain (scale 1/(sqrt(hd) * 4)) except
at depth 30, where it is VAR's l2-normalised attention. At sampling time (`sample`), the control's
tokens are forced scale by scale (teacher forcing) under a four-way guidance

    rows       [y, c, map]  [0, c, map]  [0, 0, map]  [0, 0, free]      (class, type, map)
    logits   = (1+t1) l0 + (t2-t1) l1 + (t3-t2) l2 - t3 l3,   t_i = g_i * si / (SN-1)

and every branch keeps its own sampled image (and the last its own control). The key names are
the released ones (without DDP's `module.`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .var import (AdaLNBeforeHead, AdaLNBlock, AdaLNTrunk, Generators, KVCache, ScaleEvent, SharedAdaLin, VARConfig,
                  filter_top_k_top_p_, gumbel_soft_codes, sample_tokens)
from .vqvae import MultiScaleQuantizer

# the released condition ids (ControlVAR's datasets/imagenetC.py); 4 is "no condition type", used
# only by the guidance rows
CONTROL_TYPE_IDS = {"segmentation": 0, "canny": 1, "depth": 2, "normal": 3}
NO_TYPE = 4
NUM_TYPE_IDS = 5


@dataclass
class ControlVARConfig(VARConfig):
    num_type_ids: int = NUM_TYPE_IDS

    @classmethod
    def official(cls, depth: int, patch_nums=None, **kw) -> "ControlVARConfig":
        """The released shape rule: VAR's (width 64*depth, 64-wide heads), attention l2-normalised
        only at depth 30 (ControlVAR overrides its cos_attn flag by depth)."""
        kw.setdefault("attn_l2_norm", depth == 30)
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=False,
                   patch_nums=tuple(patch_nums or (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), **kw)

    @property
    def joint_seq_len(self) -> int:
        return 2 * self.seq_len


def joint_levels_and_mask(patch_nums: Sequence[int]):
    """lvl_1L (1, L) and the block-causal mask (1, 1, L, L) of the joint sequence: both halves of a
    scale share its level. (Stored in the checkpoints as buffers; inference uses no mask.)"""
    lvl = torch.cat([torch.full((2 * pn * pn,), i) for i, pn in enumerate(patch_nums)])
    L = lvl.numel()
    d = lvl.view(L, 1)
    mask = torch.where(d >= d.T, 0.0, -torch.inf).reshape(1, 1, L, L)
    return lvl.view(1, L), mask.contiguous()


@dataclass
class ControlSampleResult:
    tokens: List[torch.Tensor]  # per scale (B, pn*pn): the image's tokens (first guidance row)
    control_tokens: List[torch.Tensor]  # per scale (B, pn*pn): the control half of the same rows
    f_hat: torch.Tensor  # (B, Cvae, h, w) the image's f_hat
    control_f_hat: torch.Tensor  # (B, Cvae, h, w) the control's
    stopped_early: bool = False
    soft_codes: List[Optional[torch.Tensor]] = field(default_factory=list)


class ControlVAR(AdaLNTrunk, nn.Module):
    def __init__(self, cfg: ControlVARConfig):
        super().__init__()
        self.cfg = cfg
        C, SN = cfg.embed_dim, len(cfg.patch_nums)
        self.C, self.num_scales, self.patch_nums = C, SN, cfg.patch_nums
        self.num_classes = cfg.num_classes
        self.L = cfg.joint_seq_len
        self.begin_ends: List[Tuple[int, int]] = []  # per scale, in the joint sequence
        cur = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((cur, cur + 2 * pn * pn))
            cur += 2 * pn * pn
        self.pos_start = nn.Parameter(torch.zeros(1, 2, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        lvl_1L, mask = joint_levels_and_mask(cfg.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", mask)
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(SN, C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([AdaLNBlock(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.cond_embed = nn.Embedding(cfg.num_type_ids, C)

    def guidance_per_scale(self, guidance: Sequence[float]) -> List[Tuple[float, float, float]]:
        """(t1, t2, t3) per scale: the official ramp g_i * (si / (SN-1)), in that order of operations."""
        SN = self.num_scales
        return [tuple(float(g) * (si / max(SN - 1, 1)) for g in guidance) for si in range(SN)]

    @torch.no_grad()
    def sample(
        self,
        quantizer: MultiScaleQuantizer,
        label_B: torch.Tensor,
        type_B: torch.Tensor,
        control_tokens: Sequence[torch.Tensor],
        guidance: Sequence[float] = (4.0, 4.0, 4.0),
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        generator: Generators = None,
        callback: Optional[Callable[[ScaleEvent], Optional[bool]]] = None,
        known_tokens: Optional[Sequence[Optional[torch.Tensor]]] = None,
        known_mask: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> ControlSampleResult:
        """Sample images for labels `label_B` (B,) under control maps given as their VQVAE tokens
        (`control_tokens`: per scale (B, pn*pn)) of condition ids `type_B` (B,).

        Follows the official `conditional_infer_cfg` step by step (the same random draws): four
        guidance branches of B rows each, one draw per scale over all 4B rows and both halves, the
        map's tokens forced into the control half of the first three branches. Our additions:
        known_tokens/known_mask force image tokens (True = keep) in every branch (in-painting);
        with more_smooth the map's codes are forced too (the official sampler feeds soft codes
        everywhere there, so its map is lost after tokenisation).

        generator: one for the whole batch (the official order: one draw over all 4B rows), or a
        list with one per image: image b's four guidance rows (b, B+b, 2B+b, 3B+b) then draw from
        generator[b] in the order a batch of that image alone draws them, so image b is the image
        its generator makes alone."""
        B = label_B.shape[0]
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} images: give one, or one per image")
        R = 4 * B
        dev = label_B.device
        if len(control_tokens) != self.num_scales or any(t.shape != (B, pn * pn) for t, pn in
                                                         zip(control_tokens, self.patch_nums)):
            raise ValueError(f"control_tokens must be {self.num_scales} maps of (B={B}, pn*pn)")
        if len(guidance) != 3:
            raise ValueError(f"ControlVAR takes three guidance weights (class, type, map), got {len(guidance)}")
        ts = self.guidance_per_scale(guidance)
        E = quantizer.embedding.weight
        null = torch.full_like(label_B, self.num_classes)
        labels = torch.cat((label_B, null, null, null))
        no_type = torch.full_like(type_B, NO_TYPE)
        types = torch.cat((type_B, type_B, no_type, no_type))
        cond_BD = self.class_emb(labels)
        mods = self.block_modulations(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)
        x = torch.cat((self.cond_embed(types).unsqueeze(1), cond_BD.unsqueeze(1)), dim=1)
        x = x + self.pos_start.expand(R, 2, -1) + lvl_pos[:, :2]
        caches = [KVCache() for _ in self.blocks]
        size = self.patch_nums[-1]
        f_ctrl = torch.zeros(R, quantizer.cfg.z_channels, size, size, device=dev)
        f_img = torch.zeros_like(f_ctrl)
        result = ControlSampleResult([], [], f_img[:B], f_ctrl[:B])
        SN = self.num_scales

        for si, pn in enumerate(self.patch_nums):
            t0 = time.perf_counter()
            l = pn * pn
            ratio = si / max(SN - 1, 1)
            for blk, mod, cache in zip(self.blocks, mods, caches):
                x = blk(x, mod, None, cache)
            lg = self.get_logits(x, cond_BD)  # (4B, 2l, V) fp32
            t1, t2, t3 = ts[si]
            logits = (1 + t1) * lg[:B] + (t2 - t1) * lg[B:2 * B] + (t3 - t2) * lg[2 * B:3 * B] - t3 * lg[3 * B:]
            logits = logits.repeat(4, 1, 1)
            filter_top_k_top_p_(logits, top_k, top_p)
            idx = _per_image(sample_tokens, logits, generator, B)  # (4B, 2l): one draw per row and position
            ctrl = control_tokens[si].to(dev)
            idx[:3 * B, :l] = ctrl.repeat(3, 1)
            keep = None
            if known_tokens is not None and known_tokens[si] is not None:
                keep = known_mask[si].to(dev).view(B, l).repeat(4, 1)
                idx[:, l:] = torch.where(keep, known_tokens[si].to(dev).repeat(4, 1), idx[:, l:])
            soft = None
            if more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h = _per_image(lambda lg, g: gumbel_soft_codes(lg, tau, g), logits.mul(1 + ratio), generator,
                               B) @ E.unsqueeze(0)  # (4B, 2l, Cvae)
                h[:3 * B, :l] = quantizer.embedding(ctrl).repeat(3, 1, 1).to(h.dtype)
                if keep is not None:
                    h[:, l:] = torch.where(keep.unsqueeze(-1), quantizer.embedding(idx[:, l:]).to(h.dtype), h[:, l:])
                soft = h[:B, l:]
            else:
                h = quantizer.embedding(idx)
            h = h.transpose(1, 2)
            Cv = h.shape[1]
            f_ctrl, nxt_c = quantizer.next_input(si, f_ctrl, h[:, :, :l].reshape(R, Cv, pn, pn).float())
            f_img, nxt_i = quantizer.next_input(si, f_img, h[:, :, l:].reshape(R, Cv, pn, pn).float())
            result.tokens.append(idx[:B, l:])
            result.control_tokens.append(idx[:B, :l])
            result.soft_codes.append(None if soft is None else soft.transpose(1, 2).reshape(B, Cv, pn, pn))
            last = si == SN - 1
            if not last:
                bg, ed = self.begin_ends[si + 1]
                nxt = torch.cat((nxt_c.reshape(R, Cv, -1).transpose(1, 2), nxt_i.reshape(R, Cv, -1).transpose(1, 2)),
                                dim=1)
                x = self.word_embed(nxt.to(self.dtype)) + lvl_pos[:, bg:ed]
            result.f_hat, result.control_f_hat = f_img[:B], f_ctrl[:B]
            if callback is not None:
                ev = ScaleEvent(si, SN, pn, idx[:B, l:], f_img[:B], time.perf_counter() - t0)
                if callback(ev) is True and not last:
                    result.stopped_early = True
                    break
        return result


def _per_image(draw, logits_RlV: torch.Tensor, generator: Generators, B: int) -> torch.Tensor:
    """draw(logits, generator) over the 4B guidance rows: at once for one generator, or per image
    for a list (image b's rows b, B+b, 2B+b, 3B+b, in that order, from generator[b]: what a batch of
    that image alone draws), the results put back in the batch's row order."""
    if not isinstance(generator, (list, tuple)):
        return draw(logits_RlV, generator)
    out = None
    for b, g in enumerate(generator):
        rows = torch.arange(b, 4 * B, B, device=logits_RlV.device)
        got = draw(logits_RlV[rows], g)
        if out is None:
            out = got.new_empty((4 * B, *got.shape[1:]))
        out[rows] = got
    return out
