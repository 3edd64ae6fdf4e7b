"""Deterministic random weights for official-format state dicts.

Both the fixture generator (which runs the published reference implementation) and our tests
call `fill_reference_weights` on a state dict with the official key names and shapes; because the
recipe only depends on (sorted key, shape), both sides get bit-identical tensors without shipping
megabytes of weights in the repository.
"""
import math

import torch

# persistent buffers that the model computes itself; they keep the model's own values
_COMPUTED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")


def _std_for(name: str, shape) -> tuple:
    """(mean, std) of the normal draw for one tensor."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "scale_mul_1H11":
        return math.log(4.0), 0.1
    if name.endswith("embedding.weight"):  # the VQ codebook
        return 0.0, 1.0
    if any(s in name for s in ("class_emb", "lvl_embed", "pos_start", "pos_1LC", "ada_gss")):
        return 0.0, 0.3
    if len(shape) >= 2:  # linear / conv weights: fan-in scaling keeps activations sane
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return 0.0, 1.0 / math.sqrt(fan_in)
    if leaf == "weight":  # norm affine weights
        return 1.0, 0.1
    return 0.0, 0.05  # biases, q_bias, v_bias


def fill_reference_weights(state_dict: dict, seed: int = 0) -> dict:
    """Return a new state dict with the same keys, shapes and dtypes, deterministic random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state_dict):
        t = state_dict[name]
        if any(b in name for b in _COMPUTED_BUFFERS) or not t.is_floating_point():
            out[name] = t.clone()
            continue
        mean, std = _std_for(name, tuple(t.shape))
        out[name] = (torch.randn(tuple(t.shape), generator=g, dtype=torch.float32) * std + mean).to(t.dtype)
    return out


def make_reference_images():
    """(2, 3, 256, 256) float32 test images in [-1, 1]: smooth colour fields plus sharp rectangles."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 3, 8, 8, generator=g)
    x = torch.tanh(F.interpolate(x, size=(256, 256), mode="bicubic", align_corners=False))
    x[0, :, 40:104, 60:200] = torch.tensor([0.9, -0.7, 0.2]).view(3, 1, 1)
    x[0, :, 150:230, 20:90] = torch.tensor([-0.95, 0.8, 0.5]).view(3, 1, 1)
    x[1, :, 100:180, 120:250] = torch.tensor([0.1, 0.95, -0.9]).view(3, 1, 1)
    x[1, :, 10:50, 10:50] = -1.0
    return x.clamp(-1, 1).contiguous()


def make_control_pictures(n: int = 3, size: int = 256, seed: int = 7):
    """n deterministic RGB condition pictures (PIL, size x size): 0 an edge map (white lines on
    black, like canny), 1 a smooth grey ramp with shapes (like depth), 2 a smooth colour field (like
    normals); further ones repeat the kinds with other draws. numpy only, so both sides agree."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a = np.zeros((size, size), np.uint8)
            for _ in range(8):
                y0, x0 = rng.integers(0, size - 40, 2)
                h, w = rng.integers(20, 120, 2)
                y1, x1 = min(y0 + h, size - 1), min(x0 + w, size - 1)
                a[y0, x0:x1] = a[y1, x0:x1] = 255
                a[y0:y1, x0] = a[y0:y1, x1] = 255
            rgb = np.repeat(a[..., None], 3, axis=2)
        elif kind == 1:
            f = 0.6 * yy + 0.2 * np.sin(6 * xx + rng.uniform(0, 6))
            for _ in range(3):
                cy, cx, r = rng.uniform(0.2, 0.8, 3) * [1, 1, 0.3]
                f = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2, rng.uniform(0.3, 1.0), f)
            g = np.clip(f, 0, 1) * 255
            rgb = np.repeat(g.round().astype(np.uint8)[..., None], 3, axis=2)
        else:
            ph = rng.uniform(0, 6, 3)
            rgb = np.stack([0.5 + 0.5 * np.sin(4 * xx + 3 * yy + p) for p in ph], axis=-1)
            rgb = (rgb * 255).round().astype(np.uint8)
        out.append(Image.fromarray(np.ascontiguousarray(rgb), "RGB"))
    return out


def make_segmentation_picture(size: int = 256, seed: int = 11):
    """A deterministic entity map in ControlVAR's palette (PIL RGB, size x size): black (unlabelled)
    with overlapping rectangles and a disc, each a palette colour (levels 0, 64, 128, 192, 255 per
    channel, black excluded). numpy only, so both sides agree."""
    import numpy as np
    from PIL import Image

    levels = [0, 64, 128, 192, 255]
    palette = [(r, g, b) for r in levels for g in levels for b in levels][1:]
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        y0, x0 = rng.integers(0, size - 60, 2)
        h, w = rng.integers(50, 160, 2)
        a[y0:y0 + h, x0:x0 + w] = palette[int(rng.integers(0, len(palette)))]
    yy, xx = np.mgrid[0:size, 0:size]
    a[(yy - size * 0.6) ** 2 + (xx - size * 0.4) ** 2 < (size * 0.2) ** 2] = palette[int(rng.integers(0, len(palette)))]
    return Image.fromarray(a, "RGB")
