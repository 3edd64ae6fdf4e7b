"""The worker pool on a tiny random model: per-scale events, saved outputs, cancel, crashes, bad input.

`tiny_bundle` here is shared with test_app.py and test_browser.py (import it from this module)."""
import io
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from studio.generate import read_png_parameters
from studio.pngmeta import decode_tokens, encode_png, encode_tokens, read_png_info
from studio.serve.pool import ModelSpec, WorkerError, WorkerPool
from studio.serve.runner import Previewer, jpeg, tile

TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)
TINY_CONTROLS = ("canny", "segmentation")  # the tiny bundle's control adapters (no depth: a model without one)


def make_tiny_bundle(folder):
    """A 64 px, 6-scale random VQVAE + VAR bundle (fast to load and to run), with random canny and
    segmentation control adapters (no depth adapter) and tiny world depth and seg nets."""
    from models.control import ControlAdapter, ControlConfig
    from models.domain import build
    from models.var import VAR, VARConfig
    from models.vqvae import VQVAE, VQVAEConfig
    from studio import domainnets as domain
    from studio.pipeline import VARPipeline
    from studio.world import SEG_PALETTE

    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2, 4), using_sa=False,
                            patch_nums=TINY_PATCH_NUMS))
    var = VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=10, depth=1, embed_dim=64, num_heads=2,
                        patch_nums=TINY_PATCH_NUMS))
    pipe = VARPipeline(vae, var, [f"class {i}" for i in range(10)])
    for ctype in TINY_CONTROLS:
        adapter = ControlAdapter(ControlConfig.for_var(var.cfg, ctype, widths=(4, 8), hidden=16, num_classes=(
            len(SEG_PALETTE) if ctype == "segmentation" else None)))
        with torch.no_grad():  # a trained adapter's injections are not zero: the map changes the image
            for lin in adapter.inject:
                lin.weight.normal_(0, 0.5)
        pipe.add_control(adapter)
    pipe.save_pretrained(folder)
    for kind in ("depth", "seg"):
        domain.save_net(build(kind, domain.default_config(kind, 32, widths=[4, 8, 8])), folder / f"{kind}.safetensors",
                        kind)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="module")
def pool(tiny_bundle, tmp_path_factory):
    p = WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu"], outputs=tmp_path_factory.mktemp("outputs"),
                   scale_delay=0.1, torch_threads=1)
    with p:
        yield p


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_tokens_and_parameters_round_trip_through_png(tmp_path):
    tokens = [np.arange(n * n, dtype=np.int64) % 7 for n in TINY_PATCH_NUMS]
    data = encode_png(Image.new("RGB", (8, 8)), {"seed": 3, "class_name": "x"}, tokens)
    (tmp_path / "a.png").write_bytes(data)
    assert read_png_parameters(tmp_path / "a.png") == {"seed": 3, "class_name": "x"}  # the CLI's reader agrees
    params, back = read_png_info(data)
    assert params["seed"] == 3 and all(np.array_equal(a, b) for a, b in zip(tokens, back))
    big = [np.array([70000, 1])]
    assert np.array_equal(decode_tokens(encode_tokens(big))[0], big[0])


def test_sampling_settings_left_out_are_the_models_published_ones(pool):
    """A Python caller who leaves out guidance_scale, top_k and top_p gets VAR's published settings, top-k
    at most the vocabulary (64 tokens here), as the page and the API give them; the PNG says so."""
    from studio.params import GenerateParams

    assert pool.models["tiny"].defaults == {"guidance_scale": 4.0, "top_k": 64, "top_p": 0.95}
    job = pool.submit("generate", GenerateParams(class_name="class 1", seed=2, preview="none"))
    assert job.wait(60) and job.status == "done", job.error
    params = read_png_info(job.result.images[0])[0]
    assert (params["guidance_scale"], params["top_k"], params["top_p"]) == (4.0, 64, 0.95)


