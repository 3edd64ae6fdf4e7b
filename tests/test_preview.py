"""The fast live preview's colour map (studio/preview.py): fitted on the model's own samples at every
scale, closer to the decode than an unfitted map, shipped in a bundle and read back unchanged."""
import pytest
import torch

from models.var import VAR, VARConfig
from models.vqvae import VQVAE, VQVAEConfig
from studio import checkpoints, preview
from studio.pipeline import VARPipeline


@pytest.fixture(scope="module")
def small_pipe():
    """A 32 px random model (the official-shaped tiny fixture decodes at 256 px: too slow here)."""
    torch.manual_seed(0)
    pn = (1, 2, 4, 8)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                            using_sa=False, using_mid_sa=False, patch_nums=pn))
    var = VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=4, depth=2, embed_dim=64, num_heads=2, patch_nums=pn))
    return VARPipeline(vae, var, ["a", "b", "c", "d"])


def test_fit_brings_the_preview_close_to_the_decode():
    """On the embedded default: fitted on 2 samples, judged on 2 others, every scale."""
    pipe = VARPipeline.from_pretrained()
    f_hats = preview.sample_prefixes(pipe, num_images=2, seed=3)
    assert len(f_hats) == pipe.num_scales and f_hats[0].shape[0] == 2  # every scale, every image
    fitted = preview.fit_fast_map(pipe, num_images=2, seed=0, steps=300)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        untrained = preview.FastMap(f_hats[0].shape[1])
    err_fit = preview.colour_error_per_scale(pipe, fitted, f_hats=f_hats)
    err_raw = preview.colour_error_per_scale(pipe, untrained, f_hats=f_hats)
    assert len(err_fit) == pipe.num_scales
    # 0..255 per channel; the 1x1 scale (one colour per image, two images to fit on) is the loosest
    assert max(err_fit[1:]) < 20 and sum(err_fit) < 0.5 * sum(err_raw), (err_fit, err_raw)
    rgb = fitted(f_hats[-1], size=24)
    assert rgb.shape == (2, 3, 24, 24) and rgb.abs().max() <= 1


def test_a_bundle_ships_the_map_and_reads_it_back(small_pipe, tmp_path):
    fitted = preview.fit_fast_map(small_pipe, num_images=1, seed=0, steps=20)
    cfg, tensors = preview.bundle_parts(fitted, "test")
    checkpoints.save_bundle(tmp_path / "b", small_pipe.vae, small_pipe.var, small_pipe.class_names, torch.float32,
                            cfg, tensors)
    loaded = VARPipeline.from_pretrained(str(tmp_path / "b"))
    f = torch.randn(1, fitted.net[0].in_features, 4, 4)
    assert torch.allclose(loaded.fast_preview(f), fitted(f))
    checkpoints.save_bundle(tmp_path / "none", small_pipe.vae, small_pipe.var, small_pipe.class_names)
    assert VARPipeline.from_pretrained(str(tmp_path / "none")).fast_preview is None
