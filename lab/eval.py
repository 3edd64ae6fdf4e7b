"""Quality metrics of a model on the landscape world, printed as a table.

    python -m lab.eval                                  # the embedded default, all sections
    python -m lab.eval --model runs/bundle --n 200 --out runs/eval --sections reconstruction,class
    python -m lab.eval --domain runs/domain             # domain nets from another folder

Sections (run in this order; `--sections` picks some):
  reconstruction   VQVAE reconstruction PSNR on held-out renders
  sharpness        high-frequency energy, canny edge density and F1, chroma anomaly: renders,
                   reconstructions and samples
  detail           which scales lose the samples' detail: renders' tokens kept below scale k, the rest
                   sampled, high-frequency energy against the renders'
  class            the class recogniser's accuracy on generated images (default guidance) and on renders
  frechet          domain Frechet distance: generated vs renders, beside the render-vs-render floor
                   (two disjoint held-out sets) and VQVAE reconstructions vs renders
  preprocessors    the depth and segmentation nets' own error on held-out renders (and reconstructions)
  control          adherence to canny / depth / segmentation maps with each adapter, beside no adapter;
                   grids (render, map, with, without) in --out/control
  samples          one PNG grid per class in --out: a row of renders, then generated images

The Frechet distance here is computed on ClassNet's penultimate features (a recogniser trained on
this world only): a *domain* Frechet distance, NOT comparable to published (Inception) FID numbers.

Other parts of the studio add their own tables with the registry:

    from lab.eval import register_section, Row
    @register_section("editing", help="preservation outside masks, seam error")
    def editing_section(ctx):              # ctx: EvalContext (pipe, nets, renders, generated, ...)
        return [Row("seam error", 0.01, note="...")]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from lab import metrics
from lab import domain as dom

FD_NOTE = "domain FD (ClassNet features), not comparable to published FID"


@dataclass
class Row:
    metric: str
    value: Optional[float]
    fmt: str = "{:.4f}"
    note: str = ""
    section: str = ""

    def value_str(self) -> str:
        if self.value is None:
            return "-"
        if isinstance(self.value, float) and math.isinf(self.value):
            return "inf"
        return self.fmt.format(self.value)


@dataclass
class Section:
    name: str
    fn: Callable[["EvalContext"], List[Row]]
    help: str = ""
    needs: Sequence[str] = ()  # domain nets ("depth", "seg", "class") and/or "world" (world classes)


SECTIONS: Dict[str, Section] = {}


def register_section(name: str, help: str = "", needs: Sequence[str] = ()):
    """Decorator: add a table section `fn(ctx) -> list[Row]` to `python -m lab.eval`."""

    def deco(fn):
        SECTIONS[name] = Section(name, fn, help, tuple(needs))
        return fn

    return deco


def default_guidance() -> float:
    from studio.pipeline import VARPipeline

    return float(inspect.signature(VARPipeline.__call__).parameters["guidance_scale"].default)


class EvalContext:
    """What sections share, computed once on first use: held-out renders at the model's resolution
    (two disjoint sets, A and B), the VQVAE's reconstructions of A, generated images (the same
    number per class, at `guidance`), and ClassNet features of each."""

    def __init__(self, pipe, nets: Dict[str, torch.nn.Module], n: int = 100, out: Optional[Path] = None,
                 seed: int = 0, guidance: Optional[float] = None, batch_size: int = 25, log=print):
        self.pipe, self.nets, self.n, self.seed, self.batch_size, self.log = pipe, nets, int(n), seed, batch_size, log
        self.out = Path(out) if out else None
        self.guidance = default_guidance() if guidance is None else float(guidance)
        self._cache: dict = {}

    def cached(self, key, make):
        if key not in self._cache:
            t = time.perf_counter()
            self._cache[key] = make()
            self.log(f"[eval] {key}: {time.perf_counter() - t:.1f}s")
        return self._cache[key]

    @property
    def is_world_model(self) -> bool:
        return [c.lower() for c in self.pipe.class_names] == [c.lower() for c in dom.world().CLASS_NAMES]

    @property
    def resolution(self) -> int:
        return self.pipe.resolution

    def renders(self, which: str = "A", size: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Held-out renders: set A = seeds EVAL_SEED_START + [0, n), set B = the next n."""
        size = size or self.resolution
        offset = {"A": 0, "B": self.n}[which]
        seeds = dom.held_out_seeds(self.n, offset)
        return self.cached(f"renders {which} @{size}", lambda: dom.render_arrays(seeds, size))

    def render_tensor(self, which: str = "A") -> torch.Tensor:
        return dom.images_to_tensor(self.renders(which)["images"])

    def reconstructions(self) -> torch.Tensor:
        """VQVAE reconstructions of set A, (n,3,R,R) in [-1, 1]."""

        def make():
            x = self.render_tensor("A")
            return torch.cat([self.pipe.decode(self.pipe.encode(xb)) for xb in x.split(self.batch_size)]).float()

        return self.cached("reconstructions", make)

    def generated(self) -> Dict[str, object]:
        """n generated images, classes 0..C-1 in turn: {"images": (n,3,R,R) [-1,1], "class_ids": (n,)}."""

        def make():
            C = self.pipe.num_classes
            labels = [i % C for i in range(self.n)]
            imgs = []
            for bi, start in enumerate(range(0, self.n, self.batch_size)):
                g = torch.Generator(device=self.pipe.device).manual_seed(self.seed * 100_003 + bi)
                out = self.pipe(class_labels=labels[start:start + self.batch_size], guidance_scale=self.guidance,
                                generator=g, output_type="pt")
                imgs.append(out.images.float() * 2 - 1)
            return {"images": torch.cat(imgs), "class_ids": np.asarray(labels, np.int64)}

        return self.cached(f"generated (guidance {self.guidance:g})", make)

    def features(self, which: str) -> np.ndarray:
        """ClassNet features of "renders A", "renders B", "reconstructions" or "generated"."""
        def make():
            src = {"renders A": lambda: self.render_tensor("A"), "renders B": lambda: self.render_tensor("B"),
                   "reconstructions": self.reconstructions, "generated": lambda: self.generated()["images"]}[which]()
            return dom.class_features(self.nets["class"], src)

        return self.cached(f"features {which}", make)


