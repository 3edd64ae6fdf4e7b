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
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from models.car import CAR, CARHook
from models.control import Control, ControlAdapter, ControlConfig, ControlHook, active_scales
from models.controlvar import CONTROL_TYPE_IDS, ControlVAR
from models.var import VAR, RowGroup, SampleResult, ScaleEvent
from models.vqvae import VQVAE
from studio import checkpoints, editing, params, preprocess, preview
from studio import images as im
from studio.params import CONTROLVAR_DEFAULTS, VAR_DEFAULTS, Sampling, UserError

ClassLabel = Union[int, str]
OneOrMany = Union[object, Sequence[object]]  # one control's value, or a list with one per control


@dataclass
class VAROutput:
    images: Union[List[Image.Image], np.ndarray, torch.Tensor]
    tokens: List[torch.Tensor]  # per scale (B, pn*pn) int64 on the CPU: the tokens actually used
    class_labels: List[int] = field(default_factory=list)
    stopped_early: bool = False  # a callback stopped the run; images show the scales made so far
    timings: dict = field(default_factory=dict)  # seconds: per scale, decode, total
    control_tokens: Optional[List[torch.Tensor]] = None  # ControlVAR: the map's tokens per scale (B, pn*pn)
    edit: Optional[editing.InpaintPlan] = None  # an edit's geometry: where its tokens' picture went (re-roll)


