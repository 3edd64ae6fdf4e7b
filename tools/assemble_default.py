"""Assemble the embedded default bundle (assets/default) from trained parts.

    python tools/assemble_default.py --var runs/var_export --domain runs/domain --out assets/default

--var is a bundle written by `python -m lab.train var --export ...` (VQVAE + transformer), with
the control adapters that `python -m lab.train control --export` added to it, if any;
--domain is a folder of domain nets written by `python -m lab.domain train ...`. Everything is
stored as fp16 safetensors next to one config.json; the total size is printed (the budget is 64 MB).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio import checkpoints  # noqa: E402
from lab.domain import bundle_parts, load_domain_nets  # noqa: E402
from studio.pipeline import VARPipeline  # noqa: E402


def swap_tokenizer(pipe, folder) -> None:
    """Put the VQVAE of `folder` into `pipe`, refusing one whose tokens would differ (encoder, quant_conv
    or quantiser changed): the transformer and the adapters were trained on the old tokens."""
    from lab.train import load_vqvae

    try:
        new = load_vqvae(folder).to(pipe.vae.quant_conv.weight.device)
    except ValueError as e:  # lab.train.TrainError or a CheckpointError: a readable reason
        raise SystemExit(f"--vae {e}") from e
    mine, theirs = pipe.vae.state_dict(), new.state_dict()
    token_side = [k for k in mine if not k.startswith(("decoder.", "post_quant_conv.")) and "ema_vocab_hit" not in k]
    changed = [k for k in token_side if not torch.equal(mine[k].float(), theirs[k].float().to(mine[k].device))]
    if changed:
        raise SystemExit(f"--vae {folder}: its encoder/codebook differ from --var's ({', '.join(changed[:4])} ...); "
                         "the transformer would read other tokens")
    if new.cfg != pipe.vae.cfg:  # another decoder layout (e.g. fixed norms): same keys, other modules
        ref = pipe.vae.quant_conv.weight
        pipe.vae = new.to(ref.device, ref.dtype).eval()
    else:
        pipe.vae.load_state_dict({k: v.to(mine[k].dtype) for k, v in theirs.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--var", required=True, help="bundle with the VQVAE and the transformer")
    ap.add_argument("--domain", required=True, help="folder with depth/seg/class .safetensors")
    ap.add_argument("--control", action="append", default=[],
                    help="a bundle holding control adapters trained on the same transformer (repeatable)")
    ap.add_argument("--vae", help="take the tokenizer from this export (e.g. `lab.train decoder --export`): its "
                                   "encoder and codebook must equal --var's, so the tokens stay the same")
    ap.add_argument("--preview-images", type=int, default=8,
                    help="samples the live preview's colour map is fitted on (0: ship none)")
    ap.add_argument("--out", default="assets/default")
    ap.add_argument("--max-mb", type=float, default=64.0)
    args = ap.parse_args(argv)
    pipe = VARPipeline.from_pretrained(args.var)
    for folder in args.control:
        other = VARPipeline.from_pretrained(folder)
        mine, theirs = pipe.var.state_dict(), other.var.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
            raise SystemExit(f"{folder}: its transformer differs from --var's; its adapters were trained for another model")
        for adapter in other.controls.values():
            pipe.add_control(adapter)
    if args.vae:
        swap_tokenizer(pipe, args.vae)
    nets = load_domain_nets(args.domain, required=True)
    extra_cfg, extra_tensors = bundle_parts(nets)
    if pipe.controls:  # adapters trained on this transformer
        extra_cfg["control"] = {t: a.cfg.to_dict() for t, a in pipe.controls.items()}
        extra_tensors.update({f"control_{t}": a.state_dict() for t, a in pipe.controls.items()})
    if args.preview_images:  # fitted last: it depends on the decoder
        from studio import preview

        fmap = preview.fit_fast_map(pipe, num_images=args.preview_images)
        err = preview.colour_error_per_scale(pipe, fmap, num_images=4, seed=1)
        pcfg, ptensors = preview.bundle_parts(fmap, f"fitted on {args.preview_images} samples; colour error per "
                                                    f"scale (0-255, 4 other samples): {[round(e, 1) for e in err]}")
        extra_cfg.update(pcfg)
        extra_tensors.update(ptensors)
    extra_cfg["about"] = "VAR Studio embedded default: a small VAR trained on the procedural landscape world"
    out = Path(args.out)
    checkpoints.save_bundle(out, pipe.vae, pipe.var, pipe.class_names, torch.float16, extra_cfg, extra_tensors)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2 ** 20
    print(f"wrote {out}: {size:.1f} MB ({', '.join(sorted(p.name for p in out.iterdir()))})")
    if size > args.max_mb:
        raise SystemExit(f"the bundle is {size:.1f} MB, over the {args.max_mb} MB budget")


if __name__ == "__main__":
    main()
