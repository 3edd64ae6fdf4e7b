"""Compare two tokenizers' decoders on the same tokens: a grid for a model card.

    python tools/decoder_grid.py --old runs/bundle_v4 --new assets/default --out assets/default/samples/reconstructions.png

Rows: held-out renders (seeds 10,000,000+), the old decoder's reconstructions, the new one's, then decodes of
the first --prefix scales (what the live preview and a re-roll decode) by the old and the new decoder. The two
tokenizers must read the same tokens (the encoder and codebook of the new one are checked equal)."""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.pipeline import VARPipeline  # noqa: E402
from studio.world import render_batch  # noqa: E402


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="bundle with the old decoder")
    ap.add_argument("--new", required=True, help="bundle with the new decoder (same tokens)")
    ap.add_argument("--n", type=int, default=6, help="held-out renders (columns)")
    ap.add_argument("--prefix", type=int, default=5, help="scales in the coarse-prefix rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    old, new = (VARPipeline.from_pretrained(p, device="cpu", dtype=torch.float32).vae for p in (args.old, args.new))
    size = old.cfg.resolution
    images, *_ = render_batch(range(10_000_000, 10_000_000 + args.n), size=size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens = old.img_to_tokens(x)
    if any(not torch.equal(a, b) for a, b in zip(tokens, new.img_to_tokens(x))):
        raise SystemExit("the two tokenizers read different tokens: their decoders cannot be compared on the same maps")
    q = old.quantize
    full, pre = q.tokens_to_fhat(tokens), q.tokens_to_fhat(tokens[:args.prefix])
    rows = [images, to_u8(old.fhat_to_img(full)), to_u8(new.fhat_to_img(full)),
            to_u8(old.fhat_to_img(pre)), to_u8(new.fhat_to_img(pre))]
    pad = 2
    grid = np.full((len(rows) * (size + pad) - pad, args.n * (size + pad) - pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid[r * (size + pad):r * (size + pad) + size, c * (size + pad):c * (size + pad) + size] = im
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