# the __call__ arguments a request of generate_batch may hold
BATCHABLE = frozenset({"class_labels", "num_images_per_label", "guidance_scale", "top_k", "top_p", "more_smooth",
                       "generator", "known_tokens"})


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
        # the live preview's latent-to-colour map fitted on this model's samples (studio.preview);
        # a bundle may ship one, else the worker fits it on first use
        self.fast_preview: Optional[preview.FastMap] = None
        self.controls: Dict[str, ControlAdapter] = {}  # control type -> adapter (see add_control)
        self.car_controls: Dict[str, CAR] = {}  # control type -> released CAR branch (see load_control)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.to(device, dtype)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: Optional[Union[str, Path]] = None, device="cpu",
                        dtype: Optional[torch.dtype] = None, variant: Optional[str] = None) -> "VARPipeline":
        """Load official weights (a folder with vae_ch160v4096z32.pth + var_dNN.pth, or + ControlVAR's
        dNN.pth), one of our bundles (config.json + safetensors), a hub id, or with no argument the
        embedded default model. A released CAR file (`weights/car_canny_d16.pth`) loads the VAR of its
        folder that it was made for (var_d16.pth) with the adapter (so `app.py --model` takes it too).

        dtype: None means float32 (faithful); bfloat16 (CPU or GPU) or float16 (GPU) trade exactness
        for speed. The quantiser and f_hat always stay in float32."""
        car_file = None if path_or_hub_id is None else checkpoints.car_file_and_variant(path_or_hub_id)
        if car_file is not None:  # a released CAR file: the VAR it was made for from its folder, then the file
            path, depth_variant = car_file
            pipe = cls.from_pretrained(path.parent, device, dtype, variant or depth_variant)
            pipe.load_control(path)
            return pipe
        loaded = checkpoints.resolve_and_load(None if path_or_hub_id is None else str(path_or_hub_id), variant)
        pipe = cls(loaded.vae, loaded.var, loaded.class_names, device, dtype or torch.float32, loaded.source,
                   loaded.extras)
        if isinstance(loaded.extras.get("config"), dict):  # a bundle: its control adapters, if any
            pipe.load_controls(Path(loaded.source), loaded.extras["config"])
            pipe.fast_preview = preview.load_from_bundle(loaded.source, loaded.extras["config"])
        return pipe

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
        for car in getattr(self, "car_controls", {}).values():
            car.to(self.device, self.dtype)
        # channels-last convolutions make the decoder ~12% faster on CPU (python -m lab.bench);
        # the encoder keeps the standard layout: its exact fp32 rounding decides argmin ties
        self.vae.decoder.to(memory_format=torch.channels_last)
        self.vae.quantize.float()  # codebook distances and f_hat accumulate in fp32
        return self

    def save_pretrained(self, folder: Union[str, Path], dtype: torch.dtype = torch.float16) -> None:
        """Write our bundle format: config.json + vae.safetensors + var.safetensors (fp16 by default),
        plus control_<type>.safetensors per control adapter (configs under config.json["control"])."""
        if self.is_controlvar:
            raise UserError("a ControlVAR model is loaded from its released folder (VQVAE + dNN.pth); our bundle "
                            "format holds VAR models only")
        controls_cfg = {"control": {t: a.cfg.to_dict() for t, a in self.controls.items()}} if self.controls else None
        checkpoints.save_bundle(Path(folder), self.vae, self.var, self.class_names, dtype, extra_config=controls_cfg,
                                extra_tensors={f"control_{t}": a.state_dict() for t, a in self.controls.items()})

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

    @property
    def is_controlvar(self) -> bool:
        """A ControlVAR model (lxa9867/ControlVAR): it generates only under a control map."""
        return isinstance(self.var, ControlVAR)

    @property
    def control_types(self) -> List[str]:
        """Every control type this model can be steered by (adapters, CAR files, or ControlVAR's own)."""
        if self.is_controlvar:
            return list(CONTROL_TYPE_IDS)
        return sorted(set(self.controls) | set(self.car_controls))

    # -- inputs ---------------------------------------------------------------------------------
    def class_index(self, label: ClassLabel) -> int:
        """A class id, a negative int (unconditional), or a class name (case-insensitive)."""
        if isinstance(label, (bool, np.bool_)):
            raise UserError(f"class label must be an int or a class name, not {label!r}")
        if isinstance(label, (int, np.integer)):
            label = int(label)
            if label < 0:
                return self.num_classes  # the null class: unconditional
            if label >= self.num_classes:  # num_classes itself is the null class: not a class to ask for
                raise UserError(f"class {label} is out of range: this model has classes 0..{self.num_classes - 1}")
            return label
        if isinstance(label, str):
            return params.find_class(label, self.class_names)
        raise UserError(f"class label must be an int or a class name, not {type(label).__name__}")

    def _labels(self, class_labels, num_images_per_label: int, generator) -> torch.Tensor:
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be at least 1, got {num_images_per_label}")
        if class_labels is None:  # random classes, drawn like the reference sampler does
            probs = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=self.device)
            if isinstance(generator, (list, tuple)):  # one generator per image: each draws its own class
                if len(generator) != num_images_per_label:
                    raise ValueError(f"got {len(generator)} generators for {num_images_per_label} images: "
                                     "give one per image")
                return torch.cat([torch.multinomial(probs, 1, generator=g).view(-1) for g in generator])
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
        resolution (float arrays in [0, 1] are taken exactly); tensors must already be (B, 3, R, R)
        in [-1, 1]. See studio.images.to_tensor_batch."""
        return im.to_tensor_batch(images, self.resolution)[0].to(self.device)

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
        return im.tensor_to_output(images_m11, output_type)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[ClassLabel, Sequence[ClassLabel]]] = None,
        guidance_scale: Union[float, Sequence[float]] = VAR_DEFAULTS["guidance_scale"],
        top_k: int = VAR_DEFAULTS["top_k"],
        top_p: Optional[float] = None,
        more_smooth: bool = Sampling.more_smooth,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        num_images_per_label: int = 1,
        callback_on_scale_end: Optional[Callable[[ScaleEvent], Optional[bool]]] = None,
        output_type: str = "pil",
        known_tokens: Optional[Sequence[Optional[torch.Tensor]]] = None,
        known_mask: Optional[Sequence[Optional[torch.Tensor]]] = None,
        use_kv_cache: bool = True,
        control_image: Optional[OneOrMany] = None,
        control_type: Optional[Union[str, Sequence[str]]] = None,
        control_strength: Union[float, Sequence[float]] = 1.0,
        control_guidance_start: Union[float, Sequence[float]] = 0.0,
        control_guidance_end: Union[float, Sequence[float]] = 1.0,
        type_guidance_scale: Optional[float] = None,
        control_guidance_scale: Optional[float] = None,
    ) -> VAROutput:
        """Generate images scale by scale.

        guidance_scale: classifier-free guidance; a float g ramps linearly from 0 at the first
            scale to g at the last (the published schedule), a list gives the weight per scale.
        top_k / top_p: keep the k most likely tokens / the nucleus of mass top_p (0 = off).
        more_smooth: feed Gumbel-softmax soft codes instead of hard tokens (smoother images).
        generator: a torch.Generator for the whole batch, or a list with one per image: image i is then
            the image a run of it alone with generator[i] gives (the studio seeds image i with seed + i).
        callback_on_scale_end: called with a ScaleEvent after every scale; return True to stop.
        known_tokens / known_mask: per scale (B, pn*pn) tokens and bool masks (True = keep) that
            are forced in place of the sampled ones (editing, variations, re-roll).
        control_image / control_type: a control map ("canny", "depth", "segmentation"; see
            studio.preprocess: a map tensor, or a picture read by its "none" path) for an adapter in
            self.controls; lists give several controls, whose injections add up. For a released CAR
            adapter (load_control: "canny", "hed", "depth", "normal", "sketch") the map is the
            condition picture (PIL or uint8 array, RGB) and a list gives one picture per class label
            (or per image); the guidance is on the class only, as CAR's own sampler does.
        control_strength: multiplies a control's injection (0 = off). control_guidance_start/end:
            the fraction of the scales where it acts (scale si when si/n >= start, (si+1)/n <= end).
            Each may be a list, one value per control. Guidance sees no control in its unconditional
            half, so guidance_scale pushes towards the class and the control (models/control.py).
        ControlVAR models (pipe.is_controlvar) always need control_image (the map itself, RGB: a
            segmentation map in its 124-colour palette, an edge, depth or normal picture; one, or one
            per label / per image) and control_type ("segmentation", "canny", "depth", "normal").
            Their guidance has three weights: guidance_scale (class), type_guidance_scale (condition
            type) and control_guidance_scale (map); None means guidance_scale (the published val
            runs use 4, 4, 4 with top_k 900 and top_p 0.96). `.tokens` and `.images` are the
            image's; `.control_tokens` the map's.
        """
        if top_p is None:
            top_p = self.default_sampling()["top_p"]
        if self.is_controlvar:
            if not use_kv_cache:
                raise UserError("a ControlVAR model samples with its KV cache (use_kv_cache=False is for VAR)")
            return self._controlvar_call(
                class_labels, guidance_scale, type_guidance_scale, control_guidance_scale, top_k,
                top_p, more_smooth, generator, num_images_per_label, callback_on_scale_end,
                output_type, known_tokens, known_mask, control_image, control_type, control_strength,
                control_guidance_start, control_guidance_end)
        if type_guidance_scale is not None or control_guidance_scale is not None:
            raise UserError("type_guidance_scale and control_guidance_scale are ControlVAR's guidance weights; this "
                            "model is not a ControlVAR")
        self._check_sampling_args(guidance_scale, top_k, top_p)
        im.check_output_type(output_type)
        t_start = time.perf_counter()
        labels = self._labels(class_labels, num_images_per_label, generator)
        B = labels.shape[0]
        known_tokens, known_mask = self._check_known(known_tokens, known_mask, B)
        if isinstance(control_type, str) and control_type in self.car_controls:
            block_hook = self._car_hook(control_image, control_type, B, num_images_per_label, control_strength,
                                        control_guidance_start, control_guidance_end)
        else:
            controls = self._controls(control_image, control_type, control_strength, control_guidance_start,
                                      control_guidance_end)
            block_hook = ControlHook(controls, B, self.var.begin_ends) if controls else None
        per_scale = []

        def on_scale(ev: ScaleEvent):
            per_scale.append(ev.seconds)
            if callback_on_scale_end is not None:
                return callback_on_scale_end(ev)
            return None

        res: SampleResult = self.var.sample(
            self.vae.quantize, labels, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
            more_smooth=more_smooth, generator=generator, callback=on_scale, known_tokens=known_tokens,
            known_mask=known_mask, use_kv_cache=use_kv_cache, block_hook=block_hook)
        return self._decoded(res.f_hat, res.tokens, labels, res.stopped_early, per_scale, t_start, output_type)

    def default_sampling(self) -> dict:
        """The model's published sampling settings (guidance_scale, top_k, top_p): VAR's 4, 900, 0.95;
        ControlVAR's val runs use top_p 0.96. A top_p left out (None) of a call is this one's."""
        return dict(CONTROLVAR_DEFAULTS if self.is_controlvar else VAR_DEFAULTS)

    def _controlvar_call(self, class_labels, guidance_scale, type_guidance_scale, control_guidance_scale, top_k, top_p,
                         more_smooth, generator, num_images_per_label, callback_on_scale_end, output_type, known_tokens,
                         known_mask, control_image, control_type, strength, start, end) -> VAROutput:
        """Sampling of a ControlVAR model (its official conditional_infer_cfg, see models/controlvar.py)."""
        types = ", ".join(repr(t) for t in CONTROL_TYPE_IDS)
        if control_image is None or control_type is None:
            raise UserError(f"a ControlVAR model draws an image under a control map: give control_image and control_type "
                            f"({types})")
        if not isinstance(control_type, str) or control_type not in CONTROL_TYPE_IDS:
            raise UserError(f"ControlVAR's control types are {types}; got {control_type!r}")
        if (strength, start, end) != (1.0, 0.0, 1.0):
            raise UserError("control_strength and control_guidance_start/end are for adapters; a ControlVAR model reads "
                            "the map as part of its sequence: weigh it with control_guidance_scale")
        weights = []
        for name, g in (("guidance_scale", guidance_scale), ("type_guidance_scale", type_guidance_scale),
                        ("control_guidance_scale", control_guidance_scale)):
            g = guidance_scale if g is None else g
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g) or g < 0:
                raise UserError(f"{name} must be one finite number >= 0 for a ControlVAR model, got {g!r}")
            weights.append(float(g))
        self._check_sampling_args(weights[0], top_k, top_p)
        im.check_output_type(output_type)
        t_start = time.perf_counter()
        labels = self._labels(class_labels, num_images_per_label, generator)
        B = labels.shape[0]
        known_tokens, known_mask = self._check_known(known_tokens, known_mask, B)
        pictures = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        per_label = num_images_per_label
        if len(pictures) not in (1, B, B // per_label):
            raise UserError(f"control_image has {len(pictures)} maps for {B // per_label} labels x {per_label} images; "
                            "give one map, one per label or one per image")
        maps = torch.cat([im.controlvar_map(p, self.resolution, control_type) for p in pictures])
        if len(pictures) == 1:
            maps = maps.repeat(B, 1, 1, 1)
        elif len(pictures) != B:
            maps = maps.repeat_interleave(per_label, dim=0)
        # the official sampler tokenises the batch of maps as it is (one map per image)
        control_tokens = self.vae.img_to_tokens(maps.to(self.device))
        type_B = torch.full((B,), CONTROL_TYPE_IDS[control_type], device=self.device, dtype=torch.long)
        per_scale = []

        def on_scale(ev: ScaleEvent):
            per_scale.append(ev.seconds)
            return None if callback_on_scale_end is None else callback_on_scale_end(ev)

        res = self.var.sample(self.vae.quantize, labels, type_B, control_tokens, weights, top_k=top_k, top_p=top_p,
                              more_smooth=more_smooth, generator=generator, callback=on_scale,
                              known_tokens=known_tokens, known_mask=known_mask)
        out = self._decoded(res.f_hat, res.tokens, labels, res.stopped_early, per_scale, t_start, output_type)
        out.control_tokens = [t.cpu() for t in res.control_tokens]
        return out

    @torch.no_grad()
    def control_preview(self, control_image, control_type: str) -> np.ndarray:
        """What the model reads for this control, as an (R, R, 3) float image in [0, 1]: for ControlVAR
        the map after its VQVAE (the tokens it forces), for a CAR file the picture at the finest
        scale's size, for our adapters the map tensor shown as a picture."""
        if self.is_controlvar:
            m = im.controlvar_map(control_image, self.resolution, control_type).to(self.device)
            rec = self.vae.tokens_to_img(self.vae.img_to_tokens(m))
            return ((rec[0].float().cpu().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
        if control_type in self.car_controls:
            car = self.car_controls[control_type]
            m = im.car_scale_maps(control_image, self.patch_nums, car.cfg.stride)[-1]
            return ((m[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
        raise UserError(f"this model has no {control_type!r} control to preview (it has: "
                        f"{', '.join(self.control_types) or 'none'})")

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[dict],
                       callback_on_scale_end: Optional[Callable[[ScaleEvent], Optional[bool]]] = None,
                       output_type: str = "pil") -> List[VAROutput]:
        """Several plain generations in one batch, each exactly as __call__ alone would make it.

        requests: dicts of __call__'s arguments class_labels, num_images_per_label, guidance_scale,
        top_k, top_p, more_smooth, generator (one generator per request: its labels and tokens are
        drawn from it in the order __call__ draws them) and known_tokens (a prefix of scales kept:
        variations_request and reroll_request make such requests; the other requests' rows keep
        nothing). The callback sees the whole batch: request i owns the rows `VAROutput.rows` of its
        output (also known before: the requests' image counts in order). Returns one VAROutput per
        request."""
        if self.is_controlvar:  # as __call__ says it
            raise UserError("a ControlVAR model draws an image under a control map: give control_image and "
                            "control_type")
        im.check_output_type(output_type)
        t_start = time.perf_counter()
        for r in requests:
            extra = set(r) - BATCHABLE
            if extra:
                raise ValueError(f"generate_batch takes {', '.join(sorted(BATCHABLE))}; got {', '.join(sorted(extra))}")
        labels, groups, knowns = [], [], []
        for r in requests:
            g, k, p = (r.get("guidance_scale", VAR_DEFAULTS["guidance_scale"]), r.get("top_k", VAR_DEFAULTS["top_k"]),
                       r.get("top_p", self.default_sampling()["top_p"]))
            self._check_sampling_args(g, k, p)
            lab = self._labels(r.get("class_labels"), r.get("num_images_per_label", 1), r.get("generator"))
            labels.append(lab)
            groups.append(RowGroup(lab.shape[0], r.get("generator"), g, k, p, r.get("more_smooth", Sampling.more_smooth)))
            knowns.append(self._check_known(r.get("known_tokens"), None, lab.shape[0])[0])
        known_tokens, known_mask = self._batch_known(knowns, [g.size for g in groups])
        per_scale = []

        def on_scale(ev: ScaleEvent):
            per_scale.append(ev.seconds)
            return callback_on_scale_end(ev) if callback_on_scale_end is not None else None

        res = self.var.sample(self.vae.quantize, torch.cat(labels), generator=None, callback=on_scale, rows=groups,
                              known_tokens=known_tokens, known_mask=known_mask)
        outs, r0 = [], 0
        for lab, g in zip(labels, groups):
            f_hat = res.group_f_hat[len(outs)] if res.group_f_hat else res.f_hat  # per request: the decode as alone
            out = self._decoded(f_hat, [t[r0:r0 + g.size] for t in res.tokens], lab, res.stopped_early, per_scale,
                                t_start, output_type)
            out.timings["batch_images"] = len(torch.cat(labels))
            outs.append(out)
            r0 += g.size
        return outs

    def _batch_known(self, knowns, sizes):
        """Per-request known tokens (each None, or per scale None or (n, pn*pn)) -> the batch's known
        tokens and masks per scale (rows of a request that keeps nothing there: masked out), or
        (None, None) when no request keeps anything."""
        if all(k is None for k in knowns):
            return None, None
        toks, masks = [], []
        for si, pn in enumerate(self.patch_nums):
            if all(k is None or k[si] is None for k in knowns):
                toks.append(None)
                masks.append(None)
                continue
            t_parts, m_parts = [], []
            for k, n in zip(knowns, sizes):
                if k is None or k[si] is None:
                    t_parts.append(torch.zeros(n, pn * pn, dtype=torch.long, device=self.device))
                    m_parts.append(torch.zeros(n, pn * pn, dtype=torch.bool, device=self.device))
                else:
                    t_parts.append(k[si])
                    m_parts.append(torch.ones(n, pn * pn, dtype=torch.bool, device=self.device))
            toks.append(torch.cat(t_parts))
            masks.append(torch.cat(m_parts))
        return toks, masks

    def _decoded(self, f_hat, tokens, labels, stopped_early, per_scale, t_start, output_type) -> VAROutput:
        """A sampled f_hat decoded into a VAROutput (tokens on the CPU, the decode timed on its own)."""
        t_dec = time.perf_counter()
        images = self.vae.fhat_to_img(f_hat)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        return VAROutput(
            images=self.postprocess(images, output_type), tokens=[t.cpu() for t in tokens],
            class_labels=labels.tolist(), stopped_early=stopped_early,
            timings={"per_scale": per_scale, "decode": t_end - t_dec, "total": t_end - t_start})

    def _check_sampling_args(self, guidance_scale, top_k, top_p):
        """The bounds of studio.params.Sampling, but for guidance's maximum: the studio's slider
        stops at 10, the Python API takes any finite guidance (and a list, one per scale)."""
        if isinstance(guidance_scale, (int, float)):
            if not np.isfinite(guidance_scale) or guidance_scale < params.spec(Sampling, "guidance_scale")[1].minimum:
                raise UserError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        else:
            self.var.guidance_per_scale(guidance_scale)  # checks the length
        if int(top_k) != top_k:
            raise UserError(f"top_k must be a whole number (0 = off), got {top_k}")
        params.spec(Sampling, "top_k")[1].check("top_k", top_k)
        params.spec(Sampling, "top_p")[1].check("top_p", float(top_p))

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


    # -- editing (zero-shot: known tokens forced, the rest generated) ----------------------------
    def _generate_with_known(self, known, masks, class_labels, num_images, guidance_scale, kw):
        """Run generation with forced tokens; an unconditional edit needs no guidance (both halves
        would be the null class)."""
        if class_labels is None:
            class_labels, guidance_scale = -1, 0.0
        return self(class_labels=class_labels, num_images_per_label=num_images, guidance_scale=guidance_scale,
                    known_tokens=known, known_mask=masks, output_type="np", **kw)

    @torch.no_grad()
    def inpaint(self, image, mask_image, class_labels: Optional[ClassLabel] = None,
                guidance_scale=VAR_DEFAULTS["guidance_scale"], top_k: int = VAR_DEFAULTS["top_k"],
                top_p: Optional[float] = None,
                more_smooth: bool = Sampling.more_smooth, generator=None,
                num_images: int = 1, mask_blur: int = 4, mask_grow: int = 0, inpaint_area: str = "masked",
                padding: int = 32, mask_coverage: float = 0.0, callback_on_scale_end=None,
                output_type: str = "pil", control_image=None, control_type=None, control_strength=1.0,
                control_guidance_start=0.0, control_guidance_end=1.0, type_guidance_scale: Optional[float] = None,
                control_guidance_scale: Optional[float] = None) -> VAROutput:
        """Regenerate the white part of `mask_image` (same size as `image`, any size and mode).

        inpaint_area: "masked" crops a square around the mask (plus `padding`) to the model's
            resolution, edits it and pastes it back; "whole" resizes the whole image.
        mask_grow: grow (>0) or shrink (<0) the mask in pixels; mask_blur: feather band in pixels
            (outside the mask and the band the original pixels are kept exactly).
        mask_coverage: a latent cell is regenerated when more than this fraction of it is masked.
        class_labels: None edits without a class (the paper's in-painting); a class edits the region
            towards that class. `.tokens` holds the token maps used (model resolution).
        control_*: as in __call__; the maps cover the whole image (any size: they are resized to it)
            and are cropped with it. type_guidance_scale / control_guidance_scale: ControlVAR's (see
            __call__); without a class its type and map guidance keep guidance_scale's value.
            A ControlVAR model in-paints under its map only: every guidance branch keeps the known
            image tokens."""
        im.check_output_type(output_type)
        plan = editing.plan_inpaint(image, mask_image, self.resolution, self.patch_nums[-1], mask_blur, mask_grow,
                                    inpaint_area, padding, mask_coverage)
        if plan.empty:  # nothing to regenerate: the input comes back
            tokens = self.encode(plan.model_image)
            images = np.repeat(plan.image[None], num_images, axis=0)
            return VAROutput(im.float_to_output(images, output_type), [t.repeat(num_images, 1) for t in tokens])
        kw = dict(top_k=top_k, top_p=top_p, more_smooth=more_smooth, generator=generator,
                  callback_on_scale_end=callback_on_scale_end)
        if control_image is not None or control_type is not None:
            kw.update(control_image=self._crop_control_maps(control_image, control_type, plan),
                      control_type=control_type, control_strength=control_strength,
                      control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end)
        if self.is_controlvar:  # its type and map guidance stay on when the edit has no class
            kw.update(type_guidance_scale=guidance_scale if type_guidance_scale is None else type_guidance_scale,
                      control_guidance_scale=guidance_scale if control_guidance_scale is None else control_guidance_scale)
        if plan.regen.all():  # everything regenerated: a fresh sample
            out = self._generate_with_known(None, None, class_labels, num_images, guidance_scale, kw)
        else:
            known = self.encode(plan.model_image)
            out = self._generate_with_known(known, plan.keep_masks(self.patch_nums), class_labels, num_images,
                                            guidance_scale, kw)
        out.images = im.float_to_output(np.stack([plan.paste(gen) for gen in out.images]), output_type)
        out.edit = plan
        return out

    @torch.no_grad()
    def outpaint(self, image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 class_labels: Optional[ClassLabel] = None, guidance_scale=VAR_DEFAULTS["guidance_scale"],
                 top_k: int = VAR_DEFAULTS["top_k"], top_p: Optional[float] = None,
                 more_smooth: bool = Sampling.more_smooth,
                 generator=None, mask_blur: int = 8, window: Optional[int] = None,
                 max_windows: int = 64, callback_on_scale_end=None, on_window=None, output_type: str = "pil") -> VAROutput:
        """Extend the image by the given number of pixels on each side, to any size.

        Square windows (`window` pixels, default the image's shorter side) slide outwards, each
        overlapping known content; every window is an in-painting of its unknown part, pasted with a
        feathered seam. The original pixels stay exactly in place. `on_window(index, canvas_pil)`
        reports the canvas after each window."""
        canvas = editing.OutpaintCanvas(image, left, right, top, bottom, window)
        all_tokens, n, last = None, 0, None
        while (win := canvas.next_window()) is not None:
            if n >= max_windows:
                raise UserError(f"out-painting needs more than {max_windows} windows; add fewer pixels, or use a "
                                "larger window")
            picture, mask = canvas.window(win)
            res = self.inpaint(picture, mask, class_labels=class_labels, guidance_scale=guidance_scale,
                               top_k=top_k, top_p=top_p, more_smooth=more_smooth, generator=generator,
                               mask_blur=0, inpaint_area="whole", callback_on_scale_end=callback_on_scale_end,
                               output_type="np")
            alpha = canvas.merge(win, res.images[0], mask_blur)
            all_tokens, last = res.tokens, (win, alpha, res.edit.regen)
            n += 1
            if on_window is not None:
                on_window(n, canvas.picture())
        # the last window's tokens and geometry: a re-roll resamples that window's new part
        edit = canvas.window_plan(*last) if last is not None else None
        if edit is not None:
            edit.image = canvas.result()
        return VAROutput(im.float_to_output(canvas.result()[None], output_type), all_tokens or [],
                         timings={"windows": n}, edit=edit)

    @torch.no_grad()
    def variations(self, image, keep_scales: int, class_labels: Optional[ClassLabel] = None, num_images: int = 1,
                   **kwargs) -> VAROutput:
        """Image-to-image: keep the first `keep_scales` scales of the image's token pyramid and sample
        the rest (0: a fresh sample; all scales: the image's reconstruction)."""
        return self(**self.variations_request(image, keep_scales, class_labels, num_images, **kwargs))

    @torch.no_grad()
    def variations_request(self, image, keep_scales: int, class_labels: Optional[ClassLabel] = None,
                           num_images: int = 1, **kwargs) -> dict:
        """variations' call to __call__, as a dict (the image encoded): run it alone, or as one request
        of generate_batch, which then makes the same images."""
        if not 0 <= keep_scales <= self.num_scales:
            raise ValueError(f"keep_scales must be in 0..{self.num_scales}, got {keep_scales}")
        known = self.encode(image)[:keep_scales] if keep_scales else None
        if known is not None and known[0].shape[0] != 1:
            raise ValueError("variations takes one image")
        labels = -1 if class_labels is None else class_labels
        if class_labels is None:
            kwargs.setdefault("guidance_scale", 0.0)
        return dict(class_labels=labels, num_images_per_label=num_images, known_tokens=known, **kwargs)

    @torch.no_grad()
    def reroll(self, tokens: Sequence[torch.Tensor], from_scale: int, class_labels=None,
               edit: Optional[editing.InpaintPlan] = None, **kwargs) -> VAROutput:
        """Keep scales 0..from_scale-1 of a result's tokens and resample the rest (from_scale equal
        to the number of scales gives the same image back).

        edit: the result was an in- or out-painting (`out.edit`, or InpaintPlan.from_record on the
        edited picture): all its tokens are kept up to from_scale, after it only those outside the
        edited area, and the model's picture is pasted back over the edited picture (outside the
        edit the pixels stay exactly as they are). An edit under control takes its control_image as
        inpaint does: the whole picture's map, cut like the picture."""
        if edit is None:
            return self(**self.reroll_request(tokens, from_scale, class_labels, **kwargs))
        if kwargs.get("control_image") is not None:
            kwargs["control_image"] = self._crop_control_maps(kwargs["control_image"], kwargs.get("control_type"), edit)
        if not 0 <= from_scale <= self.num_scales:
            raise ValueError(f"from_scale must be in 0..{self.num_scales}, got {from_scale}")
        self._check_tokens(tokens, allow_prefix=False)
        B = tokens[0].shape[0]
        if class_labels is None:
            class_labels = -1
        labels = class_labels if isinstance(class_labels, (list, tuple)) else [class_labels] * B
        output_type = kwargs.pop("output_type", "pil")
        if all(int(c) < 0 for c in labels):  # an edit without a class: no guidance (both halves are the null class)
            kwargs["guidance_scale"] = 0.0
        out = self(class_labels=labels, known_tokens=list(tokens), known_mask=edit.reroll_masks(self.patch_nums,
                                                                                                from_scale),
                   output_type="np", **kwargs)
        out.images = im.float_to_output(np.stack([edit.paste(gen) for gen in out.images]), output_type)
        out.edit = edit
        return out

    def reroll_request(self, tokens: Sequence[torch.Tensor], from_scale: int, class_labels=None, **kwargs) -> dict:
        """reroll's call to __call__ for a result that is not an edit, as a dict: run it alone, or as
        one request of generate_batch, which then makes the same images."""
        if not 0 <= from_scale <= self.num_scales:
            raise ValueError(f"from_scale must be in 0..{self.num_scales}, got {from_scale}")
        self._check_tokens(tokens[:max(from_scale, 1)], allow_prefix=True)
        B = tokens[0].shape[0]
        if class_labels is None:
            class_labels = -1
        labels = class_labels if isinstance(class_labels, (list, tuple)) else [class_labels] * B
        known = list(tokens[:from_scale]) if from_scale else None
        return dict(class_labels=labels, known_tokens=known, **kwargs)

    # -- control adapters -------------------------------------------------------------------------
    def load_control(self, path: Union[str, Path], control_type: Optional[str] = None) -> None:
        """Load a released CAR adapter (car_<type>_d16.pth, for the official var_d16.pth) under its type,
        read from the file name when control_type is None; it replaces a control of the same type.
        Strict: every key and shape must be those of a CAR built on this VAR."""
        car = checkpoints.load_car(Path(path), self.var.cfg, control_type)
        for p in car.parameters():
            p.requires_grad_(False)
        self.controls.pop(car.cfg.control_type, None)
        self.car_controls[car.cfg.control_type] = car.to(self.device, self.dtype)

    def _car_hook(self, control_image, ctype: str, B: int, per_label: int, strength, start, end) -> CARHook:
        """The sampler hook of a CAR control: CAR's per-scale maps for one picture, or one per label/image."""
        car = self.car_controls[ctype]
        if control_image is None:
            raise ValueError("control_image and control_type go together: give both or neither")
        for name, v in (("control_strength", strength), ("control_guidance_start", start),
                        ("control_guidance_end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{name} must be one finite number for a CAR control, got {v!r}")
        if strength < 0:
            raise ValueError(f"control_strength must be >= 0, got {strength}")
        pictures = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if len(pictures) not in (1, B, B // per_label):
            raise ValueError(f"control_image has {len(pictures)} pictures for {B // per_label} labels x {per_label} "
                             "images; give one picture, one per label or one per image")
        per_picture = [im.car_scale_maps(p, self.patch_nums, car.cfg.stride) for p in pictures]
        maps = [torch.cat([m[si] for m in per_picture]).to(self.device) for si in range(self.num_scales)]
        if len(pictures) not in (1, B):  # one per label: each label's images share it
            maps = [m.repeat_interleave(per_label, dim=0) for m in maps]
        return CARHook(car, self.var, maps, B, float(strength), active_scales(self.num_scales, start, end))

    def add_control(self, adapter: ControlAdapter) -> None:
        """Hold `adapter` under its control type (replacing one of the same type)."""
        c, v = adapter.cfg, self.var.cfg
        if (c.embed_dim, c.depth, tuple(c.patch_nums)) != (v.embed_dim, v.depth, tuple(v.patch_nums)):
            raise ValueError(f"the {c.control_type} adapter is for a VAR of width {c.embed_dim}, depth {c.depth}, "
                             f"scales {tuple(c.patch_nums)}; this model has width {v.embed_dim}, depth {v.depth}, "
                             f"scales {tuple(v.patch_nums)}")
        for p in adapter.parameters():
            p.requires_grad_(False)
        self.car_controls.pop(c.control_type, None)
        self.controls[c.control_type] = adapter.eval().to(self.device, self.dtype)

    def load_controls(self, folder: Path, config: dict) -> None:
        """Load every control_<type>.safetensors of a bundle folder (configs in config["control"])."""
        entries = config.get("control") or {}
        for path in sorted(Path(folder).glob("control_*.safetensors")):
            ctype = path.stem[len("control_"):]
            if ctype not in entries:
                raise checkpoints.CheckpointError(f"{path.name} has no config under config.json['control'][{ctype!r}]")
            try:
                cfg = ControlConfig.from_dict(entries[ctype])
            except (TypeError, ValueError) as e:
                raise checkpoints.CheckpointError(f"config.json['control'][{ctype!r}]: {e}") from e
            if cfg.control_type != ctype:
                raise checkpoints.CheckpointError(f"{path.name} holds a {cfg.control_type!r} adapter")
            adapter = ControlAdapter(cfg)
            checkpoints.load_into(adapter, checkpoints.read_safetensors(path), f"{Path(folder).name}/{path.name}")
            self.add_control(adapter)

    def _adapter(self, ctype) -> ControlAdapter:
        if not isinstance(ctype, str):
            raise ValueError(f"control_type must be a string such as 'canny', 'depth' or 'segmentation', not {ctype!r}")
        if ctype not in self.controls:
            have = ", ".join(sorted(self.controls)) or "none"
            raise ValueError(f"this model has no {ctype!r} control adapter (it has: {have}); a bundle provides one "
                             f"as control_{ctype}.safetensors, or add one with pipe.add_control(adapter) (a released CAR "
                             f"file: pipe.load_control(path))")
        return self.controls[ctype]

    @staticmethod
    def _per_control(value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} controls")
            return list(value)
        return [value] * n

    def _control_lists(self, control_image, control_type):
        if control_image is None and control_type is None:
            return [], []
        if control_image is None or control_type is None:
            raise ValueError("control_image and control_type go together: give both or neither")
        if isinstance(control_type, (list, tuple)):
            if not isinstance(control_image, (list, tuple)) or len(control_image) != len(control_type):
                raise ValueError("with a list of control types, control_image must be a list of the same length")
            return list(control_image), list(control_type)
        return [control_image], [control_type]

    def _control_map(self, image, ctype: str, adapter: ControlAdapter) -> torch.Tensor:
        """A control image as a map tensor on the device (pictures go through the "none" preprocessor)."""
        if not isinstance(image, torch.Tensor):
            n = adapter.cfg.in_channels if adapter.cfg.label_map else None
            image = preprocess.user_map(ctype, image, size=None, num_classes=n).map
        return image.to(self.device)

    def _controls(self, control_image, control_type, strength, start, end) -> List[Control]:
        images, types = self._control_lists(control_image, control_type)
        n = len(types)
        strengths = self._per_control(strength, n, "control_strength")
        starts = self._per_control(start, n, "control_guidance_start")
        ends = self._per_control(end, n, "control_guidance_end")
        out = []
        for image, ctype, s, a, b in zip(images, types, strengths, starts, ends):
            adapter = self._adapter(ctype)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or s < 0:
                raise ValueError(f"control_strength must be a finite number >= 0, got {s!r}")
            adapter.to(self.device, self.dtype)
            m = self._control_map(image, ctype, adapter)
            adapter.prepare_map(m)  # check it now: a clear message before any sampling
            out.append(Control(adapter, m, float(s), float(a), float(b)))
        return out

    def _crop_control_maps(self, control_image, control_type, plan: editing.InpaintPlan) -> list:
        """Control maps brought to the image's size and cut like the image (inpaint)."""
        W, H = plan.size
        if self.is_controlvar or (isinstance(control_type, str) and control_type in self.car_controls):
            # ControlVAR / CAR: the map is a picture; the model's own resizing happens when it reads it
            if control_image is None or isinstance(control_image, (list, tuple)):
                raise UserError("in-painting under control takes one control picture for the image")
            pic = im.to_rgb(control_image if isinstance(control_image, Image.Image)
                            else Image.fromarray(np.asarray(control_image, np.uint8)))
            flt = Image.Resampling.NEAREST if control_type == "segmentation" else Image.Resampling.LANCZOS
            arr = np.asarray(pic if pic.size == (W, H) else pic.resize((W, H), flt))
            return Image.fromarray(np.ascontiguousarray(plan.crop(arr)), "RGB")
        images, types = self._control_lists(control_image, control_type)
        out = []
        for image, ctype in zip(images, types):
            adapter = self._adapter(ctype)
            m = adapter.prepare_map(self._control_map(image, ctype, adapter).cpu(), size=(H, W)).float()  # (N,C,H,W)
            if plan.region is not None:
                N, C = m.shape[:2]
                arr = plan.crop(m.reshape(N * C, H, W).permute(1, 2, 0).numpy())
                m = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).reshape(N, C, *arr.shape[:2])
            out.append(m.argmax(1) if adapter.cfg.label_map else m)
        return out if isinstance(control_type, (list, tuple)) else out[0]


# the text-to-image family (Infinity) has its own pipeline; importable from here as the API promises
from studio.infinity import InfinityOutput, InfinityPipeline  # noqa: E402,F401
