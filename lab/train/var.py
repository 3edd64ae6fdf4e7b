"""`var` trainer: the VAR transformer, teacher-forced on the tokens of a frozen VQVAE."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import lab.train.data as data
import lab.train.tokencache as tokencache
from lab.train.artifacts import image_grid, vqvae_for
from lab.train.config import add_config_flags, config_from_args, config_json, note_ignored_config
from lab.train.data import to_resolution
from lab.train.task import Task, TrainError, register
from models.var import VAR, VARConfig, token_weights
from models.vqvae import VQVAE, VQVAEConfig

# The embedded default's transformer: 5M parameters, 64-wide heads as in the official shape rule;
# one image takes about 0.5 s on one CPU core, the fp16 bundle is 16 MB.
DEFAULT_VAR = dict(depth=6, embed_dim=192, num_heads=3, mlp_ratio=4.0, cond_drop_rate=0.1, drop_path_rate=0.0)


@torch.no_grad()
def teacher_forcing(vae: VQVAE, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, L), transformer inputs (B, L-1, Cvae)) of images from a frozen VQVAE (fp32, outside autocast)."""
    tokens = vae.quantize.f_to_tokens(vae.img_to_f(x))
    return torch.cat(tokens, 1), vae.quantize.tokens_to_var_input(tokens)



