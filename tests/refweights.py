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