# ---------------------------------------------------------------------------------------------
# the built-in sections


@register_section("reconstruction", help="VQVAE reconstruction PSNR on held-out renders")
def reconstruction_section(ctx: EvalContext) -> List[Row]:
    x, r = ctx.render_tensor("A"), ctx.reconstructions()
    # images are compared in [0, 1] after the uint8 rounding a saved PNG would get
    a = dom.tensor_to_images(x).astype(np.float64) / 255
    b = dom.tensor_to_images(r).astype(np.float64) / 255
    return [Row("VQVAE recon PSNR (renders)", metrics.psnr(a, b, 1.0), "{:.2f} dB", f"n={ctx.n}, {ctx.resolution} px")]


@register_section("sharpness", help="detail and artifacts of renders, reconstructions and samples (OpenCV)")
def sharpness_section(ctx: EvalContext) -> List[Row]:
    """The tokenizer's ceiling seen as detail: high-frequency energy and the largest chroma anomaly
    relative to the renders (1.0 = as the renders), canny edge density, and the canny F1 of the
    reconstructions against the renders' own edges (1 px tolerance)."""
    sets = {"renders": dom.tensor_to_images(ctx.render_tensor("A")),
            "reconstructions": dom.tensor_to_images(ctx.reconstructions()),
            "samples": dom.tensor_to_images(ctx.generated()["images"])}
    hf = {k: float(np.mean(metrics.high_frequency_energy(v))) for k, v in sets.items()}
    chroma = {k: float(np.median(metrics.chroma_anomaly(v))) for k, v in sets.items()}
    edges = {k: np.stack([metrics.canny(im) for im in v]) for k, v in sets.items()}  # canny 100/200, once per set
    rows = []
    for k, v in sets.items():
        note = f"n={len(v)}" + (f", guidance {ctx.guidance:g}" if k == "samples" else "")
        rows += [Row(f"high-frequency energy, {k} / renders", hf[k] / max(hf["renders"], 1e-9), "{:.3f}",
                     f"{note}; variance of the Laplacian of the grey image (renders: {hf['renders']:.1f})"),
                 Row(f"canny edge density (100/200), {k}", float(edges[k].mean()), "{:.2%}", note),
                 Row(f"largest chroma anomaly, {k} / renders", chroma[k] / max(chroma["renders"], 1e-9), "{:.3f}",
                     f"{note}; median over images of max |CrCb - 9x9 median| (renders: {chroma['renders']:.1f})")]
    rows.append(Row("canny F1, reconstructions vs renders",
                    metrics.edge_f1(edges["reconstructions"], edges["renders"], 1), "{:.3f}",
                    "1 px tolerance, canny 100/200 on both"))
    return rows


