"""lab/train/: few-step runs of each trainer on tiny models and tiny data.

The data come from a stand-in world defined here (same API as `studio.world`: render_batch,
CLASS_NAMES, SEG_CLASSES; and as `lab.worlddata.WorldShards`), so these tests do not depend on the
real renderer's speed or looks; two tests also run the real renderer and the real shards.
"""
import json
import signal
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import train

TINY_VAE = {"vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
            "using_sa": False, "using_mid_sa": False, "patch_nums": [1, 2, 4, 8]}  # 32 px, L = 85
TINY_VAR = ["--depth", "2", "--embed-dim", "64", "--num-heads", "2"]
COMMON = ["--num-workers", "0", "--quiet", "--eval-size", "4", "--num-samples", "2", "--threads", "1"]


# ---------------------------------------------------------------------------------------------
# the stand-in world


CLASS_NAMES = ["red dawn", "green hills", "blue sea", "grey rock"]


def standin_render_batch(seeds, size=128):
    """Sky gradient over a sine-wave ridge; colours by class (seed % 4), shape by seed."""
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    depth = np.empty((n, size, size), np.float32)
    cls = np.array([s % len(CLASS_NAMES) for s in seeds], np.int64)
    for i, s in enumerate(seeds):
        r = np.random.default_rng(s)
        sky = np.array([[220, 120, 90], [140, 190, 240], [90, 150, 230], [170, 170, 180]][cls[i]], np.float32)
        ground = np.array([[120, 60, 40], [60, 150, 60], [20, 70, 140], [90, 90, 95]][cls[i]], np.float32)
        ridge = 0.5 + 0.15 * np.sin(2 * np.pi * (xx * r.uniform(1, 3) + r.uniform()))
        below = yy > ridge
        img = np.where(below[..., None], ground * (0.6 + 0.4 * yy[..., None]), sky * (1 - 0.3 * yy[..., None]))
        images[i] = img.clip(0, 255).astype(np.uint8)
        labels[i] = below
        depth[i] = np.where(below, 1.0 / (yy + 0.1), 100.0)
    return images, depth, labels, cls


class StandinShards(torch.utils.data.Dataset):
    """WorldShards over `shard_*.npz` files (images uint8 (N,H,W,3), class_ids (N,))."""

    def __init__(self, folder):
        files = sorted(Path(folder).glob("shard_*.npz"))
        data = [np.load(f) for f in files]
        self.images = np.concatenate([d["images"] for d in data])
        self.class_ids = np.concatenate([d["class_ids"] for d in data])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 127.5 - 1
        return {"image": x, "depth": torch.zeros(x.shape[1:]), "labels": torch.zeros(x.shape[1:], dtype=torch.long),
                "class_id": int(self.class_ids[i])}


def write_standin_shards(folder: Path, seeds, size: int):
    folder.mkdir(parents=True, exist_ok=True)
    images, _, _, cls = standin_render_batch(seeds, size)
    np.savez(folder / "shard_00000.npz", images=images, class_ids=cls)
    return folder


STANDIN = types.SimpleNamespace(__name__="standin_world", render_batch=standin_render_batch,
                                CLASS_NAMES=CLASS_NAMES, SEG_CLASSES=["sky", "ground"])


def use_world(mp, world=STANDIN, shards=StandinShards):
    """Train on `world` (the renderer) and read shard folders with `shards` (a WorldShards)."""
    mp.setattr(train.data, "load_world", lambda: world)
    mp.setattr(train.data, "open_shards", shards)


