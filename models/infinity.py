"""Infinity: text-to-image next-scale prediction over bit labels (FoundationVision/Infinity).

The transformer predicts, scale by scale, every bit of a BSQ latent pyramid (models/bsq_vae.py):
a scale of (h, w) positions is one step that emits (B, h*w, 2d) logits, read as h*w*d independent
two-way choices. It is conditioned on flan-t5 features: an RMS-normed copy of the prompt's tokens
feeds every block's cross-attention (through a small MLP), and an attentive pool of them is both
the start token and the AdaLN condition (one shared AdaLN linear, per-block learned offsets).
Self-attention is cosine attention with a learned per-head scale and 2D RoPE whose positions are
those of the largest (1M) schedule of the image's aspect ratio; a scale attends to all previous
scales and itself (KV cache). Classifier-free guidance mixes the logits of a conditional and an
unconditional half (a learned `cfg_uncond` text, or a negative prompt).

Key names and shapes match the released checkpoints (`infinity_2b_reg.pth`, the sharded 8B); the
config is read from the tensors by studio/infinity.py. Shapes: text (B, L, Ct5) with (B, L) bool
prefix masks; tokens x (B, l, C); bits (B, h, w, d) int64 0/1 in the VAE's space.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bsq_vae import bits_to_codes


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_hidden: int = 8192  # round(4C / 256) * 256 in every released model
    text_channels: int = 2048  # Ct5
    text_maxlen: int = 512  # rows of cfg_uncond
    pool_heads: int = 16  # heads of the attentive text pool (Ct5 / 128, or Ct5 / 64 when C > 4096)
    d_vae: int = 32  # bits per transformer position (4d for the patchified 8B)
    block_chunks: int = 8
    num_levels: int = 15  # rows of lvl_embed: the most scales a schedule may have
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# 2D RoPE (positions scaled to the 1M schedule of the same aspect ratio)


def rope_table(head_dim: int, scales: Sequence[Tuple[int, int]], full_hw: Tuple[int, int],
               max_pos: int = 128, base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim / 2) for every position of `scales` in order. Pair j < head_dim/4 turns
    with the row, the others with the column; the position of (i, j) in an (h, w) scale is
    round(i * H1 / h), round(j * W1 / w) with (H1, W1) = full_hw (float32, half to even)."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(max_pos, dtype=torch.int64).type_as(inv_freq)
    freqs = torch.outer(t, inv_freq)  # (max_pos, half / 2): the same table for rows and columns
    H1, W1 = full_hw
    cos, sin = [], []
    for h, w in scales:
        iy = (torch.arange(h) * (H1 / h)).round().int().view(h, 1).expand(h, w).reshape(-1)
        ix = (torch.arange(w) * (W1 / w)).round().int().view(1, w).expand(h, w).reshape(-1)
        ang = torch.cat([freqs[iy], freqs[ix]], dim=-1)  # (h*w, half)
        cos.append(torch.cos(ang))
        sin.append(torch.sin(ang))
    return torch.cat(cos), torch.cat(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, l, c); cos/sin (l, c/2); adjacent elements (2j, 2j+1) form pair j."""
    x2 = x.reshape(*x.shape[:-1], -1, 2)
    a, b = x2[..., 0], x2[..., 1]
    out = torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1)
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# layers


class TextRMSNorm(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


class CrossAttention(nn.Module):
    """Queries attend to their own prompt's tokens only (a (B, Lk) key mask). `pool`: one learned
    query per head (the attentive text pool), else queries come from the image tokens."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.pool = pool
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Optional[torch.Tensor], kv: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, Lk, _ = kv.shape
        H, c = self.num_heads, self.head_dim
        kv = F.linear(kv, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias))).view(B, Lk, 2, H, c)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, Lk, c)
        if self.pool:
            q = self.mat_q.to(kv.dtype).unsqueeze(2).expand(B, H, 1, c)
        else:
            q = self.mat_q(x).view(B, x.shape[1], H, c).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=1 / math.sqrt(c))
        return self.proj(o.transpose(1, 2).reshape(B, q.shape[2], H * c))


class SelfAttention(nn.Module):
    """Cosine attention (l2-normalised q and k, q scaled by exp(min(scale_mul, ln 100))) with RoPE
    and a KV cache of the rotated keys: a scale sees every earlier scale and itself."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x, cos, sin):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, c)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
        k = F.normalize(k, dim=-1, eps=1e-12)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k = torch.cat((self.cache[0], k), dim=2)
            v = torch.cat((self.cache[1], v), dim=2)
        self.cache = (k, v)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=1.0)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.eps = C, cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=True)
        self.ffn = FFN(C, cfg.mlp_hidden)

    def _ada_norm(self, x, scale, shift):
        return F.layer_norm(x.float(), (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)

    def forward(self, x, gss, ca_kv, ca_mask, cos, sin):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)  # each (B, 1, C)
        x = x + self.sa(self._ada_norm(x, scale1, shift1), cos, sin).mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv, ca_mask).float()
        x = x + self.ffn(self._ada_norm(x, scale2, shift2)).mul(gamma2)
        return x