def detail_scales(num_scales: int) -> List[int]:
    """The scales the detail section re-rolls from: the last one, the one before, and the middle."""
    return sorted({max(num_scales - 1, 0), max(num_scales - 2, 0), num_scales // 2}, reverse=True)


@register_section("detail", help="which scales lose detail: renders' tokens kept below scale k, the rest sampled")
def detail_section(ctx: EvalContext) -> List[Row]:
    """Where the samples' detail is lost: the renders of set A are tokenised, their scales 0..k-1 kept and
    the rest sampled (a re-roll from scale k, the render's class, the default settings), and the
    high-frequency energy of the results is set beside the renders' (k = all scales: the reconstructions).
    A big drop at the last scale says the transformer's finest predictions, not the tokenizer, blur."""
    x, cls = ctx.render_tensor("A"), ctx.renders("A")["class_ids"]
    ref = float(np.mean(metrics.high_frequency_energy(dom.tensor_to_images(x))))
    rows = []
    for k in detail_scales(ctx.pipe.num_scales):
        def make(k=k):
            out = []
            for bi, start in enumerate(range(0, ctx.n, ctx.batch_size)):
                sl = slice(start, start + ctx.batch_size)
                g = torch.Generator(device=ctx.pipe.device).manual_seed(ctx.seed * 100_003 + bi)
                res = ctx.pipe.reroll(ctx.pipe.encode(x[sl]), k, class_labels=[int(c) for c in cls[sl]],
                                      guidance_scale=ctx.guidance, generator=g, output_type="pt")
                out.append(res.images.float() * 2 - 1)
            return torch.cat(out)

        imgs = dom.tensor_to_images(ctx.cached(f"re-rolled from scale {k}", make))
        pn = ctx.pipe.patch_nums[k]
        rows.append(Row(f"high-frequency energy, scales < {k} kept, {pn}x{pn} on sampled / renders",
                        float(np.mean(metrics.high_frequency_energy(imgs))) / max(ref, 1e-9), "{:.3f}",
                        f"n={ctx.n}, guidance {ctx.guidance:g}; renders' own tokens below scale {k}"))
    return rows


@register_section("class", help="class recogniser accuracy on generated images and on renders",
                  needs=("class", "world"))
def class_section(ctx: EvalContext) -> List[Row]:
    net = ctx.nets["class"]
    gen = ctx.generated()
    acc_gen = metrics.accuracy(dom.classify(net, gen["images"]), gen["class_ids"])
    A = ctx.renders("A")
    acc_ren = metrics.accuracy(dom.classify(net, dom.images_to_tensor(A["images"])), A["class_ids"])
    acc_rec = metrics.accuracy(dom.classify(net, ctx.reconstructions()), A["class_ids"])
    n = ctx.n
    ci = lambda p: "95%% CI [%.3f, %.3f]" % metrics.confidence_interval(p, n)  # noqa: E731
    return [Row(f"class acc, generated (guidance {ctx.guidance:g})", acc_gen, "{:.3f}", f"n={n}, {ci(acc_gen)}"),
            Row("class acc, renders (reference)", acc_ren, "{:.3f}", f"n={n}, {ci(acc_ren)}"),
            Row("class acc, VQVAE reconstructions", acc_rec, "{:.3f}", f"n={n}")]


@register_section("frechet", help="domain Frechet distance of generated images to renders", needs=("class", "world"))
def frechet_section(ctx: EvalContext) -> List[Row]:
    A = metrics.feature_stats(ctx.features("renders A"))

    def fd(which, stats=A):
        return metrics.frechet_distance(stats_a=metrics.feature_stats(ctx.features(which)), stats_b=stats)

    B = metrics.feature_stats(ctx.features("renders B"))
    D = ctx.nets["class"].cfg.feature_dim
    small = f"; n={ctx.n} < D={D}: biased upward, compare only with the floor" if ctx.n < D else ""
    return [Row(f"domain FD generated vs renders (guidance {ctx.guidance:g})", fd("generated"), "{:.3f}",
                FD_NOTE + small),
            Row("domain FD renders vs renders (floor)", metrics.frechet_distance(stats_a=B, stats_b=A), "{:.3f}",
                f"two disjoint held-out sets of {ctx.n}"),
            Row("domain FD VQVAE recon vs renders", fd("reconstructions", B), "{:.3f}",
                "reconstructions of set A vs set B")]


@register_section("editing", help="in-/out-painting of held-out renders: domain FD and seam error",
                  needs=("class", "world"))
def editing_section(ctx: EvalContext) -> List[Row]:
    """In-paint a central box (half the side) and out-paint the right half of each held-out render.

    Seam error: mean |difference| (RGB in [0, 1]) between the pixel pairs that straddle the edit
    border, beside the same pairs in the untouched renders (the natural gradient there)."""
    R = ctx.resolution
    imgs = ctx.renders("A")["images"]  # (n, R, R, 3) uint8
    a, b = R // 4, R - R // 4
    mask = np.zeros((R, R), np.float32)
    mask[a:b, a:b] = 1.0
    half = R // 2

    def run():
        inp, outp = [], []
        for i, im in enumerate(imgs):
            g = torch.Generator(device=ctx.pipe.device).manual_seed(ctx.seed * 7919 + i)
            inp.append(ctx.pipe.inpaint(Image.fromarray(im), mask, mask_blur=4, inpaint_area="whole", generator=g,
                                        output_type="np").images[0])
            g = torch.Generator(device=ctx.pipe.device).manual_seed(ctx.seed * 7919 + i)
            outp.append(ctx.pipe.outpaint(Image.fromarray(im[:, :half]), right=R - half, window=R, generator=g,
                                          output_type="np").images[0])
        return np.stack(inp), np.stack(outp)

    inp, outp = ctx.cached("editing (in-/out-painting)", run)
    src = imgs.astype(np.float32) / 255.0

    def box_seam(x):  # pairs across the four edges of the box
        d = [np.abs(x[:, a:b, a - 1] - x[:, a:b, a]), np.abs(x[:, a:b, b - 1] - x[:, a:b, b]),
             np.abs(x[:, a - 1, a:b] - x[:, a, a:b]), np.abs(x[:, b - 1, a:b] - x[:, b, a:b])]
        return float(np.mean([v.mean() for v in d]))

    def col_seam(x):
        return float(np.abs(x[:, :, half - 1] - x[:, :, half]).mean())

    band = dom_feather_band(mask, 4)
    kept_err = float(np.abs(inp - src)[:, ~band].max()) if (~band).any() else 0.0
    B = metrics.feature_stats(ctx.features("renders B"))

    def fd(x01):
        feats = dom.class_features(ctx.nets["class"], torch.from_numpy(x01).permute(0, 3, 1, 2).float() * 2 - 1)
        return metrics.frechet_distance(stats_a=metrics.feature_stats(feats), stats_b=B)

    return [Row("in-painting: domain FD vs renders", fd(inp), "{:.3f}", FD_NOTE + "; central box, half the side"),
            Row("in-painting: seam error", box_seam(inp), "{:.4f}",
                f"untouched renders at the same border: {box_seam(src):.4f}"),
            Row("in-painting: max change outside mask + feather band", kept_err, "{:.5f}", "at most 1/255 = 0.00392"),
            Row("out-painting: domain FD vs renders", fd(outp), "{:.3f}", FD_NOTE + "; right half from the left half"),
            Row("out-painting: seam error", col_seam(outp), "{:.4f}",
                f"untouched renders at the same column: {col_seam(src):.4f}")]


def dom_feather_band(mask: np.ndarray, pixels: int) -> np.ndarray:
    from studio.images import feather

    return feather(mask, pixels) > 0


@register_section("preprocessors", help="depth / segmentation nets' error on held-out renders")
def preprocessors_section(ctx: EvalContext) -> List[Row]:
    rows = []
    same_res = {k: n.cfg.resolution == ctx.resolution for k, n in ctx.nets.items()}
    if "depth" in ctx.nets:
        net = ctx.nets["depth"]
        R = net.cfg.resolution
        A = ctx.renders("A", R)
        gt = dom.normalise_depth(A["depth"], net.cfg.near, net.cfg.far)
        pred = dom.estimate_depth(net, dom.images_to_tensor(A["images"]), units="normalised")
        rows.append(Row("depth rel-RMSE (renders)", metrics.depth_rel_rmse(pred, gt), "{:.4f}",
                        f"normalised log-depth, no alignment; n={ctx.n}, {R} px"))
        if same_res["depth"]:
            pred_r = dom.estimate_depth(net, ctx.reconstructions(), units="normalised")
            rows.append(Row("depth rel-RMSE (VQVAE recon)", metrics.depth_rel_rmse(pred_r, gt), "{:.4f}",
                            "estimate on reconstructions vs render ground truth"))
    if "seg" in ctx.nets:
        net = ctx.nets["seg"]
        R = net.cfg.resolution
        A = ctx.renders("A", R)
        pred = dom.segment(net, dom.images_to_tensor(A["images"]))
        C = net.cfg.num_classes
        rows.append(Row("seg mIoU (renders)", metrics.miou(pred, A["labels"], C), "{:.4f}",
                        f"classes present in gt or pred; pixel acc {metrics.pixel_accuracy(pred, A['labels']):.3f}"))
        if same_res["seg"]:
            pred_r = dom.segment(net, ctx.reconstructions())
            rows.append(Row("seg mIoU (VQVAE recon)", metrics.miou(pred_r, A["labels"], C), "{:.4f}",
                            "estimate on reconstructions vs render ground truth"))
    if not rows:
        rows.append(Row("preprocessors", None, note="skipped: no depth or seg net"))
    return rows


CONTROL_JUDGES = {"canny": "canny F1 vs the control edges (higher is better)",
                  "depth": "depth rel-RMSE vs the control depth (lower is better)",
                  "segmentation": "seg mIoU vs the control layout (higher is better)"}
CONTROL_METRICS = {"canny": "canny F1", "depth": "depth rel-RMSE", "segmentation": "seg mIoU"}


def control_score(control_type: str, images: torch.Tensor, maps: torch.Tensor, nets: Dict[str, torch.nn.Module]) -> float:
    """How well images (N,3,R,R) in [-1, 1] follow their ground-truth maps (preprocess.ground_truth_maps):
    canny F1 (1 px), rel-RMSE of the depth net's estimate, mIoU of the seg net's labels."""
    if control_type == "canny":
        edges = np.stack([metrics.canny(im) for im in dom.tensor_to_images(images)])
        return metrics.edge_f1(edges, maps[:, 0].numpy() > 0.5)
    if control_type == "depth":
        return metrics.depth_rel_rmse(dom.estimate_depth(nets["depth"], images, units="normalised"), maps[:, 0].numpy())
    return metrics.miou(dom.segment(nets["seg"], images), maps.numpy(), nets["seg"].cfg.num_classes)


@register_section("control", help="adherence to canny / depth / segmentation maps, with each adapter and without",
                  needs=("world",))
def control_section(ctx: EvalContext) -> List[Row]:
    """Maps from held-out renders (canny edges of the render, its exact depth, its labels); images
    generated for the render's class at the default settings (guidance, strength 1) with the
    adapter, and the same seeds without it (the unconditioned baseline). Judges: canny of the
    generated image (F1, 1 px tolerance), the world's depth net (rel-RMSE of normalised
    log-depth), the world's seg net (mIoU). Two reference rows bound what any adapter can reach: the
    judge on the VQVAE reconstructions of the renders (the tokenizer's ceiling: generated images pass
    through the same decoder) and, for the nets, on the renders themselves (the judge's own error).
    Grids (render, map, with, without) go to --out."""
    from studio import preprocess as pp

    types = [t for t in CONTROL_JUDGES if t in ctx.pipe.controls]
    if not types:
        return [Row("control", None, note="skipped: the model has no control adapters")]
    A = ctx.renders("A")
    labels = A["class_ids"].tolist()

    def generate(control_type=None, maps=None):
        imgs = []
        for bi, start in enumerate(range(0, ctx.n, ctx.batch_size)):
            sl = slice(start, start + ctx.batch_size)
            g = torch.Generator(device=ctx.pipe.device).manual_seed(ctx.seed * 100_003 + 17 + bi)
            kw = {} if control_type is None else dict(control_image=maps[sl], control_type=control_type)
            out = ctx.pipe(class_labels=labels[sl], guidance_scale=ctx.guidance, generator=g, output_type="pt", **kw)
            imgs.append(out.images.float() * 2 - 1)
        return torch.cat(imgs)

    base = ctx.cached("control baseline (no adapter)", generate)
    dnet, snet = ctx.nets.get("depth"), ctx.nets.get("seg")
    near, far = (dnet.cfg.near, dnet.cfg.far) if dnet is not None else (1.0, None)
    rows: List[Row] = []
    for t in types:
        maps = pp.ground_truth_maps(t, images=A["images"], depth_m=A["depth"], labels=A["labels"], near=near, far=far)
        if (t == "depth" and dnet is None) or (t == "segmentation" and snet is None):
            rows.append(Row(f"{t}: adherence", None, note=f"skipped: no {'depth' if t == 'depth' else 'seg'} net"))
            continue
        gen = ctx.cached(f"control {t}", lambda: generate(t, maps))

        def score(x):
            return control_score(t, x, maps, ctx.nets)

        with_a, without, ceiling = score(gen), score(base), score(ctx.reconstructions())
        name = CONTROL_METRICS[t]
        rows += [Row(f"{name}, with the {t} adapter", with_a, "{:.4f}", f"n={ctx.n}; {CONTROL_JUDGES[t]}"),
                 Row(f"{name}, without (baseline)", without, "{:.4f}", "same classes and seeds, no control"),
                 Row(f"{name}, VQVAE reconstructions (ceiling)", ceiling, "{:.4f}",
                     "the renders' own tokens decoded: what an adapter that recovered them exactly would score")]
        if t != "canny":  # canny maps are the renders' own edges, so the renders score 1 by definition
            rows.append(Row(f"{name}, renders (judge's own error)", score(ctx.render_tensor("A")), "{:.4f}",
                            "the judge on the renders the maps came from"))
        if ctx.out is not None:
            k = min(8, ctx.n)
            n_ids = snet.cfg.num_classes if snet is not None else None
            shown = np.stack([np.asarray(pp.map_preview(t, m, n_ids)) for m in maps[:k]])
            folder = ctx.out / "control"
            folder.mkdir(parents=True, exist_ok=True)
            grid([A["images"][:k], shown, dom.tensor_to_images(gen[:k]),
                  dom.tensor_to_images(base[:k])]).save(folder / f"control_{t}.png")
    return rows


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def grid(rows: Sequence[np.ndarray], pad: int = 2) -> Image.Image:
    """Rows of uint8 (k,H,W,3) images -> one PIL grid (rows may have fewer images than the widest)."""
    rows = [r for r in rows if len(r)]
    H, W = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y:y + H, x:x + W] = im
    return Image.fromarray(canvas)


@register_section("samples", help="a PNG grid per class in --out (renders, then generated)")
def samples_section(ctx: EvalContext) -> List[Row]:
    if ctx.out is None:
        return [Row("sample grids", None, note="skipped: no --out")]
    folder = ctx.out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    gen = ctx.generated()
    gen_imgs = dom.tensor_to_images(gen["images"])
    A = ctx.renders("A") if ctx.is_world_model else None
    per_row = 8
    written = 0
    for c, name in enumerate(ctx.pipe.class_names):
        g = gen_imgs[gen["class_ids"] == c]
        if not len(g):
            continue
        rows = [] if A is None else [A["images"][A["class_ids"] == c][:per_row]]
        rows += [g[i:i + per_row] for i in range(0, len(g), per_row)]
        grid(rows).save(folder / f"class_{c:03d}_{_slug(name)}.png")
        written += 1
    note = f"{folder}: first row renders, then generated (guidance {ctx.guidance:g})"
    return [Row("sample grids written", written, "{:d}", note)]


# ---------------------------------------------------------------------------------------------
# running


def run_eval(pipe, nets: Dict[str, torch.nn.Module], n: int = 100, out: Optional[Path] = None,
             sections: Optional[Sequence[str]] = None, seed: int = 0, guidance: Optional[float] = None,
             batch_size: int = 25, log=print) -> List[Row]:
    """Run the named sections (all registered ones by default) and return their rows."""
    names = list(SECTIONS) if not sections else list(sections)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    if n < 2:
        raise ValueError("n must be at least 2")
    ctx = EvalContext(pipe, nets, n, out, seed, guidance, batch_size, log)
    rows: List[Row] = []
    for name in names:
        sec = SECTIONS[name]
        missing = [k for k in sec.needs if k != "world" and k not in nets]
        if "world" in sec.needs and not ctx.is_world_model:
            rows.append(Row(name, None, note="skipped: the model's classes are not the world's", section=name))
            continue
        if missing:
            rows.append(Row(name, None, note=f"skipped: no {'/'.join(missing)} net", section=name))
            continue
        for r in sec.fn(ctx):
            r.section = r.section or name
            rows.append(r)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "eval.json").write_text(json.dumps(
            {"n": n, "seed": seed, "guidance": ctx.guidance, "resolution": pipe.resolution, "note": FD_NOTE,
             "rows": [{"section": r.section, "metric": r.metric, "value": r.value, "note": r.note} for r in rows]},
            indent=2))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = ("section", "metric", "value", "note")
    body = [(r.section, r.metric, r.value_str(), r.note) for r in rows]
    w = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(3)]
    line = lambda c: f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]:>{w[2]}}  {c[3]}".rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * k for k in w) + ("-" * 4,))] + [line(b) for b in body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="sections:\n" + "\n".join(f"  {s.name:15s} {s.help}" for s in SECTIONS.values()))
    p.add_argument("--model", default="default", help="a bundle / official folder, a hub id, or 'default'")
    p.add_argument("--domain", default=None, help="folder of domain nets (default: the model's bundle folder)")
    p.add_argument("--n", type=int, default=100, help="images per set (renders A, renders B, generated)")
    p.add_argument("--out", default=None, help="folder for eval.json and sample grids")
    p.add_argument("--sections", default=None, help="comma-separated, from: " + ", ".join(SECTIONS))
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's default guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from studio import checkpoints
    from studio.pipeline import VARPipeline

    src = None if args.model == "default" else args.model
    try:
        pipe = VARPipeline.from_pretrained(src, device=args.device)
    except checkpoints.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = Path(args.domain) if args.domain else (checkpoints.default_bundle_path() if src is None else Path(src))
    nets = dom.load_domain_nets(folder, device=args.device) if folder.is_dir() else {}
    print(f"[eval] model {pipe.source}; domain nets from {folder}: {sorted(nets) or 'none'}", file=sys.stderr)
    sections = [s.strip() for s in args.sections.split(",")] if args.sections else None
    rows = run_eval(pipe, nets, args.n, Path(args.out) if args.out else None, sections, args.seed, args.guidance,
                    args.batch_size, log=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    print(f"\nNote: {FD_NOTE}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