@pytest.fixture(autouse=True)
def standin_world(monkeypatch):
    use_world(monkeypatch)
    return STANDIN


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 fixed images: with --batch-size 8 and --no-hflip every batch is the same 8 images."""
    return write_standin_shards(tmp_path_factory.mktemp("shards"), range(8), 32)


def rows(out: Path, kind="train"):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def vqvae_args(out, data, steps, *extra):
    return ["vqvae", "--out", str(out), "--data", str(data), "--steps", str(steps), "--batch-size", "8",
            "--config", json.dumps(TINY_VAE), "--lr", "2e-3", "--warmup-steps", "3", "--metrics-every", "5",
            "--log-every", "1000", "--no-hflip", *COMMON, *extra]


def var_args(out, data, vae, steps, *extra):
    return ["var", "--out", str(out), "--data", str(data), "--vae", str(vae), "--steps", str(steps),
            "--batch-size", "8", *TINY_VAR, "--lr", "3e-3", "--warmup-steps", "3", "--metrics-every", "5",
            "--log-every", "1000", "--no-hflip", *COMMON, *extra]


@pytest.fixture(scope="module")
def trained_vqvae(tmp_path_factory, shards):
    """A tiny VQVAE overfit on the 8 fixed images (shared by the var tests)."""
    mp = pytest.MonkeyPatch()
    use_world(mp)
    out = tmp_path_factory.mktemp("vqvae")
    summary = train.main(vqvae_args(out, shards, 40, "--restart-after", "10", "--restart-every", "10"))
    mp.undo()
    return out, summary


# ---------------------------------------------------------------------------------------------
# vqvae


def test_vqvae_overfits_and_writes_its_files(trained_vqvae):
    out, summary = trained_vqvae
    r = rows(out)
    assert r[-1]["step"] == 40 and summary["step"] == 40
    assert r[-1]["loss"] < 0.6 * r[0]["loss"], (r[0]["loss"], r[-1]["loss"])
    assert r[-1]["psnr_train"] > r[0]["psnr_train"] + 3
    assert 0 < r[-1]["codes_used_pct"] <= 100 and r[-1]["perplexity"] >= 1
    ev = rows(out, "eval")
    assert ev and np.isfinite(ev[-1]["psnr"])  # held-out batch: stand-in renders of seeds >= 10M
    for name in ("checkpoint.pt", "samples.png", "metrics.jsonl", "vae.safetensors", "vae_config.json"):
        assert (out / name).exists(), name
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").exists()


def test_vqvae_export_reloads(trained_vqvae, tmp_path):
    out, _ = trained_vqvae
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["task"] == "vqvae" and ck["step"] == 40
    vae = train.load_vqvae(str(out))
    for k, v in ck["model"].items():
        assert torch.equal(vae.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert [t.shape[1] for t in vae.eval().img_to_tokens(x)] == [1, 4, 16, 64]


# ---------------------------------------------------------------------------------------------
# var


@pytest.fixture(scope="module")
def trained_var(tmp_path_factory, trained_vqvae, shards):
    """A tiny VAR on the tiny VQVAE, exported as a bundle (shared by the control tests)."""
    mp = pytest.MonkeyPatch()
    use_world(mp)
    root = tmp_path_factory.mktemp("var")
    out, bundle = root / "run", root / "bundle"
    train.main(var_args(out, shards, trained_vqvae[0], 30, "--cond-drop-rate", "0.0", "--export", str(bundle)))
    mp.undo()
    return out, bundle


def test_var_overfits_and_exports_a_loadable_bundle(trained_var):
    from studio.pipeline import VARPipeline

    out, bundle = trained_var
    r = rows(out)
    assert r[-1]["step"] == 30
    assert r[-1]["loss"] < 0.7 * r[0]["loss"], (r[0]["loss"], r[-1]["loss"])
    assert r[-1]["acc"] > r[0]["acc"]
    assert {"ce_coarse", "ce_mid", "ce_fine", "ce_per_scale"} <= set(r[-1])
    assert (out / "samples.png").exists()
    pipe = VARPipeline.from_pretrained(bundle)
    assert pipe.class_names == CLASS_NAMES and pipe.patch_nums == (1, 2, 4, 8)
    res = pipe(class_labels=["blue sea", 0], guidance_scale=2.0, top_k=0, top_p=0.0,
               generator=torch.Generator().manual_seed(0))
    assert [im.size for im in res.images] == [(32, 32), (32, 32)]
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["training"]["step"] == 30 and cfg["dtype"] == "float16"


def test_token_cache_holds_each_image_and_its_mirror_and_trains_the_transformer(trained_vqvae, shards, tmp_path):
    """`--token-cache`: the shards encoded once (as they are and mirrored), exactly the tokens the
    trainer would have encoded per batch; training on it lowers the loss like training on images."""
    from lab.train import tokencache

    cache, out = tmp_path / "tokens", tmp_path / "run"
    train.main(var_args(out, shards, trained_vqvae[0], 30, "--token-cache", str(cache), "--cond-drop-rate", "0.0"))
    vae = train.load_vqvae(str(trained_vqvae[0])).eval()
    src = tokencache.TokenSource(cache)
    assert len(src) == 16 and src.meta["count"] == 8
    x = train.make_source(str(shards), 32, ("image", "class_id")).get(range(8))
    with torch.no_grad():
        plain = torch.cat(vae.img_to_tokens(x["image"]), 1)
        mirrored = torch.cat(vae.img_to_tokens(x["image"].flip(-1)), 1)
    got = src.get(range(16))
    assert torch.equal(got["tokens"][0::2], plain) and torch.equal(got["tokens"][1::2], mirrored)
    assert torch.equal(got["class_id"][0::2], x["class_id"]) and torch.equal(got["class_id"][1::2], x["class_id"])
    r = rows(out)  # 16 items (8 images and their mirrors) in shuffled batches of 8: slower than 8 fixed images
    assert r[-1]["step"] == 30 and r[-1]["loss"] < 0.8 * r[0]["loss"], (r[0]["loss"], r[-1]["loss"])
    assert rows(out, "eval")  # the held-out batch is still images of seeds >= 10M, encoded once


def test_token_cache_build_resumes_and_refuses_another_tokenizer(trained_vqvae, shards, tmp_path, monkeypatch):
    from lab.train import tokencache

    monkeypatch.setattr(tokencache, "CHUNK", 3)  # 8 images: chunks of 3, 3 and 2
    vae = train.load_vqvae(str(trained_vqvae[0])).eval()
    source = train.make_source(str(shards), 32, ("image", "class_id"))
    folder = tmp_path / "tokens"
    first = tokencache.build(folder, vae, source, 8, "shards", 32, log=lambda m: None)
    chunk1 = folder / "chunk_00001.safetensors"
    mtime0 = (folder / "chunk_00000.safetensors").stat().st_mtime_ns
    chunk1.unlink()  # an interrupted build
    with pytest.raises(train.TrainError, match="1 chunk\\(s\\) missing"):
        tokencache.TokenSource(folder)
    said = []
    again = tokencache.build(folder, vae, source, 8, "shards", 32, log=said.append)
    assert "1 of 3 chunks to go" in said[0]
    assert (folder / "chunk_00000.safetensors").stat().st_mtime_ns == mtime0  # not re-encoded
    assert torch.equal(again.tokens, first.tokens)
    with torch.no_grad():  # another tokenizer (a changed codebook) gives other tokens: refused by name
        vae.quantize.embedding.weight.mul_(-1)
    with pytest.raises(train.TrainError, match="made for other fingerprint"):
        tokencache.build(folder, vae, source, 8, "shards", 32, log=lambda m: None)
    with torch.no_grad():  # the decoder does not decide tokens: a decoder fine-tune keeps the cache
        vae.quantize.embedding.weight.mul_(-1)
        vae.decoder.conv_in.weight.add_(1.0)
    tokencache.build(folder, vae, source, 8, "shards", 32, log=lambda m: None)
    # nor does its layout: the shipped bundle's decoder converted to fixed norms reads the same cache
    from lab.train.decoder import calibration_images, with_fixed_norms
    fixed = with_fixed_norms(vae, 2, calibration_images(vae, 2))
    assert fixed.cfg.decoder_fixed_norm == 2
    assert torch.equal(tokencache.build(folder, fixed, source, 8, "shards", 32, log=lambda m: None).tokens,
                       first.tokens)


def test_token_cache_flag_errors(trained_vqvae, shards, tmp_path):
    base = var_args(tmp_path / "run", "render:32", trained_vqvae[0], 1)
    with pytest.raises(SystemExit, match="--token-cache with --data render needs --cache-images N"):
        train.main(base + ["--token-cache", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="--cache-images needs --token-cache"):
        train.main(base + ["--cache-images", "4"])
    with pytest.raises(SystemExit, match="--cache-images 99: the data has only 8 images"):
        train.main(var_args(tmp_path / "run", shards, trained_vqvae[0], 1, "--token-cache", str(tmp_path / "t"),
                            "--cache-images", "99"))


def test_init_trains_an_exported_transformer_further(trained_var, shards, tmp_path):
    """`--init BUNDLE`: the run starts from the bundle's transformer and tokenizer (its first loss is the
    trained one, far below a fresh start's), and the architecture flags give way to the bundle's."""
    out_run, bundle = trained_var
    out = tmp_path / "more"
    train.main(["var", "--out", str(out), "--data", str(shards), "--init", str(bundle), "--steps", "5",
                "--batch-size", "8", "--lr", "1e-4", "--warmup-steps", "1", "--metrics-every", "5", "--log-every",
                "1000", "--no-hflip", "--cond-drop-rate", "0.0", *COMMON])
    fresh_first, trained_last = rows(out_run)[0]["loss"], rows(out_run)[-1]["loss"]
    first = rows(out)[0]["loss"]
    assert first < 0.5 * (fresh_first + trained_last), (fresh_first, trained_last, first)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["depth"] == 2 and ck["config"]["embed_dim"] == 64


# ---------------------------------------------------------------------------------------------
# control adapters


def control_args(out, data, base, control_type, steps, *extra):
    return ["control", "--out", str(out), "--data", str(data), "--base", str(base), "--control-type", control_type,
            "--steps", str(steps), "--batch-size", "8", "--widths", "8,16,32", "--hidden", "32", "--lr", "3e-3",
            "--warmup-steps", "3", "--metrics-every", "5", "--log-every", "1000", *COMMON, *extra]


def test_control_adapter_learns_the_map_and_joins_the_bundle(trained_var, tmp_path):
    """Canny maps of stand-in renders (the ridge line): the adapter lowers the held-out cross-entropy
    below the frozen base's, and the export is the base bundle plus the adapter."""
    from studio.pipeline import VARPipeline

    _, base = trained_var
    out, bundle = tmp_path / "ctl", tmp_path / "bundle"
    train.main(control_args(out, "render:32", base, "canny", 40, "--export", str(bundle)))
    r, ev = rows(out), rows(out, "eval")
    assert r[-1]["loss"] < r[0]["loss"], (r[0]["loss"], r[-1]["loss"])
    assert ev[-1]["ce"] < ev[-1]["ce_base"], ev[-1]  # the map tells the model something
    assert ev[-1]["wce"] < ev[-1]["wce_base"], ev[-1]  # also with every scale weighing the same (the loss)
    for name in ("samples.png", "control_canny.safetensors", "control_canny.json", "checkpoint.pt"):
        assert (out / name).exists(), name
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    base_var = VARPipeline.from_pretrained(base).var.state_dict()
    for k, v in ck["var"].items():  # the base stayed frozen
        assert torch.equal(v.half(), base_var[k].half()), k
    pipe = VARPipeline.from_pretrained(bundle)
    assert sorted(pipe.controls) == ["canny"]
    edges = torch.zeros(1, 32, 32)
    edges[:, 16, :] = 1.0
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe(class_labels=[1], generator=g(), control_image=edges, control_type="canny", output_type="np").images
    b = pipe(class_labels=[1], generator=g(), output_type="np").images
    assert a.shape == (1, 32, 32, 3) and not np.array_equal(a, b)  # the trained adapter changes the image
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["control"]["canny"]["control_type"] == "canny" and cfg["training"]["step"] == 30


