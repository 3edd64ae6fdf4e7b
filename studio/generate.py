"""Command-line generation: one call of VARPipeline, the result saved as PNG with its parameters.

    python -m studio.generate --class "alpine day" --seed 0 --out out.png
    python -m studio.generate --model weights/:d16 --class volcano --num-images 4 --scales-dir scales/
    python -m studio.generate --model weights/infinity-2b --prompt "a red fox in the snow" --aspect-ratio 16:9
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from studio import params
from studio.checkpoints import CheckpointError
from studio.params import VAR_DEFAULTS, Sampling, UserError
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
    ap.add_argument("--guidance", type=float, default=None,
                    help=f"classifier-free guidance (default: VAR {VAR_DEFAULTS['guidance_scale']}, Infinity's own)")
    ap.add_argument("--top-k", type=int, default=None, help=f"default: VAR {VAR_DEFAULTS['top_k']}, Infinity's own")
    ap.add_argument("--top-p", type=float, default=None, help=f"default: VAR {VAR_DEFAULTS['top_p']}, Infinity's own")
    ap.add_argument("--more-smooth", action="store_true")
    ap.add_argument("--num-images", type=int, default=Sampling.num_images,
                    help=f"images per class (at most {params.spec(Sampling, 'num_images')[1].maximum})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="out.png", help="output PNG (index appended for several images)")
    ap.add_argument("--scales-dir", default=None, help="also save the decoded image after every scale here")
    ap.add_argument("--list-classes", action="store_true")
    inf = ap.add_argument_group("Infinity (text-to-image; --model is an Infinity weights folder)")
    inf.add_argument("--prompt", action="append", default=None, help="the prompt (repeatable)")
    inf.add_argument("--negative-prompt", default=None)
    inf.add_argument("--tau", type=float, default=None, help="sampling temperature (default: the model's)")
    inf.add_argument("--aspect-ratio", default=None, help="width:height, e.g. 16:9 (the nearest official size)")
    inf.add_argument("--height", type=int, default=None)
    inf.add_argument("--width", type=int, default=None)
    inf.add_argument("--pn", default=None, help="0.06M, 0.25M, 0.60M or 1M (default: the model's)")
    inf.add_argument("--text-encoder", default=None, help="flan-t5-xl folder or hub id")
    args = ap.parse_args(argv)
    from studio.infinity import is_infinity_folder
    if args.model and is_infinity_folder(args.model):
        return _main_infinity(args)
    if args.prompt:
        print("error: --prompt needs an Infinity model (--model <folder with infinity_*.pth>)", file=sys.stderr)
        return 2
    for name, field in (("guidance", "guidance_scale"), ("top_k", "top_k"), ("top_p", "top_p")):
        if getattr(args, name) is None:
            setattr(args, name, VAR_DEFAULTS[field])
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


def _main_infinity(args) -> int:
    from studio.infinity import InfinityPipeline, pack_bits

    if not args.prompt:
        print("error: an Infinity model needs --prompt", file=sys.stderr)
        return 2
    try:
        pipe = InfinityPipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                                text_encoder=args.text_encoder, pn=args.pn)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scales_dir = Path(args.scales_dir) if args.scales_dir else None
    if scales_dir:
        scales_dir.mkdir(parents=True, exist_ok=True)

    def on_scale(ev):
        print(f"scale {ev.scale_index + 1:2d}/{ev.num_scales} ({ev.size[0]}x{ev.size[1]}) {ev.seconds:.3f}s", file=sys.stderr)
        if scales_dir:
            for b, im in enumerate(pipe.vae_images(ev.summed_codes)):
                im.save(scales_dir / f"img{b}_scale{ev.scale_index:02d}_{ev.size[0]}x{ev.size[1]}.png")

    sampling = dict(guidance_scale=args.guidance, tau=args.tau, top_k=args.top_k, top_p=args.top_p)
    try:
        out = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   aspect_ratio=args.aspect_ratio, num_images_per_prompt=args.num_images,
                   generator=torch.Generator(args.device).manual_seed(args.seed), callback_on_scale_end=on_scale,
                   **sampling)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    used = dict(pipe.default_sampling(), **{k: v for k, v in sampling.items() if v is not None})
    sched = pipe.schedule(out.height, out.width)
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    for i, (im, prompt) in enumerate(zip(out.images, out.prompts)):
        path = target if len(out.images) == 1 else target.with_name(f"{target.stem}_{i}{target.suffix}")
        record = {"model": pipe.source, "family": "infinity", "prompt": prompt, "negative_prompt": args.negative_prompt,
                  "seed": args.seed, "index_in_batch": i, "height": out.height, "width": out.width, "pn": sched.pn,
                  "dtype": args.dtype, **used, "bit_scales": [list(b.shape[1:3]) for b in out.tokens],
                  "bits_per_position": pipe.bits_per_position}
        Path(path).write_bytes(encode_png(im, record, pack_bits([b[i] for b in out.tokens])))
        print(path)
    print(f"total {out.timings['total']:.2f}s (decode {out.timings['decode']:.2f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
