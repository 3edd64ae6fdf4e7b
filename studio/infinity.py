"""InfinityPipeline: text-to-image with the Infinity family (125M, 2B, 8B), scale by scale.

    pipe = InfinityPipeline.from_pretrained("weights/infinity-2b")   # infinity_2b_reg.pth + infinity_vae_d32reg.pth
    out = pipe(prompt="a red fox in snow", height=1024, width=1024,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("fox.png"); out.tokens   # per scale (B, h, w, d) int64 bit labels

Faithful to FoundationVision/Infinity's `autoregressive_infer_cfg` (cfg on logits, bit labels,
per-scale cfg/tau lists, its RNG protocol: one multinomial per scale from the generator), checked
on random weights against the official code (tests/test_infinity.py). The studio's additions:
per-scale callbacks (live scales), editing by forcing the known bits under a mask, re-roll.

Loading is strict and safe: `torch.load(weights_only=True)` or safetensors; every size is read
from the tensors; a missing, unexpected or mis-shaped key is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.bsq_vae import BSQVAE, BSQVAEConfig, sum_codes
from models.infinity import Infinity, InfinityConfig, InfinityScaleEvent, TextCondition
from studio import images as im
from studio.checkpoints import CheckpointError, check_state_dict, load_into
from studio.editing import InpaintPlan
from studio.params import UserError

# ---------------------------------------------------------------------------------------------
# the official resolution table (infinity/utils/dynamic_resolution.py): per aspect ratio h/w, the
# 13 scales (h, w) of the 1M schedule; smaller totals are prefixes of it. Pixels = 16 x last scale.

_RATIO_SCALES = {
    1.000: "1x1 2x2 4x4 6x6 8x8 12x12 16x16 20x20 24x24 32x32 40x40 48x48 64x64",
    1.250: "1x1 2x2 3x3 5x4 10x8 15x12 20x16 25x20 30x24 35x28 45x36 55x44 70x56",
    1.333: "1x1 2x2 4x3 8x6 12x9 16x12 20x15 24x18 28x21 36x27 48x36 60x45 72x54",
    1.500: "1x1 2x2 3x2 6x4 9x6 15x10 21x14 27x18 33x22 39x26 48x32 63x42 78x52",
    1.750: "1x1 2x2 3x3 7x4 11x6 14x8 21x12 28x16 35x20 42x24 56x32 70x40 84x48",
    2.000: "1x1 2x2 4x2 6x3 10x5 16x8 22x11 30x15 38x19 46x23 60x30 74x37 90x45",
    2.500: "1x1 2x2 5x2 10x4 15x6 20x8 25x10 30x12 40x16 50x20 65x26 80x32 100x40",
    3.000: "1x1 2x2 6x2 9x3 15x5 21x7 27x9 36x12 45x15 54x18 72x24 90x30 111x37",
}
PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
PIXELS_PER_SCALE_UNIT = 16


def _ratio_table() -> Dict[float, List[Tuple[int, int]]]:
    out = {}
    for r, s in _RATIO_SCALES.items():
        hw = [tuple(int(v) for v in t.split("x")) for t in s.split()]
        out[r] = hw
        if r != 1.0:  # the inverse ratio, keyed as the official code keys it
            out[int(1 / r * 1000) / 1000] = [(w, h) for h, w in hw]
    return dict(sorted(out.items()))


RATIO_SCALES = _ratio_table()


@dataclass(frozen=True)
class Schedule:
    ratio: float  # the template's h / w
    pn: str  # "0.06M" ... "1M"
    scales: Tuple[Tuple[int, int], ...]  # transformer scales (h, w)
    rope_full_hw: Tuple[int, int]  # the 1M schedule's last scale of this ratio (RoPE positions)

    @property
    def height(self) -> int:
        return self.scales[-1][0] * PIXELS_PER_SCALE_UNIT

    @property
    def width(self) -> int:
        return self.scales[-1][1] * PIXELS_PER_SCALE_UNIT


def schedule_for(ratio: float, pn: str) -> Schedule:
    full = RATIO_SCALES[ratio]
    return Schedule(ratio, pn, tuple(full[:PN_SCALES[pn]]), full[-1])


def all_sizes() -> List[Schedule]:
    return [schedule_for(r, pn) for r in RATIO_SCALES for pn in PN_SCALES]


def parse_aspect_ratio(aspect_ratio) -> float:
    """'16:9' (width:height, as people write it), or a float h/w -> h/w."""
    if isinstance(aspect_ratio, str):
        try:
            w, h = (float(v) for v in aspect_ratio.split(":"))
            return h / w
        except ValueError:
            raise UserError(f"aspect ratio must look like '16:9' (width:height), not {aspect_ratio!r}") from None
    return float(aspect_ratio)


def find_schedule(height: Optional[int] = None, width: Optional[int] = None, aspect_ratio=None,
                  pn: str = "1M") -> Schedule:
    """A table size: exact height and width, or the template nearest to an aspect ratio at `pn`."""
    if pn not in PN_SCALES:
        raise UserError(f"pn must be one of {', '.join(PN_SCALES)}, not {pn!r}")
    if height is not None or width is not None:
        if height is None or width is None:
            raise UserError("give both height and width (or an aspect ratio)")
        for s in all_sizes():
            if (s.height, s.width) == (int(height), int(width)):
                return s
        near = sorted(all_sizes(), key=lambda s: abs(s.height - height) + abs(s.width - width))[:4]
        raise UserError(f"{height}x{width} (height x width) is not one of Infinity's sizes; near it: "
                        + ", ".join(f"{s.height}x{s.width}" for s in near))
    r = 1.0 if aspect_ratio is None else parse_aspect_ratio(aspect_ratio)
    if not (r > 0 and math.isfinite(r)):
        raise UserError(f"aspect ratio must be positive, got {aspect_ratio!r}")
    keys = np.array(list(RATIO_SCALES))
    return schedule_for(float(keys[np.argmin(np.abs(keys - r))]), pn)


# ---------------------------------------------------------------------------------------------
# loading: configs from tensors, key layouts, files


def _shape(sd, key, what):
    if key not in sd:
        raise CheckpointError(f"{what} has no '{key}': not an Infinity checkpoint")
    return tuple(sd[key].shape)


def infinity_config_from_state_dict(sd: Dict[str, torch.Tensor], what: str = "the transformer") -> InfinityConfig:
    L, Ct5 = _shape(sd, "cfg_uncond", what)
    C = _shape(sd, "pos_start", what)[-1]
    chunks = {int(k.split(".")[1]) for k in sd if k.startswith("block_chunks.")}
    if not chunks:
        raise CheckpointError(f"{what} has no 'block_chunks.*' keys: not an Infinity checkpoint")
    per = {int(k.split(".")[3]) for k in sd if k.startswith("block_chunks.0.module.")}
    heads = _shape(sd, "block_chunks.0.module.0.sa.scale_mul_1H11", what)[1]
    return InfinityConfig(
        depth=len(chunks) * len(per), embed_dim=C, num_heads=heads,
        mlp_hidden=_shape(sd, "block_chunks.0.module.0.ffn.fc1.weight", what)[0],
        text_channels=Ct5, text_maxlen=512,  # the official loader pads/truncates cfg_uncond to 512 rows
        pool_heads=_shape(sd, "text_proj_for_sos.ca.mat_q", what)[1],
        d_vae=_shape(sd, "word_embed.weight", what)[1], block_chunks=len(chunks),
        num_levels=_shape(sd, "lvl_embed.weight", what)[0])


def _official_uncond_init(rows: int, Ct5: int) -> torch.Tensor:
    """The official constructor's cfg_uncond (trunc_normal std 1.2 from a CPU generator seeded 0,
    / sqrt(Ct5)): the rows a shorter released cfg_uncond is padded with on load."""
    t = torch.empty(rows, Ct5)
    torch.nn.init.trunc_normal_(t, std=1.2, generator=torch.Generator().manual_seed(0))
    return t / Ct5 ** 0.5


def fit_cfg_uncond(sd: Dict[str, torch.Tensor], maxlen: int = 512) -> Dict[str, torch.Tensor]:
    old = sd["cfg_uncond"]
    if old.shape[0] == maxlen or old.device.type == "meta":
        return sd
    sd = dict(sd)
    if old.shape[0] > maxlen:
        sd["cfg_uncond"] = old[:maxlen]
    else:
        sd["cfg_uncond"] = torch.cat([old.float(), _official_uncond_init(maxlen, old.shape[1])[old.shape[0]:]])
    return sd


def bsq_config_from_state_dict(sd: Dict[str, torch.Tensor], what: str = "the VAE") -> BSQVAEConfig:
    ch = _shape(sd, "encoder.conv_in.weight", what)[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    if not levels:
        raise CheckpointError(f"{what} has no 'encoder.down.*' keys: not a BSQ VAE checkpoint")
    mult = [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", what)[0] // ch for i in levels]
    blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
    d = _shape(sd, "encoder.conv_out.weight", what)[0]
    return BSQVAEConfig(codebook_dim=d, ch=ch, ch_mult=tuple(mult), num_res_blocks=len(blocks))


def normalize_vae_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official wrapper layout (`X.conv.weight` for a Conv wrapper, `X.norm.weight` for a
    GroupNorm wrapper) -> ours (`X.weight`); `quantize.*` (an alias of `quantizer.*`) dropped."""
    out = {}
    for k, v in sd.items():
        if k.startswith("quantize."):
            continue
        parts = k.split(".")
        if len(parts) >= 3 and parts[-2] in ("conv", "norm") and parts[-1] in ("weight", "bias") \
                and not (parts[-2] == "conv" and parts[-3] in ("downsample", "upsample")):
            k = ".".join(parts[:-2] + parts[-1:])
        out[k] = v
    return out


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path.name} safely (torch.load weights_only): {e}") from e


