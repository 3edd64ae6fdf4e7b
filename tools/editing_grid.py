"""Picture grid of editing on held-out renders: input | mask | in-painted | out-painted (right half).

    python tools/editing_grid.py --model default --n 4 --out docs/editing_grid.png
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.pipeline import VARPipeline  # noqa: E402
from studio.world import render  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", default="docs/editing_grid.png")
    args = ap.parse_args(argv)
    pipe = VARPipeline.from_pretrained(None if args.model == "default" else args.model)
    R = pipe.resolution
    a, b = R // 4, R - R // 4
    mask = np.zeros((R, R), np.uint8)
    mask[a:b, a:b] = 255
    rows = []
    for i in range(args.n):
        img = render(10_000_000 + 37 * i, size=R).image
        g = torch.Generator().manual_seed(i)
        inp = pipe.inpaint(img, Image.fromarray(mask), generator=g, mask_blur=4, inpaint_area="whole").images[0]
        half = img.crop((0, 0, R // 2, R))
        outp = pipe.outpaint(half, right=R - R // 2, window=R, generator=torch.Generator().manual_seed(i)).images[0]
        rows.append([img, Image.fromarray(mask).convert("RGB"), inp, outp])
    pad = 4
    grid = Image.new("RGB", (4 * R + 5 * pad, args.n * R + (args.n + 1) * pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (R + pad), pad + r * (R + pad)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
