"""Does a 2x upscale of the studio's 128 px results earn a button? Candidates against bicubic, on
held-out world renders: each 256 px render is downscaled to 128 px (the studio's Lanczos), upscaled
back 2x by every candidate, and compared with the 256 px render.

    python -m lab.upscale                      # 24 held-out renders, the embedded default's decoder
    python -m lab.upscale --n 64 --model runs/bundle

Columns: PSNR against the 256 px render (dB, mean; higher is closer), high-frequency energy (the
variance of the Laplacian, lab.metrics.high_frequency_energy) as a share of the render's (1.00 = as
much fine detail as the render; bicubic's blur is below 1, sharpening and ringing push it up),
and the time per image. A candidate earns a button only if it beats bicubic on PSNR without
losing detail, or adds detail without losing PSNR.

Candidates: PIL bicubic (the baseline) and Lanczos; OpenCV's linear, cubic and Lanczos4; bicubic
with an unsharp mask; the model's own decoder on its 2x-upsampled latent (the quantised f_hat of
the 128 px input, and the encoder's continuous latent), a "learned" upscale for free. OpenCV's
dnn_superres (EDSR, ESPCN, FSRCNN, LapSRN) needs opencv-contrib and model files that cannot be had
offline: reported as unavailable when missing.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lab.metrics import high_frequency_energy, psnr
from studio import images as im
from studio.world import render

HELD_OUT = 10_000_000  # seeds from here on are never trained on


def _pil(mode) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.asarray(Image.fromarray(x).resize((x.shape[1] * 2, x.shape[0] * 2), mode))


def _cv(flag) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: cv2.resize(x, (x.shape[1] * 2, x.shape[0] * 2), interpolation=flag)


def _unsharp(x: np.ndarray, amount: float = 0.6, sigma: float = 1.0) -> np.ndarray:
    up = _pil(Image.Resampling.BICUBIC)(x).astype(np.float32)
    return np.clip(up + amount * (up - cv2.GaussianBlur(up, (0, 0), sigma)), 0, 255).round().astype(np.uint8)


def _decoder(pipe, quantised: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The model's decoder on the input's latent upsampled 2x (bicubic on the latent grid)."""
    vae = pipe.vae

    @torch.no_grad()
    def up(x: np.ndarray) -> np.ndarray:
        t = pipe.preprocess(Image.fromarray(x))
        f = vae.img_to_f(t)
        if quantised:
            _, f = vae.quantize.f_to_tokens(f, return_fhat=True)
        f2 = F.interpolate(f.float(), scale_factor=2, mode="bicubic", align_corners=False)
        y = vae.fhat_to_img(f2.to(t.dtype)).float().clamp(-1, 1)
        return ((y[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)

    return up


def candidates(pipe=None) -> Dict[str, Callable[[np.ndarray], np.ndarray]]:
    out = {"bicubic (PIL, baseline)": _pil(Image.Resampling.BICUBIC),
           "lanczos (PIL)": _pil(Image.Resampling.LANCZOS),
           "linear (OpenCV)": _cv(cv2.INTER_LINEAR),
           "cubic (OpenCV)": _cv(cv2.INTER_CUBIC),
           "lanczos4 (OpenCV)": _cv(cv2.INTER_LANCZOS4),
           "bicubic + unsharp 0.6": _unsharp}
    if pipe is not None:
        out["decoder on 2x f_hat"] = _decoder(pipe, quantised=True)
        out["decoder on 2x latent"] = _decoder(pipe, quantised=False)
    return out


def measure(n: int, pipe=None, size: int = 256) -> List[dict]:
    renders = [np.asarray(render(HELD_OUT + i, size=size).image.convert("RGB")) for i in range(n)]
    inputs = [im.to_uint8(im.resize(im.to_float_rgb(r), (size // 2, size // 2))) for r in renders]
    hf_render = high_frequency_energy(np.stack(renders))
    rows = []
    for name, fn in candidates(pipe).items():
        t = time.perf_counter()
        outs = [fn(x) for x in inputs]
        seconds = (time.perf_counter() - t) / n
        rows.append(dict(name=name,
                         psnr=float(np.mean([psnr(o.astype(np.float64) / 255, r.astype(np.float64) / 255)
                                             for o, r in zip(outs, renders)])),
                         hf=float(np.mean(high_frequency_energy(np.stack(outs)) / hf_render)),
                         ms=seconds * 1000))
    return rows


def table(rows: List[dict]) -> str:
    base = rows[0]
    lines = [f"{'candidate':<26} {'PSNR dB':>8} {'vs bicubic':>10} {'HF / render':>11} {'ms/img':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<26} {r['psnr']:8.2f} {r['psnr'] - base['psnr']:+10.2f} {r['hf']:11.2f} {r['ms']:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="2x upscale candidates against bicubic on held-out renders")
    ap.add_argument("--n", type=int, default=24, help="held-out renders (default 24)")
    ap.add_argument("--model", default=None, help="a bundle for the decoder candidates (default: the embedded one)")
    ap.add_argument("--no-decoder", action="store_true", help="leave the model's decoder out")
    args = ap.parse_args(argv)
    pipe = None
    if not args.no_decoder:
        from studio.pipeline import VARPipeline
        pipe = VARPipeline.from_pretrained(args.model, device="cpu")
    print(f"2x upscale, {args.n} held-out renders (seeds {HELD_OUT}..): 128 px input -> 256 px, against the 256 px render")
    print(table(measure(args.n, pipe)))
    if not hasattr(cv2, "dnn_superres"):
        print("cv2.dnn_superres: not available (needs opencv-contrib-python and EDSR/ESPCN/FSRCNN model files, "
              "which cannot be fetched offline)")


if __name__ == "__main__":
    main()