def test_generation_streams_every_scale_and_saves_before_the_result(pool):
    job = pool.submit("generate", {"class_name": "class 3", "seed": 7, "num_images": 2})
    assert job.wait(60), job
    assert job.status == "done", job.error
    assert [u.scale_index for u in job.scales] == list(range(len(TINY_PATCH_NUMS)))
    assert [u.patch_num for u in job.scales] == list(TINY_PATCH_NUMS)
    preview = Image.open(io.BytesIO(job.scales[-1].preview))
    assert preview.format == "JPEG" and preview.width > 64  # two images tiled
    res = job.result
    final = tile([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in res.images])
    assert np.array_equal(np.asarray(preview), np.asarray(Image.open(io.BytesIO(jpeg(final)))))  # not decoded twice
    assert len(res.paths) == 2 and all(os.path.exists(p) for p in res.paths)
    for i, path in enumerate(res.paths):
        assert open(path, "rb").read() == res.images[i]
        params = read_png_parameters(path)
        assert params["seed"] == 7 + i and params["batch_seed"] == 7 and params["class_id"] == 3  # image i: seed + i
        assert params["index_in_batch"] == i and params["num_images"] == 2
    assert [t.size for t in res.tokens[0]] == [n * n for n in TINY_PATCH_NUMS]

    # re-roll keeping every scale gives the same token pyramid back; keeping fewer changes the fine ones
    same = pool.submit("reroll", {"source_png": res.images[0], "keep_scales": len(TINY_PATCH_NUMS), "seed": 1})
    fresh = pool.submit("reroll", {"source_png": res.images[0], "keep_scales": 2, "seed": 1})
    assert same.wait(60) and fresh.wait(60) and same.status == fresh.status == "done", (same.error, fresh.error)
    assert all(np.array_equal(a, b) for a, b in zip(same.result.tokens[0], res.tokens[0]))
    assert all(np.array_equal(a, b) for a, b in zip(fresh.result.tokens[0][:2], res.tokens[0][:2]))
    assert fresh.result.params[0]["class_id"] == 3 and fresh.result.params[0]["keep_scales"] == 2


def test_a_slow_consumer_gets_the_latest_preview_not_a_backlog(pool):
    job = pool.submit("generate", {"seed": 1})
    job.wait(60)
    views = list(job.updates())  # a consumer that looks only after the end
    assert len(views) == 1 and views[0].status == "done"
    assert views[0].latest.scale_index == len(TINY_PATCH_NUMS) - 1
    assert len(views[0].scales) == len(TINY_PATCH_NUMS)  # the filmstrip still has every scale


def test_cancel_stops_at_a_scale_boundary_and_removes_queued_jobs(pool):
    running = pool.submit("generate", {"seed": 2})
    while running.status == "queued":
        time.sleep(0.01)
    queued = pool.submit("generate", {"seed": 3})
    assert queued.position == 1 and running.position == 0
    queued.cancel()
    assert queued.status == "cancelled"
    for view in running.updates():
        if view.latest is not None:
            running.cancel()
            break
    assert running.wait(30)
    assert running.status == "cancelled" and "stopped at scale" in running.error
    assert len(running.scales) < len(TINY_PATCH_NUMS)
    after = pool.submit("generate", {"seed": 4})
    assert after.wait(60) and after.status == "done"


