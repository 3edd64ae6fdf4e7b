"""VAR transformer: next-scale prediction over a multi-scale token pyramid.

A GPT-style decoder whose sequence is the concatenation of all scales (1x1, 2x2, ... pn x pn,
L = sum pn^2 tokens). Attention is block-causal: full inside a scale, causal across scales. Each
block is modulated by the class embedding through AdaLN (one `ada_lin` per block, or one shared
projection plus a per-block `ada_gss` table for the 512 px d36 model). Key names and shapes match
the official `var_dNN.pth` checkpoints.

`VAR.forward` is the teacher-forced full-sequence pass (training, and a check of the sampler);
`VAR.sample` is the scale-by-scale sampler with KV cache, classifier-free guidance, top-k/top-p,
`more_smooth`, per-scale callbacks and teacher forcing of known tokens (editing and control).
Both take an optional `block_hook` through which a control adapter (models/control.py) adds its
residual to the hidden states after each block; without one, the computation is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vqvae import MultiScaleQuantizer

# block_hook(block_index, x_BLC, start) -> x_BLC: called after every block on its output; x holds the
# sequence positions [start, start + L) (whole scales). In the sampler, with guidance, its rows are
# the B conditional rows followed by the B unconditional ones.
# A hook object may also have `begin(x_in_BLC, start, cond_BD)`, called before the first block with
# the same positions' input *without* the level/position embeddings (sos + pos_start at the first
# scale, word_embed of the previous scale's f_hat map after it) and the class embeddings of the rows:
# CAR's branch (models/car.py) reads the input there.
BlockHook = Callable[[int, torch.Tensor, int], torch.Tensor]


def _begin(block_hook: Optional[BlockHook], x_in_BLC, start: int, cond_BD) -> None:
    begin = getattr(block_hook, "begin", None)
    if begin is not None:
        begin(x_in_BLC, start, cond_BD)


@dataclass
class VARConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # width of the VQVAE codes (word_embed input)
    num_classes: int = 1000  # class `num_classes` is the null class used by guidance
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1  # training only; the sampler never drops
    drop_path_rate: float = 0.0  # training only
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def official(cls, depth: int, shared_aln: bool = False, patch_nums=None, **kw) -> "VARConfig":
        """The published shape rule: width 64*depth, one 64-wide head per layer."""
        if patch_nums is None:
            patch_nums = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) if shared_aln else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=shared_aln,
                   patch_nums=tuple(patch_nums), drop_path_rate=0.1 * depth / 24, **kw)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d


# ---------------------------------------------------------------------------------------------
# blocks


class KVCache:
    """Keys/values of all earlier scales for one block: (B, H, L_so_far, hd)."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def keep_first(self, n: int):
        """Drop all but the first n batch rows (the guidance half once it is no longer needed)."""
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]


class SelfAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.attn_l2_norm = cfg.attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1.0
            # learned per-head temperature on l2-normalised q (capped at 100)
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x_BLC, attn_bias=None, cache: Optional[KVCache] = None):
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def drop_path(x, p: float, training: bool):
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class AdaLNBlock(nn.Module):
    """x += gamma1 * attn(ln(x)(1+scale1)+shift1); x += gamma2 * ffn(ln(x)(1+scale2)+shift2)."""

    def __init__(self, cfg: VARConfig, drop_path_rate: float = 0.0):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.shared_aln, self.drop_path_rate = C, cfg.shared_aln, drop_path_rate
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond):
        """cond: class embedding (B, C), or the shared projection (B, 1, 6, C) -> (B, 1, 6, C)."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(self, x, mod_B16C, attn_bias=None, cache: Optional[KVCache] = None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, cache)
        x = x + drop_path(h.mul_(gamma1), self.drop_path_rate, self.training)
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + drop_path(h.mul(gamma2), self.drop_path_rate, self.training)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# ---------------------------------------------------------------------------------------------
# sampling helpers (in-place on the logits, the official order of random draws)


def filter_top_k_top_p_(logits_BlV, top_k: int = 0, top_p: float = 0.0):
    """Mask logits outside the top-k, then outside the nucleus top-p, with -inf (in place).

    top-k keeps ties at the threshold; top-p removes the low-probability tail whose cumulative
    mass is at most 1 - top_p and never removes the most likely token."""
    V = logits_BlV.shape[-1]
    top = None
    if 0 < top_k < V:
        top = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)
        thr = top[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < thr, -torch.inf)
    if top_p > 0:
        if top is not None and _top_p_within_top_k_(logits_BlV, *top, top_p):
            return logits_BlV
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits_BlV


def _top_p_within_top_k_(logits_BlV, values_Blk, index_Blk, top_p: float) -> bool:
    """The top-p step after top-k, sorting only the k kept logits rather than the whole vocabulary
    (the sort was a quarter of a CPU image's time). Bit for bit what the full sort gives: its
    ascending row is V-k times -inf then the k kept logits in order, so this builds that row and
    takes the same softmax and cumsum over it. Only when every row keeps exactly k finite logits and
    no cut falls between two equal ones (which of them goes is the full sort's own order); otherwise
    False and nothing done (the caller sorts everything)."""
    V, k = logits_BlV.shape[-1], values_Blk.shape[-1]
    if not bool(torch.isfinite(values_Blk).all()) or not bool(((logits_BlV > -torch.inf).sum(-1) == k).all()):
        return False
    sorted_vals, order = values_Blk.sort(dim=-1, descending=False)
    row = logits_BlV.new_full(logits_BlV.shape, -torch.inf)
    row[..., V - k:] = sorted_vals
    remove = row.softmax(dim=-1).cumsum_(dim=-1)[..., V - k:] <= (1 - top_p)
    remove[..., -1:] = False
    # equal logits are the same numbers in any order; their order matters only when the cut falls
    # between two of them (the full sort's own order decides which goes)
    if bool(((sorted_vals[..., 1:] == sorted_vals[..., :-1]) & (remove[..., 1:] != remove[..., :-1])).any()):
        return False
    where = torch.zeros_like(logits_BlV, dtype=torch.bool).scatter_(-1, index_Blk.gather(-1, order), remove)
    logits_BlV.masked_fill_(where, -torch.inf)
    return True


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def sample_tokens(logits_BlV, generator: Generators):
    """One categorical draw per position: (B, l, V) -> (B, l). A list of generators draws row b from
    generator[b] (each image of a batch then samples as it would alone with its generator)."""
    B, l, V = logits_BlV.shape
    if isinstance(generator, (list, tuple)):
        return torch.cat([sample_tokens(logits_BlV[b:b + 1], g) for b, g in enumerate(generator)])
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_soft_codes(logits_BlV, tau: float, generator: Generators):
    """Soft one-hot weights softmax((logits + Gumbel noise) / tau) drawn from `generator` (a list: one per row)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([gumbel_soft_codes(logits_BlV[b:b + 1], tau, g) for b, g in enumerate(generator)])
    gumbels = -torch.empty_like(logits_BlV, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()
    return ((logits_BlV + gumbels) / tau).softmax(dim=-1)


@dataclass
class ScaleEvent:
    """What a per-scale callback sees after each scale. Return True from the callback to stop."""

    scale_index: int
    num_scales: int
    patch_num: int
    tokens: torch.Tensor  # (B, pn*pn) int64, the tokens used at this scale (known ones included)
    f_hat: torch.Tensor  # (B, Cvae, h, w) running sum of all scales so far
    seconds: float = 0.0  # wall time of this scale


@dataclass
class RowGroup:
    """Consecutive rows of a sampled batch that draw and filter as if they were sampled alone: their
    own random generator, guidance, top-k/top-p and more_smooth (batched serving of several users'
    jobs: each job's tokens are the ones it gets by itself)."""

    size: int
    generator: "Generators" = None  # one, or a list with one per row of the group
    guidance_scale: Union[float, Sequence[float]] = 4.0
    top_k: int = 0
    top_p: float = 0.0
    more_smooth: bool = False


@dataclass
class SampleResult:
    tokens: List[torch.Tensor]  # per scale (B, pn*pn) int64
    f_hat: torch.Tensor
    soft_codes: List[Optional[torch.Tensor]] = field(default_factory=list)  # more_smooth codes per scale
    stopped_early: bool = False
    group_f_hat: Optional[List[torch.Tensor]] = None  # with several RowGroups: each group's f_hat, computed apart


# ---------------------------------------------------------------------------------------------
# the model


def token_weights(patch_nums: Sequence[int], weighting: str = "token") -> torch.Tensor:
    """Loss weights (L,) of a teacher-forced sequence, summing to 1. "token": every token the same
    (the official loss; with scales ending 13, 16 the two finest are 62% of it); "equal": every
    scale the same total weight, so the coarse scales that fix an image's layout are not drowned by
    the fine ones."""
    sizes = torch.tensor([int(p) * int(p) for p in patch_nums], dtype=torch.float64)
    if weighting == "token":
        w = torch.ones(int(sizes.sum()), dtype=torch.float64)
    elif weighting == "equal":
        w = (1.0 / sizes).repeat_interleave(sizes.long())
    else:
        raise ValueError(f"scale weighting must be 'token' or 'equal', got {weighting!r}")
    return (w / w.sum()).float()


def scale_levels_and_mask(patch_nums: Sequence[int]):
    """lvl_1L (1, L) int64: the scale of each token; mask (1, 1, L, L): 0 where the query's scale is
    at or after the key's, -inf elsewhere (block-causal: full inside a scale, causal across)."""
    L = sum(pn * pn for pn in patch_nums)
    lvl_1L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, L)
    d = lvl_1L.view(L, 1)
    mask = torch.where(d >= d.T, 0.0, -torch.inf).reshape(1, 1, L, L)
    return lvl_1L, mask.contiguous()


class AdaLNTrunk:
    """What every transformer of the VAR family built from these blocks shares (VAR, ControlVAR): its
    dtype, the blocks' AdaLN modulations of a condition and the head's logits."""

    @property
    def dtype(self):
        return self.word_embed.weight.dtype

    def get_logits(self, h_BLC, cond_BD):
        """Final AdaLN + head, with logits in fp32."""
        return self.head(self.head_nm(h_BLC, cond_BD)).float()

    def block_modulations(self, cond_BD) -> List[torch.Tensor]:
        shared = self.shared_ada_lin(cond_BD)
        return [blk.modulation(shared) for blk in self.blocks]


class VAR(AdaLNTrunk, nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L, SN = cfg.embed_dim, cfg.seq_len, len(cfg.patch_nums)
        self.C, self.L, self.num_scales = C, L, SN
        self.patch_nums = cfg.patch_nums
        self.num_classes = cfg.num_classes
        self.begin_ends = []
        cur = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, 1, C).normal_(0, init_std))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C).normal_(0, init_std))
        lvl_1L, mask = scale_levels_and_mask(cfg.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", mask)

        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(SN, C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([AdaLNBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.init_weights()

    # -- init (the published recipe; only matters for training from scratch) ----------------------
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02):
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        lin = self.head_nm.ada_lin[-1]
        lin.weight.mul_(init_adaln)
        lin.bias.zero_()
        depth = len(self.blocks)
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if not blk.shared_aln:
                w = blk.ada_lin[-1].weight
                w[2 * self.C:].mul_(init_adaln)
                w[:2 * self.C].mul_(init_adaln_gamma)
                blk.ada_lin[-1].bias.zero_()
            else:
                blk.ada_gss.data[:, :, 2:].mul_(init_adaln)
                blk.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)

    # -- teacher-forced full sequence ---------------------------------------------------------------
    def forward(self, label_B, x_BLCv_wo_first_l, cond_drop_rate: Optional[float] = None,
                block_hook: Optional[BlockHook] = None):
        """label_B (B,) int64; x (B, L-1, Cvae) from `tokens_to_var_input` -> logits (B, L, V) fp32.

        Classes are replaced by the null class with probability cond_drop_rate (default: the
        config's in training mode, 0 in eval mode). block_hook: see BlockHook (start is 0)."""
        B = label_B.shape[0]
        p = (self.cfg.cond_drop_rate if self.training else 0.0) if cond_drop_rate is None else cond_drop_rate
        if p > 0:
            drop = torch.rand(B, device=label_B.device) < p
            label_B = torch.where(drop, torch.full_like(label_B, self.num_classes), label_B)
        L = x_BLCv_wo_first_l.shape[1] + 1
        cond_BD = self.class_emb(label_B)
        sos = cond_BD.unsqueeze(1) + self.pos_start
        x_in = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(self.dtype))), dim=1)
        _begin(block_hook, x_in, 0, cond_BD)
        x = x_in + (self.lvl_embed(self.lvl_1L[:, :L]) + self.pos_1LC[:, :L])
        attn_bias = self.attn_bias_for_masking[:, :, :L, :L]
        for bi, (blk, mod) in enumerate(zip(self.blocks, self.block_modulations(cond_BD))):
            x = blk(x, mod, attn_bias)
            if block_hook is not None:
                x = block_hook(bi, x, 0)
        return self.get_logits(x, cond_BD)

    # -- scale-by-scale sampler -------------------------------------------------------------------
    def guidance_per_scale(self, guidance_scale: Union[float, Sequence[float]]) -> List[float]:
        """The CFG weight t at each scale: a float g gives the official ramp t = g * si / (SN-1);
        a list gives t per scale directly."""
        SN = self.num_scales
        if isinstance(guidance_scale, (int, float)):
            return [float(guidance_scale) * si / max(SN - 1, 1) for si in range(SN)]
        ts = [float(t) for t in guidance_scale]
        if len(ts) != SN:
            raise ValueError(f"guidance_scale list has {len(ts)} entries, the model has {SN} scales")
        return ts

    @torch.no_grad()
    def sample(
        self,
        quantizer: MultiScaleQuantizer,
        label_B: torch.Tensor,
        guidance_scale: Union[float, Sequence[float]] = 4.0,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        generator: Generators = None,
        callback: Optional[Callable[[ScaleEvent], Optional[bool]]] = None,
        known_tokens: Optional[Sequence[Optional[torch.Tensor]]] = None,
        known_mask: Optional[Sequence[Optional[torch.Tensor]]] = None,
        logits_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
        use_kv_cache: bool = True,
        block_hook: Optional[BlockHook] = None,
        rows: Optional[Sequence[RowGroup]] = None,
    ) -> SampleResult:
        """Sample a token pyramid for labels `label_B` (B,) (value num_classes = unconditional).

        One long function on purpose (~120 lines): it follows the official sampler's loop step by
        step, so that the order of every random draw can be checked against it in one place.

        known_tokens/known_mask: per scale (B, pn*pn) tokens and a bool mask (True = keep the known
        token); the model still samples every position (so random draws stay in step with plain
        sampling), then known positions take the known code before f_hat is updated. A None
        entry, or no lists, means nothing is forced at that scale.
        use_kv_cache=False recomputes the whole prefix at every scale under the block-causal mask
        (the slow baseline; same results).
        logits_hook(scale_index, logits) may inspect or replace the guided logits (B, pn*pn, V).
        block_hook(block_index, x, start) may change each block's output (a control adapter's
        residual; see BlockHook): with the KV cache x is the current scale's tokens, without it the
        whole prefix (start 0).
        rows: split the batch into RowGroups that each sample with their own generator and settings
        (guidance_scale, top_k, top_p, more_smooth and generator are then taken from the groups).
        """
        import time

        B = label_B.shape[0]
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} images: give one per image")
        dev = label_B.device
        E = quantizer.embedding.weight
        if rows is None:
            rows = [RowGroup(B, generator, guidance_scale, top_k, top_p, more_smooth)]
        if sum(g.size for g in rows) != B:
            raise ValueError(f"the row groups cover {sum(g.size for g in rows)} rows, the batch has {B}")
        bounds = [(sum(g.size for g in rows[:i]), sum(g.size for g in rows[:i + 1])) for i in range(len(rows))]
        group_ts = [self.guidance_per_scale(g.guidance_scale) for g in rows]
        ts = [max(col) for col in zip(*group_ts)]  # a scale needs the guidance half if any group guides there
        more_smooth = any(g.more_smooth for g in rows)
        # the guidance half of the batch is dropped once no remaining scale uses it
        last_cfg = max([si for si, t in enumerate(ts) if t != 0.0], default=-1)
        use_cfg = last_cfg >= 0
        labels = torch.cat((label_B, torch.full_like(label_B, self.num_classes))) if use_cfg else label_B
        cond_BD = self.class_emb(labels)
        mods = self.block_modulations(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)
        x_in = cond_BD.unsqueeze(1) + self.pos_start  # a scale's input without level/position embeddings
        x = x_in + lvl_pos[:, :1]
        caches = [KVCache() if use_kv_cache else None for _ in self.blocks]
        inputs, raw_inputs = [], []  # without a cache: every scale's input so far (with / without lvl_pos)
        size = self.patch_nums[-1]
        f_hat = torch.zeros(B, quantizer.cfg.z_channels, size, size, device=dev)
        result = SampleResult(tokens=[], f_hat=f_hat)
        f_parts = [torch.zeros(g.size, quantizer.cfg.z_channels, size, size, device=dev) for g in rows]

        for si, pn in enumerate(self.patch_nums):
            t0 = time.perf_counter()
            if use_cfg and si > last_cfg:  # no guidance from here on: keep only the conditional half
                use_cfg = False
                x, x_in, cond_BD = x[:B], x_in[:B], cond_BD[:B]
                mods = [m[:B] for m in mods]
                for c in caches:
                    if c is not None:
                        c.keep_first(B)
                inputs, raw_inputs = [t[:B] for t in inputs], [t[:B] for t in raw_inputs]
            if use_kv_cache:
                _begin(block_hook, x_in, self.begin_ends[si][0], cond_BD)
                for bi, (blk, mod, cache) in enumerate(zip(self.blocks, mods, caches)):
                    x = blk(x, mod, None, cache)
                    if block_hook is not None:
                        x = block_hook(bi, x, self.begin_ends[si][0])
            else:
                inputs.append(x)
                raw_inputs.append(x_in)
                x = torch.cat(inputs, dim=1)
                _begin(block_hook, torch.cat(raw_inputs, dim=1), 0, cond_BD)
                ed = x.shape[1]
                bias = self.attn_bias_for_masking[:, :, :ed, :ed]
                for bi, (blk, mod) in enumerate(zip(self.blocks, mods)):
                    x = blk(x, mod, bias)
                    if block_hook is not None:
                        x = block_hook(bi, x, 0)
                x = x[:, ed - pn * pn:]
            if use_cfg and ts[si] != 0:
                t = ts[si]
                t1 = 1 + t
                if any(gt[si] != t for gt in group_ts):  # groups guide with other weights: one per row
                    per_row = [gt[si] for gt, g in zip(group_ts, rows) for _ in range(g.size)]
                    # 1 + t in double, rounded once (as the scalar is): a row's logits are the ones it gets alone
                    t = torch.tensor(per_row, dtype=torch.float64).float().to(dev).view(B, 1, 1)
                    t1 = torch.tensor([1 + v for v in per_row], dtype=torch.float64).float().to(dev).view(B, 1, 1)
                logits = self.get_logits(x, cond_BD)  # (2B, pn*pn, V) fp32
                logits = t1 * logits[:B] - t * logits[B:]
            else:  # unguided scale: the null half only fed the KV cache, its logits are not needed
                logits = self.get_logits(x[:B], cond_BD[:B])
            if logits_hook is not None:
                logits = logits_hook(si, logits)
            ratio = si / max(self.num_scales - 1, 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            idx_parts, h_parts = [], []
            for g, (r0, r1) in zip(rows, bounds):  # each group draws from its own generator, in the official order
                lg = logits if len(rows) == 1 else logits[r0:r1]
                filter_top_k_top_p_(lg, g.top_k, g.top_p)
                idx_parts.append(sample_tokens(lg, g.generator))
                if g.more_smooth:
                    h_parts.append(gumbel_soft_codes(lg.mul(1 + ratio), tau, g.generator) @ E.unsqueeze(0))  # (b, l, Cvae)
                else:
                    h_parts.append(quantizer.embedding(idx_parts[-1]))
            idx_Bl = idx_parts[0] if len(rows) == 1 else torch.cat(idx_parts)
            h_BlC = h_parts[0] if len(rows) == 1 else torch.cat(h_parts)
            soft = h_BlC if more_smooth else None
            if known_tokens is not None and known_tokens[si] is not None:
                m = known_mask[si].to(dev).view(B, -1, 1).to(h_BlC.dtype)
                gt = quantizer.embedding(known_tokens[si].to(dev))
                h_BlC = gt * m + h_BlC * (1 - m)
                idx_Bl = torch.where(known_mask[si].to(dev).view(B, -1), known_tokens[si].to(dev), idx_Bl)
                if soft is not None:
                    soft = h_BlC
            h_BChw = h_BlC.transpose(1, 2).reshape(B, -1, pn, pn)
            if len(rows) == 1:
                f_hat, nxt = quantizer.next_input(si, f_hat, h_BChw.float())
            else:  # per group, on its own tensors: a convolution's result can depend on the batch it runs in
                parts = [quantizer.next_input(si, f_parts[i], h_BlC[r0:r1].transpose(1, 2).reshape(
                    r1 - r0, -1, pn, pn).float()) for i, (r0, r1) in enumerate(bounds)]  # the layout it has alone
                f_parts = [a for a, _ in parts]
                f_hat, nxt = torch.cat(f_parts), torch.cat([b for _, b in parts])
                result.group_f_hat = f_parts
            result.tokens.append(idx_Bl)
            result.soft_codes.append(None if soft is None else soft.transpose(1, 2).reshape(B, -1, pn, pn))
            last = si == self.num_scales - 1
            if not last:
                bg, ed = self.begin_ends[si + 1]
                x_in = self.word_embed(nxt.reshape(B, quantizer.cfg.z_channels, -1).transpose(1, 2).to(self.dtype))
                x = x_in + lvl_pos[:, bg:ed]
                if use_cfg:
                    x, x_in = x.repeat(2, 1, 1), x_in.repeat(2, 1, 1)
            if callback is not None:
                ev = ScaleEvent(si, self.num_scales, pn, idx_Bl, f_hat, time.perf_counter() - t0)
                if callback(ev) is True and not last:
                    result.stopped_early = True
                    break
        result.f_hat = f_hat
        return result
