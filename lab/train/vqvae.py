"""`vqvae` trainer: the multi-scale VQVAE tokenizer (reconstruction + quantiser loss, dead-code restarts)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.train.artifacts import image_grid, save_vqvae
from lab.train.config import add_config_flags, config_from_args, note_ignored_config
from lab.train.data import to_resolution
from lab.train.task import Task, psnr, register
from models.vqvae import VQVAE, VQVAEConfig

# The embedded default: 128 px, a 16x16 latent and the official ten scales (L = 680 tokens), sized
# for about an hour of training on two CPU cores (3.2M parameters; the VAR trainer's default is 5M).
DEFAULT_VQVAE = dict(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                     using_sa=False, using_mid_sa=True, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))

USAGE_EMA_DECAY = 0.97  # per-step decay of MultiScaleQuantizer.ema_vocab_hit_SV (models/vqvae.py)


@torch.no_grad()
def quantizer_queries(q, f_BChw) -> torch.Tensor:
    """Every vector the multi-scale quantiser looks up for `f`, as (N, C, 1, 1): the area-downsampled
    residual at each scale. Dead codes restarted onto these land where the lookups are (raw latent
    vectors would only serve the first scale: later scales quantise small residuals)."""
    f = f_BChw.detach().float()
    B, C, H, W = f.shape
    tokens = q.f_to_tokens(f)
    SN = len(q.patch_nums)
    queries = []
    for si, pn in enumerate(q.patch_nums):
        rest = f if si == 0 else f - q.tokens_to_fhat(tokens[:si])
        z = F.interpolate(rest, size=(pn, pn), mode="area") if si != SN - 1 else rest
        queries.append(z.permute(0, 2, 3, 1).reshape(-1, C))
    return torch.cat(queries).view(-1, C, 1, 1)


class TokenizerTask(Task):
    """What the trainers of a tokenizer (`self.vae`) share: the held-out images, a sample grid of
    them and two of their decodes (`evaluate` sets `eval_decodes`), and the VQVAE files as output."""

    eval_decodes: tuple = ()

    def set_eval_batch(self, batch):
        self.eval_x = None if batch is None else to_resolution(batch["image"], self.resolution()).to(self.device)

    def write_samples(self, path):
        """Rows: the held-out images, their decodes from all scales, from the first half of the scales."""
        if self.eval_x is None:
            return
        if not self.eval_decodes:
            self.evaluate()
        n = self.args.num_samples
        image_grid([self.eval_x[:n], *(d[:n] for d in self.eval_decodes)], path)

    def final_files(self, out, info):
        save_vqvae(Path(out), self.vae, info)

    def export(self, folder, info):
        save_vqvae(Path(folder), self.vae, info)


@register
class VQVAETask(TokenizerTask):
    name = "vqvae"
    help = "train the multi-scale VQVAE tokenizer"
    defaults = dict(lr=1e-3, batch_size=8, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                    warmup_steps=100, num_samples=8)
    find_unused_parameters = True  # with few scales some shared Phi convs serve no scale
    panels = [("train loss", "train", ["loss", "rec", "vq", "edge"], True),
              ("held-out PSNR (dB)", "eval", ["psnr", "psnr_half_scales"], False),
              ("codebook", "train", ["codes_used_pct"], False)]

    @classmethod
    def add_arguments(cls, p):
        add_config_flags(p, VQVAEConfig, DEFAULT_VQVAE)
        g = p.add_argument_group("vqvae loss")
        g.add_argument("--rec-loss", choices=["l1", "l2", "l1+l2"], default="l1+l2",
                       help="reconstruction loss on the decoded straight-through f_hat")
        g.add_argument("--vq-weight", type=float, default=1.0, help="weight of the quantiser loss")
        g.add_argument("--edge-weight", type=float, default=0.0,
                       help="weight of an L1 loss on image gradients (sharper edges)")
        g.add_argument("--codebook-init", choices=["data", "random"], default="data",
                       help="data: after the first step, move every unused code onto a vector the quantiser "
                            "looked up (fresh runs only)")
        g.add_argument("--restart-every", type=int, default=25, help="restart dead codes every N steps (0: never)")
        g.add_argument("--restart-after", type=int, default=25, help="... from this step on")
        g.add_argument("--restart-threshold", type=float, default=1e-4,
                       help="a code is dead when its usage EMA summed over scales is below this")
        g.add_argument("--restart-grace", type=int, default=25,
                       help="a restarted code that no scale picks is dead again after this many steps")

    class Module(nn.Module):
        """The training pass as one forward (what DDP and autocast wrap)."""

        def __init__(self, vae: VQVAE):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            f = self.vae.img_to_f(x)
            f_hat, vq_loss, usage = self.vae.quantize(f)
            rec = self.vae.decoder(self.vae.post_quant_conv(f_hat))
            return rec.float(), vq_loss, usage, f.detach()

    def build(self, ckpt):
        if ckpt is not None:
            cfg = dict(ckpt["config"])
            note_ignored_config(VQVAEConfig, self.args, cfg)
        else:
            cfg = config_from_args(VQVAEConfig, self.args, DEFAULT_VQVAE)
        self.vae = VQVAE(VQVAEConfig(**cfg))
        if ckpt is not None:
            self.vae.load_state_dict(ckpt["model"])
        self.usage = torch.zeros(len(self.vae.cfg.patch_nums), self.vae.cfg.vocab_size, device=self.device)
        self.last_f = None
        return self.Module(self.vae)

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.vae.cfg.to_dict(), "model": self.vae.state_dict()}

    def training_step(self, model, batch, step):
        x = batch["image"]
        rec, vq_loss, usage, f = model(x)
        a = self.args
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).square().mean()
        rec_loss = {"l1": l1, "l2": l2, "l1+l2": l1 + l2}[a.rec_loss]
        loss = rec_loss + a.vq_weight * vq_loss
        m = {"rec": rec_loss.detach(), "vq": vq_loss.detach(), "l1": l1.detach(),
             "psnr_train": psnr(rec.detach().clamp(-1, 1), x).mean()}
        if a.edge_weight > 0:
            edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
            loss = loss + a.edge_weight * edge
            m["edge"] = edge.detach()
        self.usage += usage.detach()
        self.last_f = f
        return loss, m

    def after_step(self, step):
        a = self.args
        init = step == 1 and a.codebook_init == "data"
        periodic = a.restart_every > 0 and step >= a.restart_after and step % a.restart_every == 0
        if (init or periodic) and self.last_f is not None:
            q = self.vae.quantize
            before = q.embedding.weight.detach().clone()
            n = q.restart_dead_codes(quantizer_queries(q, self.last_f), threshold=a.restart_threshold)
            if n:  # the quantiser marks restarted codes as used for ~100 steps: shorten that to the grace
                moved = (q.embedding.weight.detach() != before).any(1)
                SN = q.ema_vocab_hit_SV.shape[0]
                q.ema_vocab_hit_SV[:, moved] = a.restart_threshold / SN / USAGE_EMA_DECAY ** max(a.restart_grace, 0)
            if self.acc.num_processes > 1:  # every process must keep the same codebook
                from accelerate.utils import broadcast

                broadcast(q.embedding.weight.data, from_process=0)
                broadcast(q.ema_vocab_hit_SV, from_process=0)
            self.restarted = getattr(self, "restarted", 0) + n
        self.last_f = None

    def window_metrics(self):
        u = self.acc.reduce(self.usage, reduction="sum").sum(0)
        self.usage.zero_()
        total = u.sum()
        if total == 0:
            return {}
        p = u / total
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        out = {"codes_used_pct": 100.0 * float((u > 0).float().mean()), "perplexity": float(ent.exp())}
        out["codes_restarted"] = getattr(self, "restarted", 0)
        self.restarted = 0
        return out

    @torch.no_grad()
    def evaluate(self):
        if self.eval_x is None:
            return {}
        self.vae.eval()
        try:
            tokens = self.vae.img_to_tokens(self.eval_x)
            rec = self.vae.tokens_to_img(tokens)
            half = self.vae.tokens_to_img(tokens[: (len(tokens) + 1) // 2])
            used = torch.cat(tokens, 1).unique().numel()
        finally:
            self.vae.train()
        self.eval_decodes = (rec, half)
        return {"psnr": float(psnr(rec, self.eval_x).mean()), "psnr_half_scales": float(psnr(half, self.eval_x).mean()),
                "eval_codes_used": used}
