"""Control adapters: steer a frozen VAR with a spatial map (edges, depth, segmentation).

In the spirit of CAR (Yao et al. 2024), with ControlNet's zero initialisation that CAR lacks: a small
conv net encodes the control map once; its features are pooled to every scale's token grid (pn x pn,
area averaging like the quantiser's own downsampling), tagged with a scale embedding and turned into
per-token condition features c_si (B, pn*pn, hidden). After each chosen block b of the frozen
transformer, the tokens of scale si receive

    x = x + strength * mask[si] * zero_linear_b(c_si)

through VAR's `block_hook`. zero_linear_b starts at exactly zero (weight and bias), so an untrained
adapter leaves the base model's logits bit-identical; the tokens at the positions that *predict*
scale si see the control at that scale's resolution, in the teacher-forced pass and the sampler
alike.

    cfg = ControlConfig.for_var(var.cfg, "canny")                  # or "depth", "segmentation"
    adapter = ControlAdapter(cfg)
    hook = ControlHook([Control(adapter, edges_B1HW, strength=1.0, guidance_start=0.0,
                                guidance_end=1.0)], batch_size=B, begin_ends=var.begin_ends)
    var.sample(quantizer, labels, block_hook=hook)                 # several Controls are summed

Guidance. The sampler's guidance batch is [conditional B rows; unconditional B rows]. With
`guide_control=True` (the default) the unconditional rows get no control, so one weight t guides
towards both the class and the control (ControlAR's null control; 2507.15724 reports that guidance
on the control matters), at no extra cost:

    logits = (1 + t) * l(class, control) - t * l(null class, no control)

`guide_control=False` gives both halves the control (CAR): (1 + t) l(class, ctrl) - t l(null, ctrl),
guidance on the class only. Separate weights for class and control would need a third branch and
are left out. Training (control_loss) drops the class but keeps the control, so the conditional
branch also learns `l(null class, control)` for unconditional generation under control.

Maps (ControlAdapter.prepare_map): float maps (B, in_channels, H, W), e.g. canny edges in {0, 1} or
depth as normalised log-depth in [0, 1] (0 near, 1 far); label maps (B, H, W) int64 class ids,
one-hot encoded to in_channels classes (cfg.label_map). Maps of another size are resized to
cfg.map_size (nearest for labels, bilinear otherwise).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTROL_TYPES = ("canny", "depth", "segmentation")


@dataclass
class ControlConfig:
    control_type: str = "canny"  # a name: "canny", "depth", "segmentation" (others work the same)
    in_channels: int = 1  # map channels; for label maps, the number of classes
    label_map: bool = False  # True: maps are integer class ids, one-hot encoded to in_channels
    embed_dim: int = 1024  # width C of the VAR it steers
    depth: int = 16  # number of blocks of that VAR
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    map_size: int = 256  # maps are resized to map_size x map_size (the image resolution)
    widths: Sequence[int] = (32, 64, 128, 256)  # conv stem; every width after the first halves the size
    hidden: int = 256  # width of the per-token condition features
    inject_blocks: Optional[Sequence[int]] = None  # blocks whose output gets an injection; None: all

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        self.widths = tuple(int(w) for w in self.widths)
        if self.inject_blocks is not None:
            self.inject_blocks = tuple(sorted({int(b) for b in self.inject_blocks}))
            bad = [b for b in self.inject_blocks if not 0 <= b < self.depth]
            if bad or not self.inject_blocks:
                raise ValueError(f"inject_blocks must name blocks in 0..{self.depth - 1}, got {self.inject_blocks}")
        if self.in_channels < 1 or not self.widths or self.hidden < 1:
            raise ValueError("in_channels, widths and hidden must be positive")

    @property
    def blocks(self) -> tuple:
        return tuple(range(self.depth)) if self.inject_blocks is None else tuple(self.inject_blocks)

    @classmethod
    def for_var(cls, var_cfg, control_type: str, num_classes: Optional[int] = None, map_size: Optional[int] = None,
                **kw) -> "ControlConfig":
        """A config matching a VARConfig. Segmentation needs num_classes (label maps, one-hot);
        map_size defaults to the image resolution, 16 px per token of the last scale."""
        if control_type == "segmentation":
            if not num_classes:
                raise ValueError("a segmentation control needs num_classes (the number of label ids)")
            kw.setdefault("in_channels", int(num_classes))
            kw.setdefault("label_map", True)
        return cls(control_type=control_type, embed_dim=var_cfg.embed_dim, depth=var_cfg.depth,
                   patch_nums=var_cfg.patch_nums, map_size=map_size or 16 * var_cfg.patch_nums[-1], **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ControlConfig: unknown keys {unknown}")
        return cls(**d)


def resize_map(map_BCHW: torch.Tensor, size: Union[int, Tuple[int, int]], labels: bool) -> torch.Tensor:
    """Resize a map to size (an int: square; or (H, W)): nearest for label ids, bilinear
    (antialiased when shrinking) for float maps."""
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(map_BCHW.shape[-2:]) == hw:
        return map_BCHW
    if labels:
        return F.interpolate(map_BCHW.float(), size=hw, mode="nearest-exact").to(map_BCHW.dtype)
    shrink = map_BCHW.shape[-2] > hw[0] or map_BCHW.shape[-1] > hw[1]
    return F.interpolate(map_BCHW.float(), size=hw, mode="bilinear", align_corners=False, antialias=shrink)


class ControlAdapter(nn.Module):
    """Control map -> per-scale condition features -> per-block zero-initialised residuals."""

    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        layers: List[nn.Module] = [nn.Conv2d(cfg.in_channels, w[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*layers)
        self.scale_embed = nn.Embedding(len(cfg.patch_nums), w[-1])
        self.to_tokens = nn.Sequential(nn.Linear(w[-1], cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.inject = nn.ModuleList([nn.Linear(cfg.hidden, cfg.embed_dim) for _ in cfg.blocks])
        self.slot: Dict[int, int] = {b: i for i, b in enumerate(cfg.blocks)}  # block index -> inject index
        nn.init.normal_(self.scale_embed.weight, std=0.02)
        self.zero_init()

    @torch.no_grad()
    def zero_init(self):
        """Zero the injection layers: the adapter then adds exactly nothing."""
        for lin in self.inject:
            lin.weight.zero_()
            lin.bias.zero_()

    def prepare_map(self, map_, size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """Check a map and bring it to (B, in_channels, map_size, map_size) float (see the module
        doc); `size` (an int or (H, W)) resizes to another size instead."""
        cfg = self.cfg
        size = cfg.map_size if size is None else size
        what = f"the {cfg.control_type} control map"
        if not isinstance(map_, torch.Tensor):
            raise ValueError(f"{what} must be a torch tensor, not {type(map_).__name__} (studio.preprocess turns "
                             "images into maps)")
        if map_.is_complex() or (map_.dtype == torch.bool and cfg.label_map):
            raise ValueError(f"{what} has dtype {map_.dtype}; expected "
                             + ("integer class ids" if cfg.label_map else "floats"))
        if cfg.label_map:
            if map_.is_floating_point():
                raise ValueError(f"{what} must hold integer class ids (B, H, W), got a {map_.dtype} tensor; "
                                 "a segmentation map is not an image")
            m = map_
            if m.ndim == 4 and m.shape[1] == 1:
                m = m[:, 0]
            if m.ndim == 2:
                m = m[None]
            if m.ndim != 3:
                raise ValueError(f"{what} must be (H, W) or (B, H, W) class ids, got shape {tuple(map_.shape)}")
            if m.numel() and (int(m.min()) < 0 or int(m.max()) >= cfg.in_channels):
                raise ValueError(f"{what} has ids {int(m.min())}..{int(m.max())}; this adapter knows "
                                 f"{cfg.in_channels} classes (0..{cfg.in_channels - 1})")
            m = resize_map(m[:, None].long(), size, labels=True)[:, 0]
            return F.one_hot(m, cfg.in_channels).permute(0, 3, 1, 2).to(self.dtype)
        m = map_.float() if map_.dtype == torch.bool else map_
        if not m.is_floating_point():
            raise ValueError(f"{what} must be a float tensor (values in [0, 1]), got {map_.dtype}")
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None] if m.shape[0] == cfg.in_channels else m[:, None] if cfg.in_channels == 1 else m
        if m.ndim != 4 or m.shape[1] != cfg.in_channels:
            raise ValueError(f"{what} must have {cfg.in_channels} channel(s): (B, {cfg.in_channels}, H, W), "
                             f"got shape {tuple(map_.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        return resize_map(m, size, labels=False).to(self.dtype)

    @property
    def dtype(self):
        return self.stem[0].weight.dtype

    def encode(self, map_BCHW: torch.Tensor) -> List[torch.Tensor]:
        """A prepared map -> condition features per scale, each (B, pn*pn, hidden)."""
        feat = self.stem(map_BCHW)  # (B, W, S', S')
        out = []
        for si, pn in enumerate(self.cfg.patch_nums):
            f = F.interpolate(feat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)  # (B, pn*pn, W)
            out.append(self.to_tokens(f + self.scale_embed.weight[si]))
        return out

    def forward(self, map_) -> List[torch.Tensor]:
        return self.encode(self.prepare_map(map_))

    def residual(self, block_index: int, feat_BlH: torch.Tensor) -> Optional[torch.Tensor]:
        """What block `block_index` adds (B, l, C) at strength 1, or None for a block without injection."""
        slot = self.slot.get(block_index)
        return None if slot is None else self.inject[slot](feat_BlH)


def active_scales(num_scales: int, guidance_start: float = 0.0, guidance_end: float = 1.0) -> List[bool]:
    """Scale si is controlled when it lies in [start, end] as a fraction of the scales:
    si / n >= start and (si + 1) / n <= end (diffusers' ControlNet rule with scales for steps)."""
    if not 0.0 <= guidance_start < guidance_end <= 1.0:
        raise ValueError(f"need 0 <= control_guidance_start < control_guidance_end <= 1, got "
                         f"{guidance_start} and {guidance_end}")
    eps = 1e-9
    return [si / num_scales >= guidance_start - eps and (si + 1) / num_scales <= guidance_end + eps
            for si in range(num_scales)]


@dataclass
class Control:
    """One control for a run: an adapter, its map, its strength and the scales it acts on."""

    adapter: ControlAdapter
    map: torch.Tensor  # anything ControlAdapter.prepare_map accepts; batch 1 or B
    strength: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


class ControlHook:
    """VAR `block_hook` that adds the summed residuals of several controls.

    Features are computed once here; each call adds, for every scale it covers, the sum over the
    active controls of strength * zero_linear_b(c_si). Scales where no control is active (and
    controls of strength 0) are left untouched, exactly."""

    def __init__(self, controls: Sequence[Control], batch_size: int, begin_ends: Sequence[tuple],
                 guide_control: bool = True):
        self.B, self.begin_ends, self.guide_control = int(batch_size), list(begin_ends), guide_control
        self.starts = {bg: si for si, (bg, _) in enumerate(self.begin_ends)}
        self.items = []  # (adapter, features per scale (B, l, hidden), strength, active per scale)
        n = len(self.begin_ends)
        for c in controls:
            if len(c.adapter.cfg.patch_nums) != n:
                raise ValueError(f"the {c.adapter.cfg.control_type} adapter has {len(c.adapter.cfg.patch_nums)} "
                                 f"scales, the model {n}")
            strength = float(c.strength)
            if not math.isfinite(strength):
                raise ValueError(f"control strength must be finite, got {c.strength}")
            mask = active_scales(n, c.guidance_start, c.guidance_end)
            if strength == 0.0 or not any(mask):
                continue
            feats = c.adapter(c.map)
            Bm = feats[0].shape[0]
            if Bm not in (1, self.B):
                raise ValueError(f"the {c.adapter.cfg.control_type} control has {Bm} maps for {self.B} images; "
                                 "give one map or one per image")
            feats = [f.expand(self.B, -1, -1) for f in feats]
            self.items.append((c.adapter, feats, strength, mask))

    def residual(self, block_index: int, scale_index: int) -> Optional[torch.Tensor]:
        """The summed residual (B, pn*pn, C) for one block and scale, or None when nothing is added."""
        total = None
        for adapter, feats, strength, mask in self.items:
            if not mask[scale_index]:
                continue
            r = adapter.residual(block_index, feats[scale_index])
            if r is None:
                continue
            r = r * strength
            total = r if total is None else total + r
        return total

    def __call__(self, block_index: int, x_BLC: torch.Tensor, start: int) -> torch.Tensor:
        rows, L = x_BLC.shape[:2]
        if rows not in (self.B, 2 * self.B):
            raise ValueError(f"control hook built for batch {self.B} got {rows} rows")
        si, pos, parts, any_active = self.starts.get(start), start, [], False
        if si is None:
            raise ValueError(f"position {start} is not the start of a scale")
        while pos < start + L:
            bg, ed = self.begin_ends[si]
            r = self.residual(block_index, si)
            any_active |= r is not None
            parts.append(r if r is not None else x_BLC.new_zeros(self.B, ed - bg, x_BLC.shape[2]))
            pos, si = ed, si + 1
        if pos != start + L:
            raise ValueError(f"positions {start}..{start + L - 1} do not cover whole scales")
        if not any_active:
            return x_BLC
        r = torch.cat(parts, dim=1).to(x_BLC.dtype) if len(parts) > 1 else parts[0].to(x_BLC.dtype)
        if rows == 2 * self.B:  # guidance batch: the unconditional half gets the control only on request
            r = torch.cat((r, r if not self.guide_control else torch.zeros_like(r)))
        return x_BLC + r


def control_loss(var, adapter: ControlAdapter, labels: torch.Tensor, x_in: torch.Tensor, maps: torch.Tensor,
                 targets: torch.Tensor, class_drop_rate: float = 0.1,
                 generator: Optional[torch.Generator] = None, scale_weighting: str = "token") -> torch.Tensor:
    """Teacher-forced cross-entropy of the frozen VAR steered by `adapter` (train the adapter only).

    labels (B,) int64; x_in (B, L-1, Cvae) from `quantizer.tokens_to_var_input(tokens)`; maps as
    prepare_map accepts (batch B); targets (B, L) = torch.cat(tokens, dim=1). Classes are replaced by
    the null class with probability class_drop_rate while the control stays (the sampler's
    conditional branch may be the null class under control; its unconditional branch is the base
    model, which needs no training). scale_weighting: "token" (the plain token mean) or "equal"
    (every scale weighs the same; models.var.token_weights). The caller freezes `var` (requires_grad False, eval mode)."""
    B = labels.shape[0]
    if class_drop_rate > 0:
        drop = torch.rand(B, generator=generator, device="cpu").to(labels.device) < class_drop_rate
        labels = torch.where(drop, torch.full_like(labels, var.num_classes), labels)
    hook = ControlHook([Control(adapter, maps)], B, var.begin_ends)
    logits = var(labels, x_in, cond_drop_rate=0.0, block_hook=hook)  # (B, L, V) fp32
    if scale_weighting == "token":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    from models.var import token_weights

    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
    return (ce * token_weights(var.cfg.patch_nums, scale_weighting).to(ce.device)).sum(1).mean()