def test_bad_input_fails_the_job_and_keeps_the_worker(pool):
    pid = pool.worker_pids()[0]
    image = png(Image.new("RGB", (64, 48), "green"))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:30] = 255
    cases = {
        "unknown class name": ("generate", {"class_name": "zebra"}),
        "could not be read": ("inpaint", {"image": b"\x89PNG garbage", "mask": png(Image.fromarray(mask))}),
        "same size": ("inpaint", {"image": image, "mask": png(Image.new("L", (10, 10), 255))}),
        "mask is empty": ("inpaint", {"image": image, "mask": png(Image.new("L", (64, 48), 0))}),
        "keep_scales": ("guide", {"image": image, "keep_scales": 99}),
        "top_p": ("generate", {"top_p": 3.0}),
        "no token pyramid": ("reroll", {"source_png": image, "keep_scales": 2}),
        "at least one side": ("outpaint", {"image": image}),
    }
    jobs = {k: pool.submit(kind, params) for k, (kind, params) in cases.items()}
    for expected, job in jobs.items():
        assert job.wait(60) and job.status == "failed", (expected, job.status)
        assert expected in job.error, (expected, job.error)
    ok = pool.submit("inpaint", {"image": image, "mask": png(Image.fromarray(mask)), "seed": 0})
    assert ok.wait(60) and ok.status == "done", ok.error
    assert Image.open(io.BytesIO(ok.result.images[0])).size == (64, 48)
    assert pool.worker_pids()[0] == pid


def test_a_killed_worker_fails_its_job_restarts_and_runs_the_queue(pool):
    victim = pool.submit("generate", {"seed": 5})
    for view in victim.updates():
        if view.latest is not None:
            break
    waiting = pool.submit("generate", {"seed": 6})  # after the victim started: not in its batch
    old = pool.worker_pids()[0]
    os.kill(old, signal.SIGKILL)
    assert victim.wait(30) and victim.status == "failed"
    assert "stopped unexpectedly" in victim.error and "SIGKILL" in victim.error
    assert waiting.wait(90) and waiting.status == "done", waiting.error
    assert pool.worker_pids()[0] not in (None, old)


def test_one_worker_per_device_and_a_clear_error_for_a_bad_model(tiny_bundle, tmp_path):
    with WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu", "cpu"], outputs=tmp_path,
                    scale_delay=0.2, torch_threads=1) as two:
        a, b = two.submit("generate", {"seed": 1}), two.submit("generate", {"seed": 2})
        assert a.wait(60) and b.wait(60) and a.status == b.status == "done"
        assert {a.worker, b.worker} == {0, 1} and len(set(two.worker_pids())) == 2
    with pytest.raises(WorkerError, match="could not load model 'nope'.*no such folder"):
        WorkerPool([ModelSpec("nope", str(tmp_path / "missing"))], devices=["cpu"], outputs=tmp_path).start()


