"""Command-line generation: one call of VARPipeline, the result saved as PNG with its parameters.

    python -m studio.generate --class "alpine day" --seed 0 --out out.png
    python -m studio.generate --model weights/:d16 --class volcano --num-images 4 --scales-dir scales/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from studio import params
from studio.checkpoints import CheckpointError
from studio.params import Sampling, UserError
from studio.pipeline import VARPipeline
from studio.pngmeta import encode_png, read_png_parameters  # noqa: F401 (read_png_parameters: API)


def save_png_with_parameters(image: Image.Image, path: Path, parameters: dict) -> None:
    """PNG with the generation parameters in a text chunk named 'parameters' (JSON)."""
    Path(path).write_bytes(encode_png(image, parameters))


def _label(s: str):
    return int(s) if s.lstrip("-").isdigit() else s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate images with a VAR model")
    ap.add_argument("--model", default=None, help="weights folder, folder:d16, bundle, hub id (default: embedded)")
    ap.add_argument("--class", dest="classes", action="append", default=None,
                    help="class id or name (repeatable; default: a random class)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0: the same images every run)")
    ap.add_argument("--guidance", type=float, default=Sampling.guidance_scale)
    ap.add_argument("--top-k", type=int, default=Sampling.top_k)
    ap.add_argument("--top-p", type=float, default=Sampling.top_p)
    ap.add_argument("--more-smooth", action="store_true")
    ap.add_argument("--num-images", type=int, default=Sampling.num_images,
                    help=f"images per class (at most {params.spec(Sampling, 'num_images')[1].maximum})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="out.png", help="output PNG (index appended for several images)")
    ap.add_argument("--scales-dir", default=None, help="also save the decoded image after every scale here")
    ap.add_argument("--list-classes", action="store_true")
    args = ap.parse_args(argv)
    try:
        params.spec(Sampling, "num_images")[1].check("num_images", args.num_images)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        pipe = VARPipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list_classes:
        for i, n in enumerate(pipe.class_names):
            print(i, n)
        return 0

    scales_dir = Path(args.scales_dir) if args.scales_dir else None
    if scales_dir:
        scales_dir.mkdir(parents=True, exist_ok=True)

    def on_scale(ev):
        print(f"scale {ev.scale_index + 1:2d}/{ev.num_scales} ({ev.patch_num}x{ev.patch_num}) {ev.seconds:.3f}s",
              file=sys.stderr)
        if scales_dir:
            for b, im in enumerate(pipe.postprocess(pipe.decode_fhat(ev.f_hat))):
                im.save(scales_dir / f"img{b}_scale{ev.scale_index:02d}_{ev.patch_num}x{ev.patch_num}.png")

    labels = [_label(c) for c in args.classes] if args.classes else None
    try:
        out = pipe(class_labels=labels, guidance_scale=args.guidance, top_k=args.top_k, top_p=args.top_p,
                   more_smooth=args.more_smooth, num_images_per_label=args.num_images,
                   generator=torch.Generator(args.device).manual_seed(args.seed), callback_on_scale_end=on_scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    for i, (im, lab) in enumerate(zip(out.images, out.class_labels)):
        path = target if len(out.images) == 1 else target.with_name(f"{target.stem}_{i}{target.suffix}")
        record = {"model": pipe.source, "class_id": lab,
                  "class_name": pipe.class_names[lab] if lab < len(pipe.class_names) else "unconditional",
                  "seed": args.seed, "index_in_batch": i, "guidance_scale": args.guidance, "top_k": args.top_k,
                  "top_p": args.top_p, "more_smooth": args.more_smooth, "dtype": args.dtype}
        save_png_with_parameters(im, path, record)
        print(path)
    print(f"total {out.timings['total']:.2f}s (decode {out.timings['decode']:.2f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