def _as_state_dict(obj, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict):  # a trainer checkpoint
        obj = obj["trainer"].get("gpt_fsdp", obj["trainer"].get("vae", obj))
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors")
    return obj


def _read_shards(index: Path) -> Dict[str, torch.Tensor]:
    """A sharded transformer folder (`model.safetensors.index.json` or `pytorch_model.bin.index.json`)."""
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from e
    sd = {}
    for name in files:
        p = index.parent / name
        if not p.exists():
            raise CheckpointError(f"{index.name} names {name}, which is not in {index.parent}")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd.update(load_file(str(p)))
        else:
            sd.update(_as_state_dict(_torch_load(p), p))
    return sd


@dataclass
class InfinityFiles:
    transformer: Path  # a .pth or a shard index
    vae: Path
    text_encoder: Optional[Path]  # a local T5 folder, if the weights folder has one


def find_infinity_files(folder: Path) -> InfinityFiles:
    """Which file is what, by content (never by name): the VAE .pth holds {"vae": ...}; the
    transformer .pth (or shard index, here or one folder down) holds cfg_uncond and block_chunks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such folder: {folder}")
    vae = transformer = t5 = None
    candidates = sorted(folder.glob("*.pth")) + sorted(folder.glob("*/*.index.json")) + sorted(folder.glob("*.index.json"))
    for p in candidates:
        if p.name.endswith(".index.json"):
            transformer = transformer or p
            continue
        obj = _torch_load(p)
        if isinstance(obj, dict) and isinstance(obj.get("vae"), dict):
            vae = vae or p
        elif isinstance(obj, dict) and ("cfg_uncond" in obj or isinstance(obj.get("trainer"), dict)):
            transformer = transformer or p
    for sub in sorted(folder.iterdir()):
        cfg = sub / "config.json"
        if sub.is_dir() and cfg.exists():
            try:
                if json.loads(cfg.read_text()).get("model_type") in ("t5", "umt5", "mt5"):
                    t5 = sub
            except (OSError, ValueError):
                pass
    if transformer is None or vae is None:
        found = ", ".join(p.name for p in candidates) or "no .pth files"
        raise CheckpointError(
            f"{folder} needs an Infinity transformer (e.g. infinity_2b_reg.pth, or a sharded folder with "
            f"model.safetensors.index.json) and its BSQ VAE (e.g. infinity_vae_d32reg.pth); found {found}")
    return InfinityFiles(transformer, vae, t5)


def is_infinity_folder(folder) -> bool:
    try:
        find_infinity_files(Path(folder))
        return True
    except CheckpointError:
        return False


def load_infinity_models(folder: Path, materialize: bool = True) -> Tuple[Infinity, BSQVAE, InfinityFiles]:
    files = find_infinity_files(folder)
    tp = files.transformer
    t_sd = _read_shards(tp) if tp.name.endswith(".index.json") else _as_state_dict(_torch_load(tp), tp)
    what_t = tp.name if not tp.name.endswith(".index.json") else tp.parent.name
    cfg = infinity_config_from_state_dict(t_sd, what_t)
    t_sd = fit_cfg_uncond(t_sd, cfg.text_maxlen)
    v_sd = normalize_vae_keys(_as_state_dict(_torch_load(files.vae)["vae"], files.vae))
    vcfg = bsq_config_from_state_dict(v_sd, files.vae.name)
    if cfg.d_vae not in (vcfg.codebook_dim, 4 * vcfg.codebook_dim):
        raise CheckpointError(f"{files.vae.name} has {vcfg.codebook_dim} bits per position, which does not fit "
                              f"{what_t} ({cfg.d_vae} bits per token)")
    mask_key = "quantizer.lfq.mask"
    if mask_key in v_sd and v_sd[mask_key].device.type != "meta" and v_sd[mask_key].numel() != vcfg.codebook_dim:
        raise CheckpointError(f"{files.vae.name}: {mask_key} has {v_sd[mask_key].numel()} bits, conv_out {vcfg.codebook_dim}")
    with torch.device("meta"):
        model, vae = Infinity(cfg), BSQVAE(vcfg)
    optional = ("zero_k_bias", "quantizer.lfq.mask")
    if not materialize:
        check_state_dict(model, t_sd, what_t, optional)
        check_state_dict(vae, v_sd, files.vae.name, optional)
        return model, vae, files
    model, vae = model.to_empty(device="cpu"), vae.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "zero_k_bias"):
            m.zero_k_bias.zero_()
    vae.quantizer.lfq.mask.copy_(2 ** torch.arange(vcfg.codebook_dim - 1, -1, -1))
    load_into(model, t_sd, what_t, optional)
    load_into(vae, v_sd, files.vae.name, optional)
    for name, m in model.named_modules():
        if hasattr(m, "zero_k_bias") and m.zero_k_bias.abs().max() != 0:
            raise CheckpointError(f"{what_t}: {name}.zero_k_bias is not zero")
    return model.eval(), vae.eval(), files


# ---------------------------------------------------------------------------------------------
# the text encoder (flan-t5-xl's encoder through transformers)

DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "owner/name" or "name"


def hub_offline() -> bool:
    """The Hugging Face hub may not be reached (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class TextEncoder:
    """T5 encoder features of prompts, as the official encode_prompt: max_length 512, padding to
    max_length, truncation; `last_hidden_state.float()`; cached per prompt (the valid rows only)."""

    def __init__(self, source: Union[str, Path], device="cpu", dtype: Optional[torch.dtype] = None):
        self.source = str(source)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = self.model = None
        self.cache: Dict[str, torch.Tensor] = {}
        self.offload = False  # keep the encoder in CPU memory, on the device only while encoding

    def load(self):
        if self.model is not None:
            return
        from transformers import AutoTokenizer, T5EncoderModel
        local = Path(os.path.expanduser(self.source)).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, legacy=True)
            self.model = T5EncoderModel.from_pretrained(self.source, dtype=self.dtype)
        except Exception as e:
            where = "the folder" if local else "the Hugging Face hub (offline?)"
            raise UserError(
                f"cannot load the text encoder '{self.source}' from {where}: {type(e).__name__}: {e}. "
                f"Download {DEFAULT_TEXT_ENCODER} on a connected machine and pass its folder "
                f"(text_encoder=... / --text-encoder), or give prompt_embeds") from e
        self.tokenizer.model_max_length = 512
        self.model.to("cpu" if self.offload else self.device).eval().requires_grad_(False)

    def check(self) -> str:
        """Fail now, in words, when the encoder cannot be had (it loads at the first prompt; a server
        checks at start): a folder must exist and hold a transformers config; a hub id must be in the
        local Hugging Face cache when the hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE).
        Returns where it will come from, in words."""
        if self.model is not None:
            return f"{self.source} (loaded)"
        path = Path(os.path.expanduser(self.source))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"the text encoder folder {path} has no config.json: give the folder of a T5 encoder "
                                f"({DEFAULT_TEXT_ENCODER} saved with transformers) or its hub id")
            return f"the folder {path}"
        if not _HUB_ID.match(self.source) or path.exists():
            raise UserError(f"the text encoder {self.source!r} is not a folder (no such folder) nor a hub id; give the "
                            f"folder of {DEFAULT_TEXT_ENCODER} (a T5 encoder saved with transformers) or its hub id")
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = isinstance(try_to_load_from_cache(self.source, "config.json"), str)
        except Exception:  # an unusual cache: the first prompt's load says what is wrong
            cached = False
        if cached:
            return f"{self.source} from the local Hugging Face cache"
        if hub_offline():
            raise UserError(f"the text encoder {self.source} is no folder here, and as a hub id it is not in the local "
                            "Hugging Face cache while the hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): "
                            f"download {self.source} on a connected machine (huggingface-cli download ...) and pass "
                            "its folder with --text-encoder, or allow the download")
        return f"{self.source}, downloaded from the Hugging Face hub at the first prompt"

    @torch.no_grad()
    def features(self, prompt: str) -> torch.Tensor:
        """(len, Ct5) float32 on the CPU."""
        if prompt not in self.cache:
            self.load()
            tok = self.tokenizer(text=[prompt], max_length=512, padding="max_length", truncation=True,
                                 return_tensors="pt")
            ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
            if self.offload:
                self.model.to(self.device)
            try:
                feat = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()
            finally:
                if self.offload and self.device.type != "cpu":
                    self.model.to("cpu")
                    torch.cuda.empty_cache()
            n = int(mask.sum())
            self.cache[prompt] = feat[0, :n].cpu()
        return self.cache[prompt]

    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (B, L, Ct5) float32 zero-padded, (B, L) bool prefix masks."""
        return pad_features([self.features(p) for p in prompts])


def pad_features(feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(f.shape[0] for f in feats)
    emb = torch.zeros(len(feats), L, feats[0].shape[1])
    mask = torch.zeros(len(feats), L, dtype=torch.bool)
    for i, f in enumerate(feats):
        emb[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = True
    return emb, mask


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class InfinityOutput:
    images: Union[List[Image.Image], np.ndarray, torch.Tensor]
    tokens: List[torch.Tensor]  # per scale (B, h, w, d) int64 bit labels (VAE space), on the CPU
    prompts: List[str] = field(default_factory=list)
    height: int = 0
    width: int = 0
    stopped_early: bool = False
    timings: dict = field(default_factory=dict)  # seconds: per_scale, decode, total
    # an in-/out-painting (and its re-rolls): where the edit is, for a re-roll that keeps the rest
    # (InpaintPlan: the picture it was pasted over, the feathered paste-back weights, the regenerated
    # latent cells at the last scale; .record() goes into the PNG, InpaintPlan.from_record reads it)
    edit: Optional[InpaintPlan] = None


PerScale = Union[float, Sequence[float]]


class InfinityPipeline:
    def __init__(self, model: Infinity, vae: BSQVAE, text_encoder: Optional[Union[str, Path, TextEncoder]] = None,
                 device="cpu", dtype: torch.dtype = torch.float32, source: str = "", default_pn: Optional[str] = None):
        d = vae.cfg.codebook_dim
        if model.cfg.d_vae not in (d, 4 * d):
            raise ValueError(f"transformer bits {model.cfg.d_vae} do not fit the VAE's {d}")
        self.model, self.vae = model.eval(), vae.eval()
        for p in list(model.parameters()) + list(vae.parameters()):
            p.requires_grad_(False)
        self.patchify = model.cfg.d_vae == 4 * d  # the 8B: 2x2 latent positions per token
        if self.patchify and vae.cfg.patch_size != 8:
            raise ValueError(f"a patchified transformer needs a VAE of patch 8, got {vae.cfg.patch_size}")
        if not self.patchify and vae.cfg.patch_size != 16:
            raise ValueError(f"this transformer needs a VAE of patch 16, got {vae.cfg.patch_size}")
        self.source = source
        # the 125M (layer12) was trained at 256 px; the released 2B/8B at 1M pixels
        self.default_pn = default_pn or ("0.06M" if model.cfg.embed_dim <= 1024 else "1M")
        self.device, self.dtype = torch.device("cpu"), torch.float32
        if text_encoder is None or isinstance(text_encoder, TextEncoder):
            self.text_encoder = text_encoder
        else:
            self.text_encoder = TextEncoder(text_encoder)
        self.to(device, dtype)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], device="cpu", dtype: Optional[torch.dtype] = None,
                        text_encoder: Optional[Union[str, Path]] = None, pn: Optional[str] = None) -> "InfinityPipeline":
        """A folder with the released transformer (`infinity_2b_reg.pth`, or a sharded folder) and
        BSQ VAE (`infinity_vae_d32reg.pth` / `infinity_vae_d56_f8_14_patchify.pth`). The text encoder:
        `text_encoder` (a folder or a hub id), else a T5 folder inside `folder`, else
        google/flan-t5-xl from the hub when first needed (not needed with prompt_embeds).
        dtype: None = float32 (faithful); bfloat16/float16 run the blocks under autocast (GPU)."""
        model, vae, files = load_infinity_models(Path(os.path.expanduser(str(folder))))
        te = text_encoder or files.text_encoder or DEFAULT_TEXT_ENCODER
        return cls(model, vae, te, device, dtype or torch.float32, str(folder), pn)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "InfinityPipeline":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
            self.dtype = dtype
        self.model.to(self.device)
        self.model.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        self.vae.to(self.device)
        if self.text_encoder is not None:
            self.text_encoder.device = self.device
            if self.text_encoder.model is not None and not self.text_encoder.offload:
                self.text_encoder.model.to(self.device)
        return self

    def enable_text_encoder_offload(self) -> "InfinityPipeline":
        """Keep flan-t5-xl (about 5 GB in fp16) in CPU memory and move it to the GPU only while it
        encodes a new prompt (prompts are cached), for GPUs that cannot hold it beside the model."""
        if self.text_encoder is None:
            raise UserError("this pipeline has no text encoder")
        self.text_encoder.offload = True
        if self.text_encoder.model is not None:
            self.text_encoder.model.to("cpu")
        return self

    # -- properties ----------------------------------------------------------------------------
    @property
    def bits_per_position(self) -> int:
        return self.vae.cfg.codebook_dim

    def default_sampling(self) -> dict:
        """The official defaults: 2B cfg 3, tau 0.5 (gen_one_img top_k 900, top_p 0.97); 8B tau 1.0."""
        return dict(guidance_scale=3.0, tau=1.0 if self.patchify else 0.5, top_k=900, top_p=0.97)

    def schedule(self, height=None, width=None, aspect_ratio=None, pn=None) -> Schedule:
        return find_schedule(height, width, aspect_ratio, pn or self.default_pn)

    def vae_scales(self, sched: Schedule) -> List[Tuple[int, int]]:
        f = 2 if self.patchify else 1
        return [(h * f, w * f) for h, w in sched.scales]

    # -- prompts -------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder is None:
            raise UserError("this pipeline has no text encoder: pass prompt_embeds, or load one (text_encoder=...)")
        return self.text_encoder.encode(list(prompts))

    # -- bits <-> images -----------------------------------------------------------------------
    def _schedule_of_size(self, H: int, W: int) -> Schedule:
        for s in all_sizes():
            if (s.height, s.width) == (H, W):
                return s
        raise UserError(f"{H}x{W} (height x width) is not one of Infinity's sizes")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, schedule: Optional[Schedule] = None) -> List[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] (a table size) -> bits per VAE scale, (B, h, w, d) int64."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError("encode takes a (B, 3, H, W) tensor in [-1, 1]")
        sched = schedule or self._schedule_of_size(*x.shape[-2:])
        bits = self.vae.encode_bits(x.to(self.device), self.vae_scales(sched))
        return [b.cpu() for b in bits]

    @torch.no_grad()
    def decode(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Bits per scale (all, or a coarse prefix) -> (B, 3, H, W) float in [-1, 1] at the last given
        scale's size times the VAE's patch."""
        return self.vae.decode_bits([b.to(self.device) for b in bits]).cpu()

    @torch.no_grad()
    def vae_images(self, summed_codes: torch.Tensor, output_type: str = "pil"):
        """A callback's running latent (ev.summed_codes) -> the picture so far (live scales)."""
        return im.tensor_to_output(self.vae.decode_latent(summed_codes), output_type)

    # -- generation ----------------------------------------------------------------------------
    def _per_scale(self, value, n: int, name: str, cast=float) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise UserError(f"{name} has {len(value)} values but this size has {n} scales")
            vals = [cast(v) for v in value]
        else:
            vals = [cast(value)] * n
        for v in vals:
            if not math.isfinite(v):
                raise UserError(f"{name} must be finite, got {v}")
        return vals

    def _text(self, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
              negative_prompt_attention_mask, num_images_per_prompt):
        prompts: List[str] = []
        if prompt_embeds is None:
            if prompt is None:
                raise UserError("give a prompt (or prompt_embeds)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or any(not isinstance(p, str) for p in prompts):
                raise UserError("prompt must be a string or a list of strings")
            emb, mask = self.encode_prompt(prompts)
        else:
            emb = prompt_embeds.float().cpu()
            mask = (torch.ones(emb.shape[:2], dtype=torch.bool) if prompt_attention_mask is None
                    else prompt_attention_mask.bool().cpu())
        if emb.ndim != 3 or emb.shape[-1] != self.model.cfg.text_channels or mask.shape != emb.shape[:2]:
            raise UserError(f"prompt features must be (B, L, {self.model.cfg.text_channels}) with a (B, L) mask, "
                            f"got {tuple(emb.shape)} and {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise UserError("every prompt needs at least one token")
        neg = neg_mask = None
        if negative_prompt_embeds is not None:
            neg = negative_prompt_embeds.float().cpu()
            neg_mask = (torch.ones(neg.shape[:2], dtype=torch.bool) if negative_prompt_attention_mask is None
                        else negative_prompt_attention_mask.bool().cpu())
        elif negative_prompt:
            negs = [negative_prompt] * emb.shape[0] if isinstance(negative_prompt, str) else list(negative_prompt)
            neg, neg_mask = self.encode_prompt(negs)
        if neg is not None and neg.shape[0] != emb.shape[0]:
            raise UserError(f"{neg.shape[0]} negative prompts for {emb.shape[0]} prompts")
        n = int(num_images_per_prompt)
        if n < 1:
            raise UserError(f"num_images_per_prompt must be at least 1, got {n}")
        if n > 1:
            emb, mask = emb.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            if neg is not None:
                neg, neg_mask = neg.repeat_interleave(n, 0), neg_mask.repeat_interleave(n, 0)
            prompts = [p for p in prompts for _ in range(n)]
        return emb, mask, neg, neg_mask, prompts

    def _generator(self, generator, batch: int):
        """The generator(s) on the model's device. A list has one generator per image (image i is then
        what it would be alone with generator[i]); one generator draws the whole batch (official)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise UserError(f"got {len(generator)} generators for {batch} images: give one per image "
                                "(or one for the batch)")
            return [self._generator(g, 1) for g in generator]
        if generator is not None and generator.device.type != self.device.type:
            return torch.Generator(self.device).manual_seed(generator.initial_seed())
        return generator

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, Sequence[str]]] = None,
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        guidance_scale: Optional[PerScale] = None,
        tau: Optional[PerScale] = None,
        top_k: Optional[Union[int, Sequence[int]]] = None,
        top_p: Optional[PerScale] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        aspect_ratio: Optional[Union[str, float]] = None,
        pn: Optional[str] = None,
        num_images_per_prompt: int = 1,
        generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
        output_type: str = "pil",
        callback_on_scale_end: Optional[Callable[[InfinityScaleEvent], Optional[bool]]] = None,
        known_bits: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
    ) -> InfinityOutput:
        """Generate images scale by scale.

        guidance_scale (cfg on the logits), tau (temperature), top_k, top_p (0 = off; with two
        choices per bit top_k 1 is greedy and >= 2 changes nothing): a number, or one value per
        scale. None takes the official defaults (default_sampling()). height/width: a size of the
        official table; or aspect_ratio ('16:9' = width:height, or h/w as a float) at `pn` (default
        the model's). generator: the official g_seed (CPU generator = the official CPU run: one
        generator draws the whole batch); or a list with one generator per image, as in diffusers:
        image i is then the image a run of it alone with generator[i] makes (the studio seeds image i
        of a batch with seed + i, so each can be made again by itself).
        callback_on_scale_end(event) after each scale; return True to stop.
        known_bits: per VAE scale None or (bits (B, h, w, d), keep (B or 1, h, w) bool): forced bits."""
        im.check_output_type(output_type)
        t0 = time.perf_counter()
        sched = self.schedule(height, width, aspect_ratio, pn)
        n = len(sched.scales)
        dflt = self.default_sampling()
        cfg = self._per_scale(dflt["guidance_scale"] if guidance_scale is None else guidance_scale, n, "guidance_scale")
        taus = self._per_scale(dflt["tau"] if tau is None else tau, n, "tau")
        if any(t <= 0 for t in taus):
            raise UserError("tau must be > 0")
        ks = self._per_scale(dflt["top_k"] if top_k is None else top_k, n, "top_k", cast=int)
        ps = self._per_scale(dflt["top_p"] if top_p is None else top_p, n, "top_p")
        if any(k < 0 for k in ks) or any(not 0 <= p <= 1 for p in ps):
            raise UserError("top_k must be >= 0 and top_p in [0, 1]")
        emb, mask, neg, neg_mask, prompts = self._text(prompt, negative_prompt, prompt_embeds, prompt_attention_mask,
                                                       negative_prompt_embeds, negative_prompt_attention_mask,
                                                       num_images_per_prompt)
        guided = any(g != 1 for g in cfg)
        dev = self.device
        text: TextCondition = self.model.prepare_text(
            emb.to(dev), mask.to(dev), guided, None if neg is None else neg.to(dev),
            None if neg_mask is None else neg_mask.to(dev))
        per_scale = []

        def on_scale(ev: InfinityScaleEvent):
            per_scale.append(ev.seconds)
            return callback_on_scale_end(ev) if callback_on_scale_end is not None else None

        gen = self._generator(generator, emb.shape[0])
        res = self.model.generate(text, sched.scales, sched.rope_full_hw, cfg, taus, ks, ps, gen,
                                  patchify=self.patchify, known=known_bits, callback=on_scale)
        t_dec = time.perf_counter()
        x = self.vae.decode_latent(res.summed_codes)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        return InfinityOutput(
            images=im.tensor_to_output(x, output_type), tokens=[b.cpu() for b in res.bits], prompts=prompts,
            height=sched.height, width=sched.width, stopped_early=res.stopped_early,
            timings={"per_scale": per_scale, "decode": t1 - t_dec, "total": t1 - t0})

    # -- editing (the studio's addition: the official code can only force whole scales) ---------
    def _sampling_kw(self, kw: dict) -> dict:
        bad = set(kw) - {"prompt", "negative_prompt", "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                         "negative_prompt_attention_mask", "guidance_scale", "tau", "top_k", "top_p",
                         "generator", "callback_on_scale_end", "num_images_per_prompt"}
        if bad:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(bad))}")
        return kw

    def fit_image(self, image, pn: Optional[str] = None) -> Tuple[np.ndarray, Schedule]:
        """A picture -> (float (H, W, 3) in [0, 1] at the table size nearest its aspect ratio, schedule)."""
        arr = im.to_float_rgb(image)
        sched = self.schedule(aspect_ratio=arr.shape[0] / arr.shape[1], pn=pn)
        return im.resize(arr, (sched.width, sched.height)), sched

    @staticmethod
    def keep_masks(regen: np.ndarray, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """The per-scale rule the studio uses for VAR (studio.editing.scale_keep_masks), for (h, w)
        scales: the keep mask of the last scale, bilinearly resized to each scale and thresholded at
        0.5; scales of at most 3 positions are always kept. -> per scale (1, h, w) bool."""
        keep = torch.from_numpy(~regen.astype(bool)).float()[None, None]
        out = []
        for h, w in sizes:
            if h * w <= 3:
                out.append(torch.ones(1, h, w, dtype=torch.bool))
            else:
                out.append(F.interpolate(keep, size=(h, w), mode="bilinear", align_corners=False)[0] > 0.5)
        return out

    @torch.no_grad()
    def inpaint(self, image, mask_image, mask_blur: int = 4, pn: Optional[str] = None, output_type: str = "pil",
                **kwargs) -> InfinityOutput:
        """Regenerate the white part of `mask_image` with the prompt: the image is resized to the table
        size nearest its aspect ratio and encoded; at every scale the bits whose cells lie outside the
        mask are forced to the image's, the rest are sampled; the result is pasted back as VAR's edits are
        (InpaintPlan.paste: its colours matched to the picture's along the mask's border, then a
        `mask_blur`-pixel feather; pixels farther than that from the mask are the input's exactly)."""
        kwargs = self._sampling_kw(kwargs)
        im.check_output_type(output_type)
        arr, sched = self.fit_image(image, pn)
        mask = im.binary(im.mask_to_array(mask_image, (im.to_float_rgb(image).shape[1], im.to_float_rgb(image).shape[0])))
        mask = im.binary(im.resize_nearest(mask, (sched.width, sched.height)))
        bits = self.encode(im.float_to_tensor(arr), sched)
        sizes = self.vae_scales(sched)
        H, W = sizes[-1]
        regen = (F.adaptive_avg_pool2d(torch.from_numpy(mask)[None, None], (H, W))[0, 0] > 1e-9).numpy()
        edit = InpaintPlan(arr, mask, im.feather(mask, mask_blur), None, arr, regen)
        return self._with_known(bits, self.keep_masks(regen, sizes), sched, edit, output_type, kwargs)

    def _with_known(self, bits, keeps, sched, edit: Optional[InpaintPlan], output_type, kwargs):
        n = int(kwargs.get("num_images_per_prompt", 1))
        prompts = kwargs.get("prompt")
        B = n * (len(prompts) if isinstance(prompts, (list, tuple)) else 1)
        if kwargs.get("prompt_embeds") is not None:
            B = n * kwargs["prompt_embeds"].shape[0]
        known = [(b.expand(B, *b.shape[1:]), k) if k is not None else None for b, k in zip(bits, keeps)]
        out = self(height=sched.height, width=sched.width, known_bits=known, output_type="np", **kwargs)
        if edit is not None:  # pasted over the picture as VAR's edits are: seam-matched, then the feathered blend
            out.images = np.stack([edit.paste(g) for g in out.images])
            out.edit = edit
        out.images = im.float_to_output(out.images.astype(np.float32), output_type)
        return out

    @torch.no_grad()
    def outpaint(self, image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, mask_blur: int = 4,
                 pn: Optional[str] = None, output_type: str = "pil", **kwargs) -> InfinityOutput:
        """Extend the picture by the given pixels on each side: the canvas (edges replicated) is
        in-painted where it is new, at the table size nearest the new aspect ratio."""
        if min(left, right, top, bottom) < 0 or left + right + top + bottom == 0:
            raise UserError("outpaint needs a positive number of pixels on at least one side")
        arr = im.to_float_rgb(image)
        canvas = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
        mask = np.ones(canvas.shape[:2], np.float32)
        mask[top:top + arr.shape[0], left:left + arr.shape[1]] = 0
        return self.inpaint(canvas, mask, mask_blur=mask_blur, pn=pn, output_type=output_type, **kwargs)

    @torch.no_grad()
    def reroll(self, tokens: Sequence[torch.Tensor], from_scale: int, output_type: str = "pil",
               edit: Optional[InpaintPlan] = None, **kwargs) -> InfinityOutput:
        """Keep the bits of scales < from_scale (a previous out.tokens) and sample the rest.

        edit: the result was an in- or out-painting (its `out.edit`, or InpaintPlan.from_record on the
        edited picture): every bit is kept up to from_scale, after it only those the edit kept (outside
        the painted area, the same per-scale rule), and the new picture is pasted over the edited one
        (seam-matched, with the edit's feathered mask), so outside the edit the pixels stay exactly as they are."""
        kwargs = self._sampling_kw(kwargs)
        H, W = tokens[-1].shape[1:3]
        f = self.vae.cfg.patch_size
        sched = self._schedule_of_size(H * f, W * f)
        if [tuple(t.shape[1:3]) for t in tokens] != self.vae_scales(sched):
            raise UserError("these bits are not a full pyramid of this model's schedule")
        if not 0 <= from_scale <= len(tokens):
            raise UserError(f"from_scale must be in 0..{len(tokens)}")
        sizes = self.vae_scales(sched)
        inside = [None] * len(sizes)  # the scales from from_scale on: sampled everywhere, or around the edit
        if edit is not None:
            if edit.regen.shape != sizes[-1] or edit.alpha.shape != (sched.height, sched.width):
                raise UserError(f"the edit stored with these bits is {edit.alpha.shape[1]}x{edit.alpha.shape[0]} px "
                                f"({edit.regen.shape[1]}x{edit.regen.shape[0]} cells), the bits are "
                                f"{sched.width}x{sched.height} px: not the same picture")
            inside = self.keep_masks(edit.regen, sizes)
        keeps = [torch.ones(1, h, w, dtype=torch.bool) if si < from_scale else inside[si]
                 for si, (h, w) in enumerate(sizes)]
        return self._with_known(list(tokens), keeps, sched, edit, output_type, kwargs)

    @torch.no_grad()
    def variations(self, image, keep_scales: int, pn: Optional[str] = None, output_type: str = "pil",
                   **kwargs) -> InfinityOutput:
        """Encode the picture and re-sample every scale from `keep_scales` on, with the prompt."""
        arr, sched = self.fit_image(image, pn)
        bits = self.encode(im.float_to_tensor(arr), sched)
        return self.reroll(bits, keep_scales, output_type=output_type, **kwargs)


# ---------------------------------------------------------------------------------------------
# a result's bit pyramid in a PNG (studio.pngmeta's token chunk), 8 bits a byte


def pack_bits(bits_per_scale: Sequence[torch.Tensor]) -> List[np.ndarray]:
    """One image's bits per scale, (h, w, d) 0/1 each -> uint8 arrays (np.packbits, row-major)."""
    return [np.packbits(b.cpu().numpy().astype(np.uint8).reshape(-1)) for b in bits_per_scale]


def unpack_bits(packed: Sequence[np.ndarray], sizes: Sequence[Sequence[int]], d: int) -> List[torch.Tensor]:
    """The inverse of pack_bits for scales `sizes` [(h, w), ...] of d bits: per scale (1, h, w, d) int64."""
    if len(packed) != len(sizes):
        raise UserError(f"the stored pyramid has {len(packed)} scales, its parameters {len(sizes)}")
    out = []
    for p, (h, w) in zip(packed, sizes):
        n = h * w * d
        flat = np.unpackbits(np.asarray(p, dtype=np.uint8))
        if flat.size < n:
            raise UserError("the stored bit pyramid is damaged")
        out.append(torch.from_numpy(flat[:n].astype(np.int64)).view(1, h, w, d))
    return out
