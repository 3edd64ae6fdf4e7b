"""Pure quality metrics: numbers from arrays, no models, no files.

Every function takes numpy arrays or torch tensors (converted to float64 numpy / torch on the CPU)
and returns a Python float (or a small array where it says so).

    psnr(a, b, data_range)            reconstruction quality, dB
    depth_rel_rmse(pred, gt, align)   RMSE / (gt.max() - gt.min()), per image, then averaged
    miou(pred, gt, num_classes)       mean IoU over the classes present in gt or pred
    canny(image, low, high)           binary edge map (OpenCV's Canny, the product's detector)
    high_frequency_energy(images)     variance of the Laplacian of the grey image, per image
    edge_density(images, low, high)   share of canny edge pixels, per image
    chroma_anomaly(images)            largest |CrCb - 9x9 median| of an image: saturated blobs, fringes
    edge_f1(pred, gt, tolerance)      F1 of two edge maps, a match within `tolerance` pixels
    frechet_distance(f1, f2)          Frechet distance of two feature sets (Gaussian fit)
    accuracy(logits_or_pred, target)  fraction of correct class predictions
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def _np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


# ---------------------------------------------------------------------------------------------
# reconstruction


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), per image, then averaged.

    a, b: one image (H,W) or (H,W,C) or (C,H,W), or a batch (N,C,H,W) / (N,H,W,C) (4 axes). Identical
    images give +inf. data_range is the span of the values: 1 for [0,1], 2 for [-1,1], 255 for uint8."""
    a, b = _np(a), _np(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    if a.ndim != 4:
        a, b = a[None], b[None]
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)
    with np.errstate(divide="ignore"):
        vals = 10.0 * np.log10(data_range**2 / mse)
    return float(vals.mean())


# ---------------------------------------------------------------------------------------------
# depth


def align_scale_shift(pred, gt, mask=None) -> np.ndarray:
    """The least-squares s*pred + b that best fits gt (over `mask`), for relative-depth predictors."""
    p, g = _np(pred), _np(gt)
    m = np.ones(p.shape, bool) if mask is None else _np(mask, bool)
    A = np.stack([p[m], np.ones(int(m.sum()))], 1)
    if len(A) < 2:
        return p
    (s, b), *_ = np.linalg.lstsq(A, g[m], rcond=None)
    return s * p + b


def depth_rel_rmse(pred, gt, align: bool = False, per_image: bool = False):
    """RMSE(pred, gt) / (gt.max() - gt.min()), per image, averaged over the batch.

    pred, gt: (H,W) or (N,H,W) (a singleton channel axis is dropped), in the same units: the studio
    compares normalised log-depth maps (models/domain.py), the representation the depth control
    uses, so errors in the near foreground and on far mountains both count. align=True first fits
    pred to gt with a per-image least-squares scale and shift, for predictors of relative depth
    (ours predict absolute log-depth and are scored with align=False). A flat gt (zero range) scores
    RMSE / 1. per_image=True returns the (N,) array instead of the mean."""
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"depth_rel_rmse: shapes differ {p.shape} vs {g.shape}")
    if p.ndim == 4 and p.shape[1] == 1:
        p, g = p[:, 0], g[:, 0]
    if p.ndim == 2:
        p, g = p[None], g[None]
    out = []
    for pi, gi in zip(p, g):
        if align:
            pi = align_scale_shift(pi, gi)
        rng = float(gi.max() - gi.min())
        out.append(float(np.sqrt(((pi - gi) ** 2).mean())) / (rng if rng > 0 else 1.0))
    out = np.asarray(out)
    return out if per_image else float(out.mean())


# ---------------------------------------------------------------------------------------------
# segmentation


