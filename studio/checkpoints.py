"""Loading and saving model weights: official VAR `.pth` folders, our safetensors bundles, hub ids.

Everything is strict: a checkpoint that does not fit the model exactly is refused with a message
that names the missing keys, the unexpected keys and the mismatched shapes. Official `.pth` files
are read with `torch.load(weights_only=True)`; the architecture (depth, width, shared AdaLN, scales,
VAE widths) is read from the tensors themselves, so no file names or flags have to agree.

Why not diffusers' ModelMixin / ConfigMixin / DiffusionPipeline for this plumbing:
- ModelMixin.from_pretrained is not strict: an unexpected key is a warning, a missing one a warning
  followed by "NotImplementedError: Cannot copy out of meta tensor" that names no key; we refuse
  with every missing / unexpected / mis-shaped key named (tests/test_checkpoints.py). It cannot read
  the official trainer .pth files or infer a config from their tensors, so load_official stays.
- its layout (model_index.json, one subfolder per component with config.json and
  diffusion_pytorch_model.safetensors) is not our bundle's (one config.json, vae/var/control_*/
  domain .safetensors side by side); the embedded bundle must keep loading as it is, so adopting
  it would add a second format to read, not remove one.
- ConfigMixin wants @register_to_config keyword constructors: VAR(cfg) would become VAR(**kwargs)
  everywhere and models/ would import diffusers, for what a dataclass's to_dict/from_dict does.
- DiffusionPipeline.to casts every component (our quantiser must stay float32, the decoder is
  channels-last), and enable_model_cpu_offload moves a component in its forward() pre-hook
  (accelerate CpuOffload): sampling runs through VAR.sample and the quantiser's methods, never
  VQVAE.forward, so the hooks would not fire.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from models.car import CAR, CARConfig
from models.controlvar import ControlVAR, ControlVARConfig, joint_levels_and_mask
from models.var import VAR, VARConfig, scale_levels_and_mask
from models.vqvae import VQVAE, VQVAEConfig

BUNDLE_FORMAT = "var-studio-bundle"
BUNDLE_VERSION = 1
OFFICIAL_VAE_FILE = "vae_ch160v4096z32.pth"
# buffers the models compute themselves; bundles need not store them
COMPUTED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model, with a readable reason."""


@dataclass
class LoadedModels:
    vae: VQVAE
    var: VAR
    class_names: List[str]
    source: str
    extras: Dict[str, object]


# ---------------------------------------------------------------------------------------------
# strict state-dict validation


def _clip(names: List[str], most: int = 12) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def check_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str,
                     optional: Tuple[str, ...] = ()) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the model's keys and shapes.

    Keys containing one of `optional` may be absent (the model keeps its own values)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not any(o in k for o in optional)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
              and k != "quantize.ema_vocab_hit_SV"]
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_clip(shapes, 6)}")
        raise CheckpointError("; ".join(parts))


def load_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str,
              optional: Tuple[str, ...] = ()) -> None:
    check_state_dict(model, state_dict, what, optional)
    own = model.state_dict()
    full = {k: (state_dict[k] if k in state_dict else own[k]) for k in own}
    full = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.load_state_dict(full, strict=True)


# ---------------------------------------------------------------------------------------------
# architecture from tensors


