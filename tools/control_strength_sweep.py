"""Control adherence of a bundle's adapters at several strengths, on held-out renders that the
eval's sets do not use (seeds EVAL_SEED_START + 1000 on), with the eval's judges.

    python tools/control_strength_sweep.py --model default --n 20 --strengths 0,1,1.5,2,3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import domain as dom
from studio import checkpoints, preprocess as pp  # noqa: E402
from lab.eval import CONTROL_JUDGES, CONTROL_METRICS, control_score  # noqa: E402
from studio.pipeline import VARPipeline  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a bundle folder, or 'default'")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--strengths", default="0,1,1.5,2,3")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    strengths = [float(v) for v in args.strengths.split(",")]
    src = None if args.model == "default" else args.model
    pipe = VARPipeline.from_pretrained(src)
    nets = dom.load_domain_nets(checkpoints.default_bundle_path() if src is None else Path(src))
    A = dom.render_arrays(dom.held_out_seeds(args.n, 1000), pipe.resolution)
    labels = A["class_ids"].tolist()
    print(f"{'strength':<16}" + "".join(f"{s:>8g}" for s in strengths))
    for t in [t for t in CONTROL_JUDGES if t in pipe.controls]:
        maps = pp.ground_truth_maps(t, images=A["images"], depth_m=A["depth"], labels=A["labels"],
                                    near=nets["depth"].cfg.near, far=nets["depth"].cfg.far)
        row = []
        for s in strengths:
            kw = dict(control_image=maps, control_type=t, control_strength=s) if s else {}
            x = pipe(class_labels=labels, guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                     output_type="pt", **kw).images.float() * 2 - 1
            row.append(control_score(t, x, maps, nets))
        print(f"{CONTROL_METRICS[t]:<16}" + "".join(f"{v:>8.3f}" for v in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