def confusion_matrix(pred, gt, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = gt, columns = pred."""
    p, g = _np(pred, np.int64).ravel(), _np(gt, np.int64).ravel()
    if p.shape != g.shape:
        raise ValueError("confusion_matrix: pred and gt differ in size")
    if len(p) and (min(p.min(), g.min()) < 0 or max(p.max(), g.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(pred, gt, num_classes: int) -> np.ndarray:
    """(num_classes,) IoU; NaN for classes in neither map."""
    cm = confusion_matrix(pred, gt, num_classes).astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def miou(pred, gt, num_classes: int) -> float:
    """Mean IoU over the classes present in gt or pred (union > 0), pooled over all pixels given
    (pass a batch to get the dataset-level mIoU). 1.0 for identical maps."""
    iou = iou_per_class(pred, gt, num_classes)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(pred, gt) -> float:
    return float((_np(pred, np.int64) == _np(gt, np.int64)).mean())


# ---------------------------------------------------------------------------------------------
# edges

from studio import images  # noqa: E402
from studio.preprocess import canny_edges as canny  # noqa: E402,F401  (the product's detector is the judge's)


def edge_f1(pred, gt, tolerance: int = 1) -> float:
    """F1 of edge map `pred` against `gt` (both (H,W) bool, or (N,H,W) for a mean over images).

    A predicted edge pixel counts as correct when a gt edge lies within `tolerance` pixels
    (Chebyshev distance), and a gt edge pixel as found when a predicted edge lies as near.
    Both maps empty: 1.0; one of them empty: 0.0."""
    p, g = _np(pred, bool), _np(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"edge_f1: shapes differ {p.shape} vs {g.shape}")
    if p.ndim == 3:
        return float(np.mean([edge_f1(a, b, tolerance) for a, b in zip(p, g)]))
    n_p, n_g = int(p.sum()), int(g.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    precision = (p & images.dilate(g, tolerance)).sum() / n_p
    recall = (g & images.dilate(p, tolerance)).sum() / n_g
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


# ---------------------------------------------------------------------------------------------
# sharpness and artifacts (OpenCV; images (N,H,W,3) uint8 RGB)


def _u8_batch(images) -> np.ndarray:
    a = _np(images, None)
    if a.ndim == 3:
        a = a[None]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (N,H,W,3) uint8 RGB images, got {a.dtype} {a.shape}")
    return a


def high_frequency_energy(images) -> np.ndarray:
    """(N,) variance of the Laplacian of each grey image (0..255 scale): high for sharp detail."""
    import cv2

    return np.array([cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
                     for im in _u8_batch(images)])


def edge_density(images, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """(N,) share of pixels on a canny edge."""
    return np.array([canny(im, low, high).mean() for im in _u8_batch(images)])


def chroma_anomaly(images, window: int = 9) -> np.ndarray:
    """(N,) the largest distance of a pixel's chroma (Cr, Cb) from the median of its window x window
    neighbourhood: a saturated blob or a colour fringe stands out from its surroundings."""
    import cv2

    out = []
    for im in _u8_batch(images):
        ycc = cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2YCrCb)
        dev = [np.abs(ycc[..., c].astype(np.int16) - cv2.medianBlur(np.ascontiguousarray(ycc[..., c]), window))
               for c in (1, 2)]
        out.append(float(np.hypot(dev[0], dev[1]).max()))
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# distributions and classes


def feature_stats(features) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), float64."""
    f = torch.as_tensor(_np(features))
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(features_a=None, features_b=None, stats_a=None, stats_b=None) -> float:
    """Frechet distance between Gaussians fitted to two feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).

    Give (N, D) features, or precomputed (mu, cov) pairs from feature_stats. Matrix square roots
    come from torch.linalg.eigh in float64 (no scipy). With the world's ClassNet features this is a
    *domain* Frechet distance: its scale is not comparable to published (Inception) FID."""
    mu_a, s_a = stats_a if stats_a is not None else feature_stats(features_a)
    mu_b, s_b = stats_b if stats_b is not None else feature_stats(features_b)
    mu_a, s_a, mu_b, s_b = (torch.as_tensor(_np(t)) for t in (mu_a, s_a, mu_b, s_b))
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    ra = _sqrtm_psd(s_a)
    cross = torch.linalg.eigvalsh((ra @ s_b @ ra + (ra @ s_b @ ra).T) / 2).clamp(min=0).sqrt().sum()
    d = ((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross
    return float(d.clamp(min=0))


def accuracy(pred_or_logits, target) -> float:
    """Fraction of correct predictions: pred (N,) class ids, or logits (N, C) (argmax taken)."""
    p = _np(pred_or_logits, None)
    if p.ndim == 2:
        p = p.argmax(1)
    t = _np(target, np.int64)
    if p.shape != t.shape:
        raise ValueError(f"accuracy: {p.shape} predictions for {t.shape} targets")
    return float((p.astype(np.int64) == t).mean()) if t.size else float("nan")


def confidence_interval(p: float, n: int, z: float = 1.96) -> Optional[Tuple[float, float]]:
    """Wilson score interval (lo, hi) of a proportion p measured on n samples (95% for z=1.96);
    unlike the normal approximation it stays honest at p = 0 or 1."""
    if n <= 0:
        return None
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * np.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