def var_config_from_state_dict(sd: Dict[str, torch.Tensor]) -> VARConfig:
    try:
        C = sd["class_emb.weight"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else C // 64
        levels = sd["lvl_1L"].view(-1).tolist()
        counts = [levels.count(i) for i in range(max(levels) + 1)]
        patch_nums = tuple(int(round(c ** 0.5)) for c in counts)
        if any(pn * pn != c for pn, c in zip(patch_nums, counts)):
            raise CheckpointError(f"lvl_1L does not describe square scales: {counts}")
        return VARConfig(
            vocab_size=sd["head.weight"].shape[0], z_channels=sd["word_embed.weight"].shape[1],
            num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C, num_heads=heads,
            mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C,
            shared_aln="shared_ada_lin.1.weight" in sd,
            attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd, patch_nums=patch_nums)
    except (KeyError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"not a VAR transformer checkpoint (cannot read its shape: {e!r})") from e


def vae_config_from_state_dict(sd: Dict[str, torch.Tensor], patch_nums) -> VQVAEConfig:
    try:
        V, Cvae = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        n_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        n_phi = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
        return VQVAEConfig(
            vocab_size=V, z_channels=Cvae, ch=ch, ch_mult=ch_mult, num_res_blocks=n_blocks,
            using_sa=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in sd,
            using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd, share_quant_resi=n_phi,
            patch_nums=tuple(patch_nums))
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a multi-scale VQVAE checkpoint (cannot read its shape: {e!r})") from e


def is_controlvar_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    """ControlVAR (lxa9867/ControlVAR): a condition-type table `cond_embed` next to VAR's keys, or (a
    file that lost it, refused by name later) the two-token start `pos_start` (1, 2, C)."""
    start = sd.get("pos_start")
    return "class_emb.weight" in sd and ("cond_embed.weight" in sd or (start is not None and start.ndim == 3
                                                                       and start.shape[1] == 2))


def controlvar_config_from_state_dict(sd: Dict[str, torch.Tensor], what: str = "checkpoint") -> ControlVARConfig:
    """The ControlVAR shape from its tensors: width, depth, classes, vocabulary, scales (lvl_1L counts
    both halves of a scale); attention follows the released rule (l2-normalised only at depth 30)."""
    try:
        C = sd["class_emb.weight"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        levels = sd["lvl_1L"].reshape(-1).tolist()
        counts = [levels.count(i) for i in range(max(levels) + 1)]
        patch_nums = tuple(int(round((c / 2) ** 0.5)) for c in counts)
        if any(2 * pn * pn != c for pn, c in zip(patch_nums, counts)):
            raise CheckpointError(f"{what}: lvl_1L does not describe [control; image] square scales: {counts}")
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else C // 64
        return ControlVARConfig(
            vocab_size=sd["head.weight"].shape[0], z_channels=sd["word_embed.weight"].shape[1],
            num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C, num_heads=max(heads, 1),
            mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C, shared_aln=False, attn_l2_norm=depth == 30,
            patch_nums=patch_nums,
            num_type_ids=sd["cond_embed.weight"].shape[0] if "cond_embed.weight" in sd else ControlVARConfig.num_type_ids)
    except (KeyError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{what} is not a ControlVAR checkpoint (cannot read its shape: {e!r})") from e


# ---------------------------------------------------------------------------------------------
# official .pth files


def torch_load(path: Path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise CheckpointError(f"cannot read {path.name}: {e}") from e
    # trainer checkpoints nest the model state dicts
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict):
        tr = obj["trainer"]
        obj = tr.get("var_wo_ddp", tr.get("vae_local", obj))
    # ControlVAR's trainer: {'model_state_dict': DDP state dict, 'optimizer_state_dict', 'epoch', 'step'}
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from a DDP-wrapped model
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors")
    return obj


def find_official_files(folder: Path, variant: Optional[str] = None) -> Tuple[Path, Path]:
    vae = folder / OFFICIAL_VAE_FILE
    if not vae.exists():
        cands = sorted(folder.glob("vae*.pth"))
        if len(cands) != 1:
            raise CheckpointError(f"{folder}: expected {OFFICIAL_VAE_FILE} (the official VQVAE) in the folder")
        vae = cands[0]
    # VAR's var_dNN.pth, or ControlVAR's dNN.pth (hub qiuk6/ControlVAR)
    vars_ = sorted((p for p in folder.glob("*.pth") if re.fullmatch(r"(var_)?d\d+", p.stem)),
                   key=lambda p: (int(re.findall(r"\d+", p.stem)[0]), p.name))
    if variant is not None:
        wants = [folder / f"var_{variant}.pth", folder / f"{variant}.pth"]
        found = [w for w in wants if w.exists()]
        if not found:
            raise CheckpointError(f"{folder}: no var_{variant}.pth or {variant}.pth (found: {[p.name for p in vars_]})")
        if len(found) > 1:
            raise CheckpointError(f"{folder}: both var_{variant}.pth (VAR) and {variant}.pth (ControlVAR); keep one "
                                  "per folder")
        return vae, found[0]
    if not vars_:
        raise CheckpointError(f"{folder}: no var_dNN.pth (VAR) or dNN.pth (ControlVAR) transformer checkpoint in the "
                              "folder")
    if len(vars_) > 1:
        raise CheckpointError(f"{folder}: several transformers ({', '.join(p.name for p in vars_)}); "
                              f"choose one with variant='d16' (or --model {folder}:d16)")
    return vae, vars_[0]


def load_official(folder: Path, variant: Optional[str] = None, materialize: bool = True) -> LoadedModels:
    """Build the models the files describe and load them strictly.

    materialize=False validates every key and shape on meta-device models without allocating
    the weights (a cheap check of a multi-GB checkpoint)."""
    vae_path, var_path = find_official_files(folder, variant)
    var_sd = torch_load(var_path)
    controlvar = is_controlvar_state_dict(var_sd)
    var_cfg = controlvar_config_from_state_dict(var_sd, var_path.name) if controlvar else var_config_from_state_dict(var_sd)
    vae_sd = torch_load(vae_path)
    vae_cfg = vae_config_from_state_dict(vae_sd, var_cfg.patch_nums)
    if vae_cfg.vocab_size != var_cfg.vocab_size or vae_cfg.z_channels != var_cfg.z_channels:
        raise CheckpointError(f"{vae_path.name} (vocab {vae_cfg.vocab_size}, {vae_cfg.z_channels} channels) does not "
                              f"fit {var_path.name} (vocab {var_cfg.vocab_size}, {var_cfg.z_channels} channels)")
    with torch.device("meta"):
        vae, var = VQVAE(vae_cfg), (ControlVAR(var_cfg) if controlvar else VAR(var_cfg))
    if not materialize:
        check_state_dict(vae, vae_sd, vae_path.name)
        check_state_dict(var, var_sd, var_path.name)
    else:
        vae, var = vae.to_empty(device="cpu"), var.to_empty(device="cpu")
        _reset_computed_buffers(vae, var)
        load_into(vae, vae_sd, vae_path.name)
        load_into(var, var_sd, var_path.name)
        _check_buffers(var, var_path.name)
    from studio.classes import class_names_for
    return LoadedModels(vae, var, class_names_for(var_cfg.num_classes), str(folder), {})


def _reset_computed_buffers(vae: VQVAE, var) -> None:
    """Models built on the meta device have empty buffers: recompute the ones we own."""
    lvl, mask = _levels_and_mask(var)
    var.lvl_1L.copy_(lvl)
    var.attn_bias_for_masking.copy_(mask)
    for blk in var.blocks:
        blk.attn.zero_k_bias.zero_()
    vae.quantize.ema_vocab_hit_SV.zero_()


def _levels_and_mask(var):
    if isinstance(var, ControlVAR):
        return joint_levels_and_mask(var.cfg.patch_nums)
    return scale_levels_and_mask(var.cfg.patch_nums)


def _check_buffers(var, what: str) -> None:
    lvl, expect = _levels_and_mask(var)
    if not torch.equal(var.attn_bias_for_masking, expect):
        raise CheckpointError(f"{what}: attn_bias_for_masking is not the block-causal mask of its scales")
    if not torch.equal(var.lvl_1L, lvl):
        raise CheckpointError(f"{what}: lvl_1L does not give each token its scale")
    if any(blk.attn.zero_k_bias.abs().max() != 0 for blk in var.blocks):
        raise CheckpointError(f"{what}: zero_k_bias is not zero")


# ---------------------------------------------------------------------------------------------
# CAR adapters (car_<type>_dNN.pth: a plain dict of the branch's `car*` keys)


def car_type_from_name(path: Path) -> str:
    m = re.fullmatch(r"car_([a-z]+)_d\d+", Path(path).stem)
    if m is None:
        raise CheckpointError(f"cannot tell the control type from the file name {Path(path).name} (expected "
                              "car_<type>_d16.pth); pass control_type=")
    return m.group(1)


def car_file_and_variant(source) -> Optional[Tuple[Path, str]]:
    """(path, "dNN") when `source` names an existing released CAR file (car_<type>_dNN.pth), else None."""
    path = Path(os.path.expanduser(str(source)))
    m = re.fullmatch(r"car_[a-z]+_(d\d+)", path.stem)
    if m is None or path.suffix != ".pth" or not path.is_file():
        return None
    return path, m.group(1)


def car_config_for(sd: Dict[str, torch.Tensor], var_cfg: VARConfig, control_type: str, what: str) -> CARConfig:
    """The CAR config of `sd` for the VAR `var_cfg`: the branch's shape is the VAR's (width, heads,
    depth/2 blocks); only the stem's widths are read from the file. A file made for another VAR is
    refused here, with both depths named."""
    try:
        C = sd["car_var_conv.weight"].shape[0]
        n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"car_blocks\.(\d+)\.", k)))
        stem = [sd["car_control_convs.conv_in.weight"]]
        stem += [sd[f"car_control_convs.blocks.{i}.weight"] for i in range(1, 64, 2)
                 if f"car_control_convs.blocks.{i}.weight" in sd]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what} is not a CAR adapter (cannot read its shape: {e!r})") from e
    if (C, 2 * n_blocks) != (var_cfg.embed_dim, var_cfg.depth):
        raise CheckpointError(
            f"{what} is a CAR adapter for a VAR of depth {2 * n_blocks} (width {C}: car_var_conv.weight "
            f"{tuple(sd['car_var_conv.weight'].shape)}, {n_blocks} car_blocks); the loaded VAR is d{var_cfg.depth} "
            f"(width {var_cfg.embed_dim}). Load the VAR it was made for (var_d{2 * n_blocks}.pth).")
    return CARConfig.for_var(var_cfg, control_type, in_channels=stem[0].shape[1],
                             stem_widths=tuple(w.shape[0] for w in stem))


