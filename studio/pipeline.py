"""VARPipeline: the one Python API over a VQVAE + VAR transformer pair.

    pipe = VARPipeline.from_pretrained("weights/")            # official .pth folder, a bundle, a hub id
    out = pipe(class_labels=[980], generator=torch.Generator().manual_seed(0))
    out.images[0].save("volcano.png"); out.tokens  # one (B, pn*pn) int64 tensor per scale

Conventions follow diffusers where the concept exists (generator, output_type, callbacks,
save_pretrained); VAR concepts keep VAR names (scales, top_k, top_p, more_smooth).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from models.var import VAR, SampleResult, ScaleEvent
from models.vqvae import VQVAE
from studio import checkpoints

ClassLabel = Union[int, str]


@dataclass
class VAROutput:
    images: Union[List[Image.Image], np.ndarray, torch.Tensor]
    tokens: List[torch.Tensor]  # per scale (B, pn*pn) int64 on the CPU: the tokens actually used
    class_labels: List[int] = field(default_factory=list)
    stopped_early: bool = False  # a callback stopped the run; images show the scales made so far
    timings: dict = field(default_factory=dict)  # seconds: per scale, decode, total


class VARPipeline:
    def __init__(self, vae: VQVAE, var: VAR, class_names: Sequence[str], device="cpu", dtype=torch.float32,
                 source: str = "", extras: Optional[dict] = None):
        if tuple(vae.cfg.patch_nums) != tuple(var.cfg.patch_nums):
            raise ValueError(f"VQVAE scales {vae.cfg.patch_nums} differ from the transformer's {var.cfg.patch_nums}")
        self.vae, self.var = vae.eval(), var.eval()
        for p in list(vae.parameters()) + list(var.parameters()):
            p.requires_grad_(False)
        self.class_names = list(class_names)
        self.source = source
        self.extras = extras or {}
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.to(device, dtype)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: Optional[Union[str, Path]] = None, device="cpu",
                        dtype: Optional[torch.dtype] = None, variant: Optional[str] = None) -> "VARPipeline":
        """Load official weights (a folder with vae_ch160v4096z32.pth + var_dNN.pth), one of our bundles
        (config.json + safetensors), a hub id, or with no argument the embedded default model.

        dtype: None means float32 (faithful); bfloat16 (CPU or GPU) or float16 (GPU) trade exactness
        for speed. The quantiser and f_hat always stay in float32."""
        loaded = checkpoints.resolve_and_load(None if path_or_hub_id is None else str(path_or_hub_id), variant)
        return cls(loaded.vae, loaded.var, loaded.class_names, device, dtype or torch.float32, loaded.source,
                   loaded.extras)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "VARPipeline":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
            if dtype == torch.float16 and self.device.type == "cpu":
                raise ValueError("float16 is for GPUs; on the CPU use bfloat16")
            self.dtype = dtype
        self.var.to(self.device, self.dtype)
        self.vae.to(self.device, self.dtype)
        # channels-last convolutions make the decoder ~12% faster on CPU (python -m studio.bench);
        # the encoder keeps the standard layout: its exact fp32 rounding decides argmin ties
        self.vae.decoder.to(memory_format=torch.channels_last)
        self.vae.quantize.float()  # codebook distances and f_hat accumulate in fp32
        return self

    def save_pretrained(self, folder: Union[str, Path], dtype: torch.dtype = torch.float16) -> None:
        """Write our bundle format: config.json + vae.safetensors + var.safetensors (fp16 by default)."""
        checkpoints.save_bundle(Path(folder), self.vae, self.var, self.class_names, dtype)

    # -- properties -----------------------------------------------------------------------------
    @property
    def patch_nums(self):
        return self.var.cfg.patch_nums

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def resolution(self) -> int:
        return self.vae.cfg.resolution

    @property
    def num_classes(self) -> int:
        return self.var.cfg.num_classes

    # -- inputs ---------------------------------------------------------------------------------
    def class_index(self, label: ClassLabel) -> int:
        """A class id, a negative int (unconditional), or a class name (case-insensitive)."""
        if isinstance(label, (bool, np.bool_)):
            raise ValueError(f"class label must be an int or a class name, not {label!r}")
        if isinstance(label, (int, np.integer)):
            label = int(label)
            if label < 0:
                return self.num_classes  # the null class: unconditional
            if label > self.num_classes:
                raise ValueError(f"class {label} is out of range: this model has classes 0..{self.num_classes - 1}")
            return label
        if isinstance(label, str):
            key = label.strip().lower()
            for i, name in enumerate(self.class_names):
                if name.lower() == key:
                    return i
            close = [n for n in self.class_names if key and key in n.lower()][:5]
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown class name {label!r}{hint}")
        raise ValueError(f"class label must be an int or a class name, not {type(label).__name__}")

    def _labels(self, class_labels, num_images_per_label: int, generator) -> torch.Tensor:
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be at least 1, got {num_images_per_label}")
        if class_labels is None:  # random classes, drawn like the reference sampler does
            probs = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=self.device)
            return torch.multinomial(probs, num_images_per_label, replacement=True, generator=generator).view(-1)
        if isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        labels = [self.class_index(c) for c in class_labels]
        if not labels:
            raise ValueError("class_labels is empty")
        return torch.tensor(labels, device=self.device).repeat_interleave(num_images_per_label)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), uint8/float arrays or a tensor -> (B, 3, R, R) float in [-1, 1] on the device.

        PIL and numpy inputs of any size and mode are converted to RGB and resized to the model's
        resolution; tensors must already be (B, 3, R, R) in [-1, 1]."""
        R = self.resolution
        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images[None]
            if x.shape[1:] != (3, R, R):
                raise ValueError(f"image tensor must be (B, 3, {R}, {R}) in [-1, 1], got {tuple(x.shape)}")
            return x.to(self.device, torch.float32)
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        out = []
        for im in images:
            if isinstance(im, np.ndarray):
                arr = im if im.dtype == np.uint8 else (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
                im = Image.fromarray(arr)
            if not isinstance(im, Image.Image):
                raise ValueError(f"expected PIL images, arrays or a tensor, got {type(im).__name__}")
            im = to_rgb(im)
            if im.size != (R, R):
                im = im.resize((R, R), Image.Resampling.LANCZOS)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        if not out:
            raise ValueError("no images given")
        return torch.stack(out).to(self.device)

    # -- tokens <-> images ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> List[torch.Tensor]:
        """Images -> token maps, one (B, pn*pn) int64 tensor per scale (on the CPU)."""
        return [t.cpu() for t in self.vae.img_to_tokens(self.preprocess(images))]

    @torch.no_grad()
    def decode(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token maps (all scales, or a coarse prefix) -> (B, 3, R, R) float in [-1, 1] (CPU)."""
        self._check_tokens(tokens, allow_prefix=True)
        return self.vae.tokens_to_img([t.to(self.device) for t in tokens]).cpu()

    def _check_tokens(self, tokens, allow_prefix=False):
        if not allow_prefix and len(tokens) != self.num_scales or not tokens or len(tokens) > self.num_scales:
            raise ValueError(f"expected token maps for {self.num_scales} scales, got {len(tokens)}")
        V = self.var.cfg.vocab_size
        for si, t in enumerate(tokens):
            pn = self.patch_nums[si]
            if t.ndim != 2 or t.shape[1] != pn * pn:
                raise ValueError(f"scale {si}: token map must be (B, {pn * pn}), got {tuple(t.shape)}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
                raise ValueError(f"scale {si}: token ids must be in 0..{V - 1}")

    @torch.no_grad()
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(f_hat)

    def postprocess(self, images_m11: torch.Tensor, output_type: str = "pil"):
        x = images_m11.float().add(1).mul_(0.5).clamp_(0, 1)  # [0, 1]
        if output_type == "pt":
            return x.cpu()
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        if output_type == "pil":
            return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[ClassLabel, Sequence[ClassLabel]]] = None,
        guidance_scale: Union[float, Sequence[float]] = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        more_smooth: bool = False,
        generator: Optional[torch.Generator] = None,
        num_images_per_label: int = 1,
        callback_on_scale_end: Optional[Callable[[ScaleEvent], Optional[bool]]] = None,
        output_type: str = "pil",
        known_tokens: Optional[Sequence[Optional[torch.Tensor]]] = None,
        known_mask: Optional[Sequence[Optional[torch.Tensor]]] = None,
        use_kv_cache: bool = True,
    ) -> VAROutput:
        """Generate images scale by scale.

        guidance_scale: classifier-free guidance; a float g ramps linearly from 0 at the first
            scale to g at the last (the published schedule), a list gives the weight per scale.
        top_k / top_p: keep the k most likely tokens / the nucleus of mass top_p (0 = off).
        more_smooth: feed Gumbel-softmax soft codes instead of hard tokens (smoother images).
        callback_on_scale_end: called with a ScaleEvent after every scale; return True to stop.
        known_tokens / known_mask: per scale (B, pn*pn) tokens and bool masks (True = keep) that
            are forced in place of the sampled ones (editing, variations, re-roll).
        """
        self._check_sampling_args(guidance_scale, top_k, top_p)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        t_start = time.perf_counter()
        labels = self._labels(class_labels, num_images_per_label, generator)
        B = labels.shape[0]
        known_tokens, known_mask = self._check_known(known_tokens, known_mask, B)
        per_scale = []

        def on_scale(ev: ScaleEvent):
            per_scale.append(ev.seconds)
            if callback_on_scale_end is not None:
                return callback_on_scale_end(ev)
            return None

        res: SampleResult = self.var.sample(
            self.vae.quantize, labels, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
            more_smooth=more_smooth, generator=generator, callback=on_scale, known_tokens=known_tokens,
            known_mask=known_mask, use_kv_cache=use_kv_cache)
        t_dec = time.perf_counter()
        images = self.vae.fhat_to_img(res.f_hat)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        return VAROutput(
            images=self.postprocess(images, output_type), tokens=[t.cpu() for t in res.tokens],
            class_labels=labels.tolist(), stopped_early=res.stopped_early,
            timings={"per_scale": per_scale, "decode": t_end - t_dec, "total": t_end - t_start})

    def _check_sampling_args(self, guidance_scale, top_k, top_p):
        if isinstance(guidance_scale, (int, float)):
            if not np.isfinite(guidance_scale) or guidance_scale < 0:
                raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        else:
            self.var.guidance_per_scale(guidance_scale)  # checks the length
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        if not 0.0 <= float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p}")

    def _check_known(self, known_tokens, known_mask, B):
        if known_tokens is None:
            if known_mask is not None:
                raise ValueError("known_mask given without known_tokens")
            return None, None
        if len(known_tokens) > self.num_scales:
            raise ValueError(f"known_tokens has {len(known_tokens)} scales; the model has {self.num_scales}")
        toks, masks = [], []
        for si in range(self.num_scales):
            t = known_tokens[si] if si < len(known_tokens) else None
            if t is None:
                toks.append(None)
                masks.append(None)
                continue
            pn = self.patch_nums[si]
            t = t.to(self.device).long().reshape(-1, pn * pn)
            if t.shape[0] == 1 and B > 1:
                t = t.expand(B, -1)
            if t.shape[0] != B:
                raise ValueError(f"known_tokens[{si}] has batch {t.shape[0]}, the run has {B} images")
            m = None if known_mask is None or si >= len(known_mask) else known_mask[si]
            m = torch.ones_like(t, dtype=torch.bool) if m is None else m.to(self.device).bool().reshape(-1, pn * pn)
            if m.shape[0] == 1 and B > 1:
                m = m.expand(B, -1)
            if m.shape != t.shape:
                raise ValueError(f"known_mask[{si}] has shape {tuple(m.shape)}, expected {tuple(t.shape)}")
            toks.append(t)
            masks.append(m)
        return toks, masks


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")
