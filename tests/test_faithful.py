"""Our implementation against the published reference (fixture: tools/make_official_fixture.py).

The fixture holds the reference code's outputs on tiny random weights with the official key names
and shapes; both sides draw the weights from tests/refweights.py, so every check here compares our
numbers with the reference's, not with ourselves."""
import pytest
import torch
from conftest import tiny_models
from refweights import make_reference_images

from studio.pipeline import VARPipeline


def _keys(sd):
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()]


@pytest.mark.parametrize("shared", [False, True])
def test_state_dict_names_shapes_dtypes_match_reference(official, shared):
    vae, var = tiny_models(official, shared)
    assert sorted(_keys(vae.state_dict())) == sorted(tuple(k) for k in official["vae_keys"])
    expect = official["var_shared_keys" if shared else "var_keys"]
    assert sorted(_keys(var.state_dict())) == sorted(tuple(k) for k in expect)


def test_encode_gives_reference_tokens(official, tiny_pipe):
    tokens = tiny_pipe.encode(make_reference_images())
    assert len(tokens) == len(official["encode_tokens"])
    for ours, ref in zip(tokens, official["encode_tokens"]):
        assert ours.dtype == torch.int64 and torch.equal(ours, ref)


def test_decode_gives_reference_image(official, tiny_pipe):
    img = tiny_pipe.decode(official["encode_tokens"])
    assert (img - official["decode_images"]).abs().max().item() < 1e-4


def test_teacher_forcing_input_and_logits_match_reference(official):
    for shared, key in ((False, "forward_logits"), (True, "forward_logits_shared")):
        vae, var = tiny_models(official, shared)
        x = vae.quantize.tokens_to_var_input(official["encode_tokens"])
        assert (x - official["var_input"]).abs().max().item() < 1e-5
        with torch.no_grad():
            logits = var(official["forward_labels"], x)
        assert logits.shape == official[key].shape
        assert (logits - official[key]).abs().max().item() < 1e-4


def _run(pipe, official, run, **extra):
    a = official["sample_args"][run]
    return pipe(class_labels=official["sample_labels"].tolist(), guidance_scale=a["cfg"], top_k=a["top_k"],
                top_p=a["top_p"], more_smooth=a["more_smooth"],
                generator=torch.Generator().manual_seed(a["g_seed"]), **extra)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("run", ["greedy", "seeded", "smooth", "seeded_cfg0"])
def test_sampled_tokens_match_reference_for_the_same_seed(official, shared, run):
    vae, var = tiny_models(official, shared)
    pipe = VARPipeline(vae, var, [str(i) for i in range(10)])
    out = _run(pipe, official, run, output_type="pt")
    ref = official[f"sample_{'shared_' if shared else ''}{run}_tokens"]
    assert len(out.tokens) == len(ref)
    for si, (ours, theirs) in enumerate(zip(out.tokens, ref)):
        assert torch.equal(ours, theirs), f"scale {si} differs"
    if not shared and run == "smooth":  # soft codes: the image is not decode(tokens), compare it too
        rows = official["images_note"] and [0]
        diff = (out.images[rows] - official["sample_smooth_images"]).abs().max().item()
        assert diff < 1e-4


def test_greedy_image_is_the_decoded_reference_tokens(official, tiny_pipe):
    out = _run(tiny_pipe, official, "greedy", output_type="pt")
    ref_img = tiny_pipe.decode(official["sample_greedy_tokens"]).add(1).mul(0.5)
    assert (out.images - ref_img).abs().max().item() < 1e-4