def load_car(path: Path, var_cfg: VARConfig, control_type: Optional[str] = None, materialize: bool = True) -> CAR:
    """A released CAR file for the VAR `var_cfg`, loaded strictly (weights_only). materialize=False
    checks every key and shape on a meta-device branch without allocating it."""
    path = Path(path)
    control_type = control_type or car_type_from_name(path)
    sd = torch_load(path)
    cfg = car_config_for(sd, var_cfg, control_type, path.name)
    with torch.device("meta"):
        car = CAR(cfg)
    check_state_dict(car, sd, path.name)
    if not materialize:
        return car
    car = car.to_empty(device="cpu")
    for blk in car.car_blocks:
        blk.attn.zero_k_bias.zero_()
    load_into(car, sd, path.name)
    if any(blk.attn.zero_k_bias.abs().max() != 0 for blk in car.car_blocks):
        raise CheckpointError(f"{path.name}: zero_k_bias is not zero")
    return car.eval()


# ---------------------------------------------------------------------------------------------
# our bundles: config.json + vae.safetensors + var.safetensors (+ extras)


def save_bundle(folder: Path, vae: VQVAE, var: VAR, class_names: List[str], dtype=torch.float16,
                extra_config: Optional[dict] = None, extra_tensors: Optional[Dict[str, Dict[str, torch.Tensor]]] = None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)

    def pack(sd):
        return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
                for k, v in sd.items() if not any(b in k for b in COMPUTED_BUFFERS)}

    save_file(pack(vae.state_dict()), str(folder / "vae.safetensors"))
    save_file(pack(var.state_dict()), str(folder / "var.safetensors"))
    for name, sd in (extra_tensors or {}).items():
        save_file(pack(sd), str(folder / f"{name}.safetensors"))
    cfg = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "vae": vae.cfg.to_dict(), "var": var.cfg.to_dict(),
           "class_names": list(class_names), "dtype": str(dtype).replace("torch.", "")}
    cfg.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def read_bundle_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot read config.json ({e})") from e
    if cfg.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{folder}/config.json is not a {BUNDLE_FORMAT} config")
    if int(cfg.get("version", 0)) > BUNDLE_VERSION:
        raise CheckpointError(f"{folder} is a bundle of version {cfg['version']}; this studio reads up to {BUNDLE_VERSION}")
    return cfg


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path.name}: {e}") from e


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Each tensor's shape from a .safetensors file's header alone (nothing is loaded)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path.name}: {e}") from e