class BlockChunk(nn.Module):
    """`block_chunks.{c}.module.{j}`: the released checkpoints group the blocks in chunks."""

    def __init__(self, blocks: List[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return F.layer_norm(x.float(), (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.pool_heads, pool=True)

    def forward(self, kv, key_mask):
        return self.ca(None, kv, key_mask).squeeze(1)


# ---------------------------------------------------------------------------------------------
# sampling helpers


def sample_bit_pairs(logits_BlV: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, l, 2) per bit [0, 1] -> (B, l) int64. top_k per pair (1 keeps the larger), top_p
    nucleus per pair; then one multinomial draw per pair from `generator`, rows in order. A list of
    B generators draws image b's pairs from generator[b] alone (its draw is then the one a batch of
    that image alone makes: the studio's per-image seeds); one generator is the official protocol."""
    B, l, V = logits_BlV.shape
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} images: give one per image")
        return torch.cat([sample_bit_pairs(logits_BlV[b:b + 1], top_k, top_p, g) for b, g in enumerate(generator)])
    if top_k > 0:
        top_k = min(top_k, V)
        remove = logits_BlV < logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(remove, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


@dataclass
class TextCondition:
    """Prepared text: per batch row (conditional rows first, then unconditional) the pooled
    condition, the cross-attention keys/values input and their mask."""

    cond_BD: torch.Tensor  # (bs, C)
    ca_kv: torch.Tensor  # (bs, L, C)
    ca_mask: torch.Tensor  # (bs, L) bool
    batch: int  # B, the number of images (bs = B or 2B)


@dataclass
class InfinityScaleEvent:
    scale_index: int
    num_scales: int
    size: Tuple[int, int]  # (h, w) of this scale in the VAE's space
    bits: torch.Tensor  # (B, h, w, d) int64, the bits used (known ones included)
    summed_codes: torch.Tensor  # (B, d, 1, H, W) running latent at the final size
    seconds: float = 0.0


@dataclass
class InfinitySample:
    bits: List[torch.Tensor]  # per scale (B, h, w, d) int64
    summed_codes: torch.Tensor  # (B, d, 1, H, W)
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------------
# the model


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct5 = cfg.embed_dim, cfg.text_channels
        if cfg.depth % cfg.block_chunks:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        if cfg.head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width divisible by 4, got {cfg.head_dim}")
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct5))
        self.text_norm = TextRMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(cfg) for _ in range(per)]) for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.d_vae)
        self.autocast_dtype: Optional[torch.dtype] = None  # bf16/fp16 blocks on a GPU; None: fp32

    @property
    def blocks(self) -> List[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    # -- text ----------------------------------------------------------------------------------
    def uncond_text(self, mask: torch.Tensor) -> torch.Tensor:
        """The learned unconditional text for prompts of these lengths: cfg_uncond[:len_i] each."""
        B, L = mask.shape
        rows = self.cfg_uncond[:L].float()
        if rows.shape[0] < L:
            raise ValueError(f"a prompt of {L} tokens is longer than this model's {rows.shape[0]}")
        return rows.unsqueeze(0).expand(B, L, -1) * mask.unsqueeze(-1)

    def prepare_text(self, emb: torch.Tensor, mask: torch.Tensor, guided: bool,
                     neg_emb: Optional[torch.Tensor] = None, neg_mask: Optional[torch.Tensor] = None) -> TextCondition:
        """emb (B, L, Ct5) with prefix masks (B, L); with guidance the batch is [cond, uncond], the
        unconditional half being the negative prompt's features if given, else cfg_uncond."""
        B = emb.shape[0]
        emb, mask = emb.float(), mask.bool()
        if guided:
            if neg_emb is None:
                neg_emb, neg_mask = self.uncond_text(mask), mask
            neg_emb, neg_mask = neg_emb.float(), neg_mask.bool()
            L = max(emb.shape[1], neg_emb.shape[1])
            emb = torch.cat([F.pad(emb, (0, 0, 0, L - emb.shape[1])), F.pad(neg_emb, (0, 0, 0, L - neg_emb.shape[1]))])
            mask = torch.cat([F.pad(mask, (0, L - mask.shape[1])), F.pad(neg_mask, (0, L - neg_mask.shape[1]))])
        kv = self.text_norm(emb)
        cond_BD = self.text_proj_for_sos(kv, mask)
        ca_kv = self.text_proj_for_ca(kv)
        return TextCondition(cond_BD=cond_BD, ca_kv=ca_kv, ca_mask=mask, batch=B)

    # -- one scale -----------------------------------------------------------------------------
    def _clear_cache(self):
        for b in self.blocks:
            b.sa.cache = None

    def forward_scale(self, x: torch.Tensor, scale_index: int, gss: torch.Tensor, text: TextCondition,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (bs, l, C) without level embedding -> hidden (bs, l, C); extends the KV cache."""
        x = x + self.lvl_embed.weight[scale_index]
        dt = self.autocast_dtype
        ctx = torch.autocast(x.device.type, dtype=dt) if dt is not None else _null()
        with ctx:
            for b in self.blocks:
                x = b(x, gss, text.ca_kv, text.ca_mask, cos, sin)
        return x.float()

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD.float()))

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, text: TextCondition, scales: Sequence[Tuple[int, int]], rope_full_hw: Tuple[int, int],
                 cfg: Sequence[float], tau: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
                 generator: Union[None, torch.Generator, Sequence[torch.Generator]], patchify: bool = False,
                 known: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
                 callback: Optional[Callable[[InfinityScaleEvent], Optional[bool]]] = None) -> InfinitySample:
        """Sample the bit pyramid for transformer scales `scales` [(h, w), ...].

        Per scale exactly one multinomial draw of all (image, position, bit) pairs from `generator`
        (None: the global RNG); a list of generators, one per image, draws each image's pairs from its
        own (image b is then what it would be alone with generator[b]). `known[si]` = (bits (B, h, w, d), keep (B or 1, h, w) bool) in the
        VAE's space forces the kept bits (editing, re-roll); the draw still happens, so unforced
        positions get what they would have got. `callback` returning True stops after that scale."""
        B = text.batch
        bs = text.cond_BD.shape[0]
        f = 2 if patchify else 1
        vae_scales = [(h * f, w * f) for h, w in scales]
        final = vae_scales[-1]
        cos_all, sin_all = rope_table(self.cfg.head_dim, scales, rope_full_hw)
        dev = text.cond_BD.device
        cos_all, sin_all = cos_all.to(dev), sin_all.to(dev)
        gss = self.shared_ada_lin(text.cond_BD.float()).float().view(bs, 1, 6, -1)
        x = text.cond_BD.unsqueeze(1).expand(bs, 1, -1) + self.pos_start.expand(bs, 1, -1)
        summed, out, start, stopped = 0, [], 0, False
        self._clear_cache()
        try:
            for si, (h, w) in enumerate(scales):
                t0 = time.perf_counter()
                n = h * w
                hid = self.forward_scale(x, si, gss, text, cos_all[start:start + n], sin_all[start:start + n])
                start += n
                g = cfg[si]
                if g != 1:
                    lg = self.logits(hid, text.cond_BD).mul(1 / tau[si])
                    lg = g * lg[:B] + (1 - g) * lg[B:]
                else:
                    lg = self.logits(hid[:B], text.cond_BD[:B]).mul(1 / tau[si])
                bits = sample_bit_pairs(lg.reshape(B, -1, 2), int(top_k[si]), float(top_p[si]), generator)
                bits = bits.view(B, h, w, -1)
                if patchify:  # (B, h, w, 4d) -> (B, 2h, 2w, d)
                    bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
                if known is not None and si < len(known) and known[si] is not None:
                    kb, keep = known[si]
                    bits = torch.where(keep.to(bits.device).unsqueeze(-1), kb.to(bits.device), bits)
                bits = bits.contiguous()
                out.append(bits)
                codes = bits_to_codes(bits).contiguous()  # (B, d, 1, h', w')
                last = si == len(scales) - 1
                if not last:
                    summed = summed + F.interpolate(codes, size=(1, *final), mode="trilinear")
                else:
                    summed = summed + codes
                if callback is not None and callback(InfinityScaleEvent(
                        si, len(scales), vae_scales[si], bits, summed, time.perf_counter() - t0)):
                    stopped = not last
                    break
                if not last:
                    nxt = F.interpolate(summed, size=(1, *vae_scales[si + 1]), mode="trilinear").squeeze(-3)
                    if patchify:
                        nxt = F.pixel_unshuffle(nxt, 2)
                    nxt = nxt.reshape(B, nxt.shape[1], -1).permute(0, 2, 1)  # (B, h'w', d_vae)
                    x = self.word_embed(nxt.to(self.word_embed.weight.dtype)).float().repeat(bs // B, 1, 1)
        finally:
            self._clear_cache()
        return InfinitySample(bits=out, summed_codes=summed, stopped_early=stopped)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