@register
class VARTask(Task):
    name = "var"
    help = "train the VAR transformer on the tokens of a frozen VQVAE"
    defaults = dict(lr=4e-4, batch_size=16, weight_decay=0.05, beta1=0.9, beta2=0.95, grad_clip=2.0,
                    warmup_steps=100, num_samples=4)
    panels = [("train cross-entropy", "train", ["loss", "ce_coarse", "ce_mid", "ce_fine"], False),
              ("held-out cross-entropy", "eval", ["ce", "ce_coarse", "ce_mid", "ce_fine"], False),
              ("token accuracy", "train", ["acc", "acc_coarse", "acc_mid", "acc_fine"], False)]
    DERIVED = ("vocab_size", "z_channels", "num_classes", "patch_nums")  # taken from the VQVAE and classes

    @classmethod
    def add_arguments(cls, p):
        p.add_argument("--vae", help="frozen VQVAE: a vqvae run/export folder, its checkpoint.pt, or a bundle "
                                     "(needed for a fresh run; a resumed run uses the copy in its checkpoint)")
        p.add_argument("--init", help="start the transformer from this bundle's (and its VQVAE, unless --vae is "
                                      "given): train an existing model further; its architecture replaces the "
                                      "config flags")
        g = p.add_argument_group("token cache")
        g.add_argument("--token-cache", help="folder of token pyramids: the first --cache-images images of --data "
                                             "(and their mirror images) encoded once, then trained on instead of "
                                             "rendering and encoding every batch; built (resumably) when missing")
        g.add_argument("--cache-images", type=int, help="images to encode (default: all of a shard folder; "
                                                        "required with --data render)")
        add_config_flags(p, VARConfig, DEFAULT_VAR, skip=cls.DERIVED)
        g = p.add_argument_group("var loss and samples")
        g.add_argument("--scale-weighting", choices=["token", "equal"], default="token",
                       help="token: every token counts the same (official); equal: every scale counts the same")
        g.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy")
        g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the sample grid")
        g.add_argument("--top-k", type=int, default=0, help="top-k of the sample grid (0: off)")
        g.add_argument("--top-p", type=float, default=0.0, help="top-p of the sample grid (0: off)")

    def class_names(self) -> List[str]:
        return list(data.load_world().CLASS_NAMES)

    def build(self, ckpt):
        if ckpt is not None:
            vcfg = VQVAEConfig(**ckpt["vae_config"])
            self.vae = VQVAE(vcfg)
            self.vae.load_state_dict(ckpt["vae"])
            self.names = list(ckpt["class_names"])
            cfg = dict(ckpt["config"])
            note_ignored_config(VARConfig, self.args, cfg, skip=self.DERIVED)
            if self.args.vae:
                print("[train] resuming: the VQVAE is the copy in the checkpoint; --vae is ignored", file=sys.stderr)
        elif self.args.init:
            init = self._init_bundle()
            self.vae = vqvae_for(self.args.vae, "--vae") if self.args.vae else init.vae
            self.names = list(init.class_names)
            cfg = init.var.cfg.to_dict()
            if self.vae.cfg.vocab_size != cfg["vocab_size"] or tuple(self.vae.cfg.patch_nums) != tuple(cfg["patch_nums"]):
                raise TrainError(f"--vae {self.args.vae} does not fit the transformer of --init {self.args.init} "
                                 f"(vocabulary or scales differ)")
            note_ignored_config(VARConfig, self.args, cfg, skip=self.DERIVED, source=f"--init {self.args.init}")
        else:
            if not self.args.vae:
                raise TrainError("var: --vae is required (a trained VQVAE) for a fresh run")
            self.vae = vqvae_for(self.args.vae, "--vae")
            self.names = self.class_names()
            cfg = config_from_args(VARConfig, self.args, DEFAULT_VAR, skip=self.DERIVED)
            vc = self.vae.cfg
            derived = dict(vocab_size=vc.vocab_size, z_channels=vc.z_channels, num_classes=len(self.names),
                           patch_nums=vc.patch_nums)
            for k, v in config_json(self.args, VARConfig).items():
                if k in derived and tuple(np.atleast_1d(v).tolist()) != tuple(np.atleast_1d(derived[k]).tolist()):
                    raise TrainError(f"--config: {k}={v} contradicts the VQVAE / classes ({k}={derived[k]})")
            cfg.update(derived)
        self.vae.eval().requires_grad_(False).to(self.device)
        self.var = VAR(VARConfig(**cfg))
        if ckpt is not None:
            self.var.load_state_dict(ckpt["model"])
        elif self.args.init:
            self.var.load_state_dict(init.var.state_dict())
            print(f"[train] transformer initialised from {self.args.init}", file=sys.stderr)
        pn = self.var.cfg.patch_nums
        sizes = torch.tensor([p * p for p in pn], dtype=torch.float32)
        self.scale_of_token = torch.repeat_interleave(torch.arange(len(pn)), sizes.long()).to(self.device)
        self.token_weight = token_weights(pn, self.args.scale_weighting).to(self.device)
        groups = np.array_split(np.arange(len(pn)), 3)
        self.groups = {g: [int(i) for i in idx] for g, idx in zip(("coarse", "mid", "fine"), groups) if len(idx)}
        self.window = None
        return self.var

    def _init_bundle(self):
        from studio import checkpoints

        try:
            return checkpoints.load_bundle(Path(self.args.init))
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            raise TrainError(f"--init {self.args.init}: {e}") from e

    def resolution(self):
        return self.vae.cfg.resolution

    def data_source(self, source):
        """`--token-cache`: the cached token pyramids of `source` (built first when missing)."""
        if not self.args.token_cache:
            if self.args.cache_images:
                raise TrainError("--cache-images needs --token-cache (the folder to keep them in)")
            return source
        count = self.args.cache_images or (len(source) if len(source) <= 1_000_000 else None)
        if count is None:
            raise TrainError("--token-cache with --data render needs --cache-images N (how many training renders "
                             "to encode)")
        with self.acc.main_process_first():
            cache = tokencache.build(self.args.token_cache, self.vae, source, count, describe=str(self.args.data),
                                     resolution=self.resolution(), log=lambda m: print(m, file=sys.stderr))
        return cache

    def state(self):
        return {"config": self.var.cfg.to_dict(), "model": self.var.state_dict(), "vae_config": self.vae.cfg.to_dict(),
                "vae": self.vae.state_dict(), "class_names": list(self.names)}

    @torch.no_grad()
    def tokens(self, x):
        return teacher_forcing(self.vae, x)

    def per_scale(self, ce_BL, hit_BL):
        """Mean CE and accuracy per scale: two (SN,) tensors."""
        SN = len(self.var.cfg.patch_nums)
        cnt = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, torch.ones_like(ce_BL[0]))
        ce = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, ce_BL.mean(0)) / cnt
        acc = torch.zeros(SN, device=ce_BL.device).index_add_(0, self.scale_of_token, hit_BL.float().mean(0)) / cnt
        return ce, acc

    def training_step(self, model, batch, step):
        if "tokens" in batch:  # a token cache
            target = batch["tokens"]
            with torch.no_grad():
                sizes = [p * p for p in self.var.cfg.patch_nums]
                x_in = self.vae.quantize.tokens_to_var_input(list(target.split(sizes, dim=1)))
        else:
            target, x_in = self.tokens(batch["image"])
        logits = model(batch["class_id"], x_in)  # (B, L, V) fp32; class dropout inside
        B, L, V = logits.shape
        ce = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none",
                             label_smoothing=self.args.label_smoothing).view(B, L)
        loss = (ce.mean(0) * self.token_weight).sum()
        with torch.no_grad():
            hit = logits.argmax(-1) == target
            ce_s, acc_s = self.per_scale(ce.detach(), hit)
            acc = hit.float().mean()
        w = torch.stack([ce_s, acc_s])
        self.window = w if self.window is None else self.window + w
        self.window_n = getattr(self, "window_n", 0) + 1
        return loss, {"acc": acc, "ce_token_mean": ce.detach().mean()}

    def _group_metrics(self, ce_s, acc_s, prefix=""):
        out = {}
        for g, idx in self.groups.items():
            out[f"{prefix}ce_{g}"] = float(ce_s[idx].mean())
            out[f"{prefix}acc_{g}"] = float(acc_s[idx].mean())
        out[f"{prefix}ce_per_scale"] = [round(float(v), 4) for v in ce_s]
        out[f"{prefix}acc_per_scale"] = [round(float(v), 4) for v in acc_s]
        return out

    def window_metrics(self):
        if self.window is None:
            return {}
        w = self.acc.reduce(self.window / self.window_n, reduction="mean")
        self.window, self.window_n = None, 0
        return self._group_metrics(w[0], w[1])

    def set_eval_batch(self, batch):
        self.eval_batch = None
        if batch is not None:
            x = to_resolution(batch["image"], self.resolution()).to(self.device)
            target, x_in = self.tokens(x)
            self.eval_batch = (batch["class_id"].to(self.device), target, x_in)

    @torch.no_grad()
    def evaluate(self):
        if self.eval_batch is None:
            return {}
        labels, target, x_in = self.eval_batch
        self.var.eval()
        try:
            logits = self.var(labels, x_in, cond_drop_rate=0.0)
        finally:
            self.var.train()
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none").view(target.shape)
        hit = logits.argmax(-1) == target
        ce_s, acc_s = self.per_scale(ce, hit)
        return {"ce": float(ce.mean()), "acc": float(hit.float().mean()), **self._group_metrics(ce_s, acc_s)}

    def pipeline(self):
        """A sampling pipeline over a copy of the current weights (the pipeline freezes its models)."""
        from studio.pipeline import VARPipeline

        var = VAR(self.var.cfg)
        var.load_state_dict(self.var.state_dict())
        return VARPipeline(self.vae, var, self.names, device=self.device)

    def write_samples(self, path):
        """One row per class, `--num-samples` images each, always from the same generator seed."""
        pipe = self.pipeline()
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        n = self.args.num_samples
        out = pipe(class_labels=list(range(len(self.names))), num_images_per_label=n, guidance_scale=self.args.guidance,
                   top_k=self.args.top_k, top_p=self.args.top_p, generator=gen, output_type="pt")
        imgs = out.images.mul(2).sub(1)
        image_grid([imgs[i * n:(i + 1) * n] for i in range(len(self.names))], path)

    def export(self, folder, info):
        from studio import checkpoints

        checkpoints.save_bundle(folder, self.vae, self.var, self.names, dtype=torch.float16,
                                extra_config={"training": info})
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"[train] bundle written to {folder} ({size / 2**20:.1f} MiB)")
        if size > 64 * 2**20:
            print("[train] warning: the bundle is over 64 MiB", file=sys.stderr)