def check_bundle_config(folder: Path, cfg: dict) -> Tuple[VQVAEConfig, VARConfig]:
    """The bundle's configs, checked against the weights' shapes (from the safetensors headers)
    before any model is built: a config.json that does not describe its weights (patch_nums 1..199
    once asked for 7 TB of attention mask) is refused with what differs."""
    try:
        vae_cfg, var_cfg = VQVAEConfig(**cfg["vae"]), VARConfig(**cfg["var"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder.name}/config.json: its vae / var settings cannot be read ({e})") from e
    var_shapes = safetensors_shapes(folder / "var.safetensors")
    vae_shapes = safetensors_shapes(folder / "vae.safetensors")
    pn = var_cfg.patch_nums
    if not pn or any(not 1 <= p <= 1024 for p in pn) or list(pn) != sorted(set(pn)):
        raise CheckpointError(f"{folder.name}/config.json: patch_nums must rise from 1 (at most 1024), got {list(pn)}")
    C, L = var_cfg.embed_dim, sum(p * p for p in pn)
    depth = len({m.group(1) for k in var_shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    expect = [("var", var_shapes, "pos_1LC", (1, L, C), f"sum of patch_nums² = {L}, embed_dim = {C}"),
              ("var", var_shapes, "lvl_embed.weight", (len(pn), C), f"{len(pn)} scales"),
              ("var", var_shapes, "class_emb.weight", (var_cfg.num_classes + 1, C), "num_classes + 1"),
              ("var", var_shapes, "head.weight", (var_cfg.vocab_size, C), "vocab_size"),
              ("var", var_shapes, "word_embed.weight", (C, var_cfg.z_channels), "z_channels"),
              ("vae", vae_shapes, "quantize.embedding.weight", (vae_cfg.vocab_size, vae_cfg.z_channels),
               "vocab_size, z_channels")]
    for part, shapes, key, want, why in expect:
        if shapes.get(key) != want:
            raise CheckpointError(f"{folder.name}/config.json does not match {part}.safetensors: {key} would be "
                                  f"{want} ({why}) but the weights hold {shapes.get(key, 'nothing')}")
    if depth != var_cfg.depth:
        raise CheckpointError(f"{folder.name}/config.json says depth {var_cfg.depth} but var.safetensors holds "
                              f"{depth} blocks")
    return vae_cfg, var_cfg


def load_bundle(folder: Path) -> LoadedModels:
    cfg = read_bundle_config(folder)
    vae_cfg, var_cfg = check_bundle_config(folder, cfg)
    vae = VQVAE(vae_cfg)
    var = VAR(var_cfg)
    load_into(vae, read_safetensors(folder / "vae.safetensors"), f"{folder.name}/vae.safetensors", COMPUTED_BUFFERS)
    load_into(var, read_safetensors(folder / "var.safetensors"), f"{folder.name}/var.safetensors", COMPUTED_BUFFERS)
    names = cfg.get("class_names") or [f"class {i}" for i in range(var.cfg.num_classes)]
    if len(names) != var.cfg.num_classes:
        raise CheckpointError(f"{folder}: {len(names)} class names for {var.cfg.num_classes} classes")
    return LoadedModels(vae, var, names, str(folder), {"config": cfg})


# ---------------------------------------------------------------------------------------------
# entry point


def default_bundle_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "default"


def resolve_and_load(source: Optional[str] = None, variant: Optional[str] = None) -> LoadedModels:
    """A folder (official files or a bundle), `folder:d16`, a hub id, or None for the default."""
    if source is None:
        path = default_bundle_path()
        if not (path / "config.json").exists():
            raise CheckpointError(f"the embedded default model is not in {path}; pass a folder of weights")
        return load_bundle(path)
    source = str(source)
    if variant is None and re.search(r":d\d+$", source) and not Path(source).exists():
        source, variant = source.rsplit(":", 1)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if (path / "config.json").exists():
            return load_bundle(path)
        return load_official(path, variant)
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the folder that holds the weights")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return load_official(download_from_hub(source, variant), variant)
    raise CheckpointError(f"no such folder: {source}")


def download_from_hub(repo_id: str, variant: Optional[str]) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a requirement
        raise CheckpointError("huggingface_hub is not installed; pass a local folder") from e
    try:
        if variant is None:
            return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.pth"]))
        vae = hf_hub_download(repo_id, OFFICIAL_VAE_FILE)
        hf_hub_download(repo_id, f"var_{variant}.pth")
        return Path(vae).parent
    except Exception as e:
        raise CheckpointError(
            f"could not get '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {e}). Offline? Download "
            f"{OFFICIAL_VAE_FILE} and var_dNN.pth on a connected machine and pass their folder instead.") from e