def test_segmentation_adapter_reads_the_world_labels(trained_var, tmp_path):
    from studio.pipeline import VARPipeline

    _, base = trained_var
    out = tmp_path / "seg"
    train.main(control_args(out, "render:32", base, "segmentation", 6, "--export", str(out / "bundle")))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["in_channels"] == len(STANDIN.SEG_CLASSES) and ck["config"]["label_map"]
    assert np.isfinite(rows(out)[-1]["loss"])
    pipe = VARPipeline.from_pretrained(out / "bundle")
    with pytest.raises(ValueError, match="ids"):
        pipe(class_labels=[0], control_image=torch.full((1, 32, 32), 5), control_type="segmentation")

    # --init: a new run starts from the exported adapter (its weights, its architecture), not from zero
    again = tmp_path / "seg_again"
    train.main(control_args(again, "render:32", base, "segmentation", 1, "--lr", "0", "--widths", "4,4",
                            "--init", str(out / "bundle")))
    ck2 = torch.load(again / "checkpoint.pt", weights_only=True)
    assert ck2["config"] == ck["config"]  # the flags' other widths were ignored
    for k, v in pipe.controls["segmentation"].state_dict().items():
        assert torch.equal(ck2["model"][k].half(), v.half()), k
    with pytest.raises(SystemExit, match="no canny adapter"):
        train.main(control_args(tmp_path / "c", "render:32", base, "canny", 1, "--init", str(out / "bundle")))