def test_fast_preview_map_recovers_a_linear_decoder(tiny_bundle):
    """Least squares between f_hat and the decoded image: with a decoder that is exactly a linear map of
    the code channels (then upsampled), the fitted map is that map, and fast previews equal full ones."""
    import torch.nn.functional as F

    from studio.pipeline import VARPipeline

    pipe = VARPipeline.from_pretrained(tiny_bundle)
    C, R = pipe.vae.cfg.z_channels, pipe.resolution
    true = torch.randn(C + 1, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    pipe.vae.fhat_to_img = lambda f: F.interpolate(torch.einsum("bchw,cd->bdhw", f.float(), true[:-1])
                                                   + true[-1].view(1, 3, 1, 1), size=(R, R), mode="nearest")
    prev = Previewer(pipe, R)
    assert torch.allclose(prev.fit_linear_on_patches().weight, true, atol=2e-3)
    f_hat = pipe.vae.quantize.tokens_to_fhat(pipe.encode(Image.new("RGB", (R, R), "teal")))
    fast = np.asarray(prev(f_hat.repeat(2, 1, 1, 1), "fast"), dtype=np.float32)
    full = np.asarray(prev(f_hat.repeat(2, 1, 1, 1), "full"), dtype=np.float32)
    assert fast.shape == full.shape == (R, 2 * R + 2, 3)  # two images, tiled
    assert np.abs(fast - full).mean() < 3.0  # 8-bit levels: only the bilinear upsampling differs


def test_fast_preview_uses_the_map_the_bundle_ships(tiny_bundle):
    """A bundle's fitted colour map (studio.preview) is what the fast preview draws with."""
    from studio import preview
    from studio.pipeline import VARPipeline

    pipe = VARPipeline.from_pretrained(tiny_bundle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.fast_preview = preview.FastMap(pipe.vae.cfg.z_channels)
    prev = Previewer(pipe, pipe.resolution)
    f_hat = pipe.vae.quantize.tokens_to_fhat(pipe.encode(Image.new("RGB", (pipe.resolution,) * 2, "teal")))
    want = pipe.fast_preview(f_hat, pipe.resolution).add(1).mul(127.5).round().clamp(0, 255)[0].permute(1, 2, 0)
    assert prev.prepare() is pipe.fast_preview
    assert np.array_equal(np.asarray(prev(f_hat, "fast")), want.to(torch.uint8).numpy())


def layout_png(size=64) -> bytes:
    """A segmentation layout painted with the world's palette: sky above, grass below."""
    from studio.world import SEG_PALETTE

    a = np.empty((size, size, 3), np.uint8)
    a[: size // 2], a[size // 2:] = SEG_PALETTE[0], SEG_PALETTE[4]
    return png(Image.fromarray(a))


def test_control_streams_every_scale_and_stores_its_parameters(pool):
    layout = layout_png()
    job = pool.submit("control", {"image": layout, "control_type": "segmentation", "preprocessor": "none",
                                  "class_name": "class 2", "seed": 3, "control_strength": 1.5,
                                  "control_guidance_end": 0.5})
    plain = pool.submit("generate", {"class_name": "class 2", "seed": 3})
    edges = pool.submit("control", {"image": png(Image.new("RGB", (80, 60), "white")), "control_type": "canny",
                                    "canny_low": 50, "canny_high": 150, "seed": 3, "num_images": 2})
    for j in (job, plain, edges):
        assert j.wait(60) and j.status == "done", j.error
    assert [u.scale_index for u in job.scales] == list(range(len(TINY_PATCH_NUMS)))
    params = job.result.params[0]
    assert params["task"] == "control" and params["control_type"] == "segmentation"
    assert params["preprocessor"] == "none" and params["control_strength"] == 1.5
    assert params["control_guidance_start"] == 0.0 and params["control_guidance_end"] == 0.5
    assert read_png_parameters(job.result.paths[0]) == params and job.result.tokens is not None
    assert not all(np.array_equal(a, b) for a, b in zip(job.result.tokens[0], plain.result.tokens[0]))
    p = edges.result.params[1]
    assert len(edges.result.paths) == 2 and p["canny_low"] == 50 and p["canny_high"] == 150
    assert p["control_image_size"] == [80, 60]


def test_preprocess_returns_the_map_at_the_model_resolution_and_saves_nothing(pool):
    photo = png(Image.new("RGB", (90, 70), "seagreen"))
    cases = [("canny", "canny", photo), ("canny", "none", photo), ("depth", "world", photo),
             ("segmentation", "world", photo), ("segmentation", "none", layout_png(40))]
    jobs = [pool.submit("preprocess", {"image": im, "control_type": t, "preprocessor": pre}) for t, pre, im in cases]
    for (ctype, pre, _), job in zip(cases, jobs):
        assert job.wait(60) and job.status == "done", (ctype, pre, job.error)
        assert job.result.paths == [] and job.result.params[0]["preprocessor"] == pre
        assert Image.open(io.BytesIO(job.result.images[0])).size == (64, 64)
    seg = np.asarray(Image.open(io.BytesIO(jobs[-1].result.images[0])).convert("RGB"))
    from studio.world import SEG_PALETTE

    assert (seg[0, 0] == SEG_PALETTE[0]).all() and (seg[-1, 0] == SEG_PALETTE[4]).all()  # the layout's classes


def test_bad_control_requests_fail_the_job_and_keep_the_worker(pool):
    pid = pool.worker_pids()[0]
    photo = png(Image.new("RGB", (64, 64), "gray"))
    cases = {
        "unknown control type 'bogus'": ("control", {"image": photo, "control_type": "bogus"}),
        "has no hed control (it has: canny, segmentation)": ("control", {"image": photo, "control_type": "hed"}),
        "has no depth control adapter (it has: canny, segmentation)": ("control", {"image": photo,
                                                                                   "control_type": "depth"}),
        "segmentation image could not be read": ("control", {"image": b"\x89PNG garbage",
                                                             "control_type": "segmentation"}),
        "has preprocessors canny, none, not 'world'": ("preprocess", {"image": photo, "control_type": "canny",
                                                                      "preprocessor": "world"}),
        "Canny thresholds need 0 ≤ low ≤ high (canny_low, canny_high)": ("preprocess", {
            "image": photo, "control_type": "canny", "canny_low": 200, "canny_high": 100}),
        "control_guidance_start < control_guidance_end": ("control", {
            "image": photo, "control_type": "canny", "control_guidance_start": 0.8, "control_guidance_end": 0.2}),
    }
    jobs = {k: pool.submit(kind, params) for k, (kind, params) in cases.items()}
    for expected, job in jobs.items():
        assert job.wait(60) and job.status == "failed", (expected, job.status)
        assert expected in job.error, (expected, job.error)
    assert pool.worker_pids()[0] == pid


def test_a_model_without_world_nets_says_which_net_is_missing(tiny_bundle, tmp_path):
    import shutil

    from studio.params import ControlMapParams
    from studio.pipeline import VARPipeline
    from studio.serve.runner import Runner

    folder = tmp_path / "no_nets"
    shutil.copytree(tiny_bundle, folder, ignore=shutil.ignore_patterns("depth.*", "seg.*"))
    pipe = VARPipeline.from_pretrained(folder)
    runner = Runner({"outputs": str(tmp_path), "preview": "fast"}, None, None, {"m": pipe}, {"m": None}, "cpu")
    photo = png(Image.new("RGB", (64, 64), "gray"))
    with pytest.raises(ValueError, match=r"no world depth net \(depth.safetensors in its bundle\)"):
        runner.control_map("m", pipe, ControlMapParams(image=photo, control_type="depth", preprocessor="world"))
    cmap, record = runner.control_map("m", pipe, ControlMapParams(image=photo, control_type="canny"))
    assert cmap.map.shape == (1, 64, 64) and record == {"control_type": "canny", "preprocessor": "canny",
                                                        "control_image_size": [64, 64], "canny_low": 100.0,
                                                        "canny_high": 200.0}


def test_a_value_over_its_bound_fails_the_job_naming_the_parameter_and_the_bound(pool):
    job = pool.submit("generate", {"num_images": 9, "seed": 1})
    assert job.wait(60) and job.status == "failed"
    assert "Number of images (num_images) must be a whole number between 1 and 8, got 9" in job.error


def test_a_bug_in_a_job_is_an_internal_error_with_the_traceback_in_the_log(tiny_bundle, tmp_path, caplog,
                                                                             monkeypatch):
    """Bad input (UserError) reaches the user as it is; any other exception is a bug: the user sees
    'internal error' and a reference, never the exception's text (a KeyError was shown as a bare key
    name before); the log has the traceback; the runner serves the next job."""
    import types

    from studio.pipeline import VARPipeline
    from studio.serve import runner as runner_module

    def broken(job, p):
        return {}["class_name"]  # a programming error

    pipe = VARPipeline.from_pretrained(tiny_bundle)
    sent = []
    conn, cancel_cell = types.SimpleNamespace(send=sent.append), [0] * 4  # the cancel array: no job stopped
    runner = runner_module.Runner({"outputs": str(tmp_path), "preview": "fast"}, conn, cancel_cell, {"m": pipe},
                                  {"m": Previewer(pipe, 64)}, "cpu")
    with monkeypatch.context() as m:
        m.setitem(runner_module.HANDLERS, "generate", runner_module.Handler(broken))
        kind, job_id, message = runner.answer(1, "job1", "generate", "m", {"seed": 1})
    assert (kind, job_id) == ("error", "job1") and message.startswith("internal error (ref ")
    assert "class_name" not in message and "KeyError" not in message
    ref = message.split("ref ")[1][:8]
    assert any(ref in r.getMessage() and r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
    assert runner.answer(2, "job2", "generate", "m", {"class_name": "zebra"})[:2] == ("error", "job2")
    assert "unknown class name 'zebra'" in runner.answer(3, "job3", "generate", "m", {"class_name": "zebra"})[2]
    done = runner.answer(4, "job4", "generate", "m", {"class_name": "class 1", "seed": 2})
    assert done[0] == "done" and done[1].params[0]["class_id"] == 1
    assert [m[0] for m in sent] == ["scale"] * len(TINY_PATCH_NUMS)



def test_inpainting_under_our_adapters_control(pool, tiny_bundle):
    """control_inpaint with the bundle's own adapters: a segmentation layout (its palette, preprocessor none)
    steers the masked part: its tokens are the pipeline's own inpaint under that map, not the plain in-paint's;
    outside the mask the picture stays, pixel for pixel; the PNG keeps the control, and a re-roll keeps the
    outside too."""
    from studio import preprocess as pp
    from studio.pipeline import VARPipeline
    from studio.world import SEG_PALETTE

    picture = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    mask = np.zeros((80, 80), bool)
    mask[8:72, 8:72] = True
    layout = np.empty((80, 80, 3), np.uint8)
    layout[:40], layout[40:] = SEG_PALETTE[0], SEG_PALETTE[4]
    edit = {"image": png(Image.fromarray(picture)), "mask": png(Image.fromarray((mask * 255).astype(np.uint8))),
            "mask_blur": 0, "inpaint_area": "whole", "seed": 4}
    job = pool.submit("control_inpaint", dict(edit, control_type="segmentation", preprocessor="none",
                                              control_strength=1.5, control_image=png(Image.fromarray(layout))))
    plain = pool.submit("inpaint", edit)
    for j in (job, plain):
        assert j.wait(120) and j.status == "done", j.error
    out = np.asarray(Image.open(job.result.paths[0]).convert("RGB"))
    assert np.array_equal(out[~mask], picture[~mask]) and not np.array_equal(out[mask], picture[mask])
    assert not all(np.array_equal(a, b) for a, b in zip(job.result.tokens[0], plain.result.tokens[0]))

    pipe = VARPipeline.from_pretrained(tiny_bundle)
    m = pp.preprocess("segmentation", Image.fromarray(layout), "none", size=pipe.resolution,
                      num_classes=pipe.controls["segmentation"].cfg.in_channels).map
    api = pipe.inpaint(Image.fromarray(picture), Image.fromarray((mask * 255).astype(np.uint8)), mask_blur=0,
                       inpaint_area="whole", control_image=m, control_type="segmentation", control_strength=1.5,
                       generator=[torch.Generator().manual_seed(4)])
    assert all(np.array_equal(a[0].numpy(), b) for a, b in zip(api.tokens, job.result.tokens[0]))
    params = read_png_parameters(job.result.paths[0])
    assert (params["task"], params["control_type"], params["control_strength"]) == ("control_inpaint",
                                                                                   "segmentation", 1.5)
    reroll = pool.submit("reroll", {"source_png": open(job.result.paths[0], "rb").read(), "keep_scales": 3})
    assert reroll.wait(120) and reroll.status == "done", reroll.error
    out = np.asarray(Image.open(reroll.result.paths[0]).convert("RGB"))
    assert np.array_equal(out[~mask], picture[~mask])
    assert read_png_parameters(reroll.result.paths[0])["control_type"] == "segmentation"