def test_control_needs_a_base(tmp_path, shards):
    with pytest.raises(SystemExit, match="--base"):
        train.main(["control", "--out", str(tmp_path), "--data", str(shards), "--steps", "1", *COMMON])


def test_var_needs_a_vae(tmp_path, shards):
    with pytest.raises(SystemExit, match="--vae"):
        train.main(["var", "--out", str(tmp_path), "--data", str(shards), "--steps", "1", *COMMON])


# ---------------------------------------------------------------------------------------------
# resume: an interrupted run continued = the uninterrupted run, bit for bit


def _assert_same_checkpoint(a: dict, b: dict):
    assert a["step"] == b["step"] and a["images_seen"] == b["images_seen"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("task", ["vqvae", "var"])
def test_resume_continues_with_identical_state(task, tmp_path, trained_vqvae, monkeypatch):
    data = write_standin_shards(tmp_path / "data", range(20), 32)  # 20 images: batches differ per step

    def args(out, steps):
        if task == "vqvae":
            return vqvae_args(out, data, steps, "--hflip", "--restart-after", "2", "--restart-every", "2")
        return var_args(out, data, trained_vqvae[0], steps, "--hflip", "--drop-path-rate", "0.1")

    full, part = tmp_path / "full", tmp_path / "part"
    train.main(args(full, 6))

    cls = train.TASKS[task]
    original = cls.after_step

    def ctrl_c_at_step_3(self, step):
        original(self, step)
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 3

    monkeypatch.setattr(cls, "after_step", ctrl_c_at_step_3)
    assert train.main(args(part, 6))["interrupted"]
    monkeypatch.setattr(cls, "after_step", original)
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 3
    summary = train.main(args(part, 6))  # the same command again resumes
    assert summary["step"] == 6 and not summary["interrupted"]
    _assert_same_checkpoint(torch.load(full / "checkpoint.pt", weights_only=True),
                            torch.load(part / "checkpoint.pt", weights_only=True))
    assert [r["step"] for r in rows(full)] == [5, 6]
    assert [r["step"] for r in rows(part)] == [3, 5, 6]  # step 3: the line written when interrupted
    assert train.main(args(part, 2) + ["--fresh"])["step"] == 2  # --fresh starts over


# ---------------------------------------------------------------------------------------------
# data, precision, CLI


def test_batch_stream_is_a_function_of_seed_and_step():
    src = train.RenderSource(16)
    one = train.BatchStream(src, 4, seed=1)
    again = train.BatchStream(src, 4, seed=1, start_batch=2)
    assert one.indices(2) == again.indices(2) and one.indices(2) != one.indices(3)
    assert all(0 <= i < train.TRAIN_SEED_LIMIT for i in one.indices(5))
    loader = torch.utils.data.DataLoader(train.BatchStream(src, 4, seed=1), batch_size=None, num_workers=2)
    it = iter(loader)
    got = [next(it)["image"] for _ in range(3)]
    for k in range(3):
        assert torch.equal(got[k], one.batch(k)["image"])
    # a small source is walked epoch by epoch: every item once per epoch
    small = train.BatchStream(list(range(8)), 4, seed=0)  # indices() only needs len(source)
    assert sorted(small.indices(0) + small.indices(1)) == list(range(8))
    with pytest.raises(ValueError):
        train.RenderSource(16, pool=10, offset=train.TRAIN_SEED_LIMIT - 5)


class _Blocks(list):
    block_offsets = [0, 4, 8, 12]  # three shards of four


def test_sharded_sources_are_read_one_shard_at_a_time():
    stream = train.BatchStream(_Blocks(range(12)), 4, seed=3)
    batches = [stream.indices(k) for k in range(3)]
    assert sorted(sum(batches, [])) == list(range(12))  # an epoch visits every item once
    assert all(len({i // 4 for i in b}) == 1 for b in batches)  # each batch comes from one shard
    assert [stream.indices(k) for k in range(3, 6)] != batches  # a new order next epoch


def test_render_data_with_a_worker_and_bf16(tmp_path):
    out = tmp_path / "r"
    s = train.main(vqvae_args(out, "render:32", 2, "--precision", "bf16", "--num-workers", "1", "--eval-size", "2"))
    assert s["step"] == 2 and s["precision"] == "bf16"
    assert np.isfinite(rows(out)[-1]["loss"])


def test_real_world_renderer(tmp_path, monkeypatch):
    """The real `studio.world.render_batch` feeds the trainer."""
    import studio.world as world
    from lab.worlddata import WorldShards

    use_world(monkeypatch, world, WorldShards)
    s = train.main(vqvae_args(tmp_path / "w", "render:32", 2, "--eval-size", "2"))
    assert s["step"] == 2


def test_real_world_shards(tmp_path, monkeypatch):
    """Shards written by the real dataset writer (`lab.worlddata`) feed the trainer."""
    import studio.world as world
    from lab.worlddata import WorldShards, write_dataset

    use_world(monkeypatch, world, WorldShards)
    write_dataset(tmp_path / "shards", count=8, size=32, shard_size=4)
    src = train.ShardSource(str(tmp_path / "shards"))
    assert len(src) == 8 and list(src.block_offsets) == [0, 4, 8]
    s = train.main(vqvae_args(tmp_path / "w", tmp_path / "shards", 2, "--eval-data", str(tmp_path / "shards")))
    assert s["step"] == 2


def test_cli_help_and_config_errors(capsys, tmp_path):
    for task in train.TASKS:
        with pytest.raises(SystemExit) as e:
            train.build_parser().parse_args([task, "--help"])
        assert e.value.code == 0
    assert "--minutes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown VQVAEConfig fields"):
        train.main(["vqvae", "--out", str(tmp_path), "--steps", "1", "--config", '{"chanels": 3}', *COMMON])


def test_every_trainer_is_registered_and_listed():
    assert list(train.TASKS) == ["vqvae", "var", "control", "decoder"]
    assert "{vqvae,var,control,decoder}" in train.build_parser().format_help()


def _bad_inputs(tmp_path):
    """(flags, what the message says) of runs that cannot start."""
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    return [
        (["vqvae", "--data", str(tmp_path / "nowhere")], r"--data \S*nowhere: not a folder of shards, nor render"),
        (["vqvae", "--data", "render:big"], r"--data render:big: the size of render:SIZE must be a whole number"),
        (["vqvae", "--data", str(empty)], r"--data \S*empty: \S*meta.json not found: not a world shard folder"),
        (["vqvae", "--config", "{chanels: 3"], r"--config: neither a file nor valid JSON"),
        (["vqvae", "--config", "[1, 2]"], r"--config: expected a JSON object of VQVAEConfig fields"),
        (["var", "--vae", str(tmp_path / "nowhere")], r"--vae \S*nowhere: expected a bundle folder, a vqvae export"),
        (["var", "--vae", str(text)], r"--vae \S*notes.txt: not a torch checkpoint"),
        (["vqvae", "--resume", str(tmp_path / "nowhere")], r"--resume \S*nowhere: no checkpoint there"),
    ]


def test_bad_flags_data_and_checkpoints_raise_a_value_error_from_the_library(tmp_path, monkeypatch):
    from lab.worlddata import WorldShards

    use_world(monkeypatch, STANDIN, WorldShards)
    for flags, message in _bad_inputs(tmp_path):
        args = train.build_parser().parse_args(flags + ["--out", str(tmp_path / "run"), "--steps", "1", *COMMON])
        args.argv = flags
        with pytest.raises(ValueError, match=message) as e:
            train.run(args)
        assert isinstance(e.value, train.TrainError), flags
    with pytest.raises(ValueError, match="expected a bundle folder"):
        train.load_vqvae(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a folder of shards"):
        train.make_source(str(tmp_path / "nowhere"), 32, ("image", "class_id"))


def test_bad_flags_data_and_checkpoints_end_the_command_with_one_clear_line(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from lab.worlddata import WorldShards

    use_world(monkeypatch, STANDIN, WorldShards)
    for flags, message in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit, match=r"^\[train\] error: " + message):
            train.main(flags + ["--out", str(tmp_path / "run"), "--steps", "1", *COMMON])
    # the command itself: status 1, the message as its last line, no traceback
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "lab.train", "var", "--vae", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "cli"), "--steps", "1", "--cpu", "--quiet"], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"[train] error: --vae {tmp_path / 'nowhere'}: expected")
