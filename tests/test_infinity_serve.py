"""Infinity in the studio's serving path: the worker loads an Infinity folder (the family is read from
its files), tells the web process the model kind, streams every scale of a prompt's image, stores the
prompt, its settings and the bit pyramid in the PNG, re-rolls and in-paints with a prompt, and refuses
a class sent to Infinity or a prompt sent to a class-conditional model in words.

`infinity_folder` (shared with test_browser_infinity.py): the tiny random Infinity of test_infinity
(7 scales, 256 px) in the released layout, with a tiny random T5 (tokenizer built offline) inside."""
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from studio import params as P
from studio.params import UserError
from studio.pngmeta import read_png_info
from studio.serve.pool import ModelSpec, WorkerPool
from test_infinity import FIXTURE, _tiny_t5, write_tiny_folder

SQUARE_SCALES = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]  # 1:1 at 0.06M


def make_infinity_folder(folder):
    write_tiny_folder(torch.load(FIXTURE, weights_only=False), folder, "p16")
    _tiny_t5(folder / "flan-t5-tiny")  # a T5 folder inside the weights folder is the model's text encoder
    return folder


@pytest.fixture(scope="session")
def infinity_folder(tmp_path_factory):
    return make_infinity_folder(tmp_path_factory.mktemp("infinity_model"))


@pytest.fixture(scope="module")
def other_t5(tmp_path_factory):
    """Another tiny T5 (other weights) than the one inside the model's folder: the pool's --text-encoder."""
    return _tiny_t5(tmp_path_factory.mktemp("other_t5"), seed=1)


@pytest.fixture(scope="module")
def pool(infinity_folder, other_t5, tmp_path_factory):
    p = WorkerPool([ModelSpec("infinity", str(infinity_folder), text_encoder=str(other_t5))], devices=["cpu"],
                   outputs=tmp_path_factory.mktemp("outputs"), preview="full", torch_threads=1)
    with p:
        yield p


def _done(job):
    for _ in job.updates():
        pass
    view = job.view()
    assert view.status == "done", view.error
    return view


def test_the_worker_reports_a_text_to_image_model(pool):
    info = pool.models["infinity"]
    assert info.family == "infinity" and info.class_names == []
    assert info.resolution == 256 and info.num_scales == 7
    assert "16:9" not in info.aspect_ratios and "2:1" in info.aspect_ratios  # the official table's ratios
    assert info.defaults["guidance_scale"] == 3.0 and info.defaults["tau"] == 0.5


def test_a_prompt_streams_every_scale_and_the_png_holds_it(pool):
    job = pool.submit("generate", {"prompt": "a red fox in the snow", "negative_prompt": "blue sky",
                                   "aspect_ratio": "2:1", "seed": 5, "guidance_scale": 3.0, "top_p": 0.97})
    view = _done(job)
    grids = [u.grid for u in view.scales]
    assert grids == [(1, 1), (2, 2), (2, 4), (3, 6), (5, 10), (8, 16), (11, 22)]  # 2:1 at 0.06M, width last
    assert all(u.preview for u in view.scales)
    assert Image.open(io.BytesIO(view.scales[3].preview)).size == (352 // 2 * 2, 176)  # full size: 352x176
    params, packed = read_png_info(view.result.images[0])
    assert params["prompt"] == "a red fox in the snow" and params["negative_prompt"] == "blue sky"
    assert params["family"] == "infinity" and params["aspect_ratio"] == "2:1"
    assert (params["height"], params["width"], params["seed"], params["tau"]) == (176, 352, 5, 0.5)
    assert Image.open(io.BytesIO(view.result.images[0])).size == (352, 176)
    # the packed pyramid is the pipeline's: the same seed and prompt through InfinityPipeline directly
    from studio.infinity import InfinityPipeline, unpack_bits
    bits = unpack_bits(packed, params["bit_scales"], params["bits_per_position"])
    pipe = InfinityPipeline.from_pretrained(pool.model_specs[0].source, text_encoder=pool.model_specs[0].text_encoder)
    ref = pipe(prompt="a red fox in the snow", negative_prompt="blue sky", aspect_ratio="2:1", guidance_scale=3.0,
               top_p=0.97, top_k=900, generator=torch.Generator().manual_seed(5), output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(bits, ref.tokens))

    # re-roll from scale 3: the stored prompt, the coarse bits kept
    again = _done(pool.submit("reroll", {"source_png": view.result.images[0], "keep_scales": 3, "seed": 9}))
    p2, packed2 = read_png_info(again.result.images[0])
    assert p2["prompt"] == "a red fox in the snow" and p2["keep_scales"] == 3 and p2["rerolled_from_seed"] == 5
    bits2 = unpack_bits(packed2, p2["bit_scales"], p2["bits_per_position"])
    assert all(torch.equal(a, b) for a, b in zip(bits2[:3], bits[:3]))
    assert not torch.equal(bits2[-1], bits[-1])


def _reuse_studio():
    """Studio.reuse_settings without a worker pool (it reads the PNG only); widgets named by their names."""
    from types import SimpleNamespace

    from studio.serve.ui import Studio
    from test_reuse_settings import CONTROL, SHARED  # the page's widgets, named by their names

    studio = object.__new__(Studio)
    studio.info = lambda model: SimpleNamespace(class_names=[])
    names = SHARED + CONTROL + ["gen_prompt", "negative_prompt", "aspect_ratio", "tau", "edit_prompt", "guide_prompt"]
    studio.w = SimpleNamespace(**{n: n for n in names})
    return studio


def test_python_callers_who_leave_out_sampling_settings_get_the_models_published_ones(pool):
    """WorkerPool.submit without guidance_scale, top_k and top_p runs with Infinity's published settings
    (cfg 3, top-k 2, top-p 0.97: ModelInfo.defaults), exactly as a web user who leaves them out, not with
    VAR's; the PNG stores the values used; a value given is kept."""
    from studio.serve.inputs import sampling

    left_out = _done(pool.submit("generate", P.GenerateParams(prompt="a red fox", seed=4, preview="none")))
    params, packed = read_png_info(left_out.result.images[0])
    assert (params["guidance_scale"], params["top_k"], params["top_p"]) == (3.0, 2, 0.97)
    web = sampling(pool.models["infinity"], 4, None, None, None, False, 1, "none")  # the web endpoints' values
    as_web = _done(pool.submit("generate", dict(web, prompt="a red fox")))
    web_params, web_packed = read_png_info(as_web.result.images[0])
    assert all(np.array_equal(a, b) for a, b in zip(web_packed, packed, strict=True))  # the same bits
    assert {k: v for k, v in web_params.items() if k != "seconds"} == {k: v for k, v in params.items() if k != "seconds"}
    given = _done(pool.submit("generate", {"prompt": "a red fox", "seed": 4, "preview": "none", "guidance_scale": 1.0}))
    params = read_png_info(given.result.images[0])[0]
    assert (params["guidance_scale"], params["top_k"], params["top_p"]) == (1.0, 2, 0.97)


def test_image_i_of_a_batch_is_its_seed_plus_i_alone(pool, tmp_path):
    """Each image of a batch has its own generator, as for VAR: image i's PNG says seed + i, and that seed
    alone makes the same bit pyramid and picture; Reuse settings says how to make it alone."""
    batch = _done(pool.submit("generate", {"prompt": "a red fox", "seed": 11, "num_images": 2, "preview": "none"}))
    (p0, bits0), (p1, bits1) = (read_png_info(png) for png in batch.result.images)
    assert (p0["seed"], p1["seed"], p0["batch_seed"], p1["batch_seed"], p1["index_in_batch"]) == (11, 12, 11, 11, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(bits0, bits1))  # two different images
    alone = _done(pool.submit("generate", {"prompt": "a red fox", "seed": 12, "preview": "none"}))
    pa, bits_alone = read_png_info(alone.result.images[0])
    assert pa["seed"] == 12 and all(np.array_equal(a, b) for a, b in zip(bits1, bits_alone))
    pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
              for png in (batch.result.images[1], alone.result.images[0])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # the same picture (batched float sums differ a little)
    path = tmp_path / "second.png"
    path.write_bytes(batch.result.images[1])
    studio = _reuse_studio()
    out = studio.reuse_settings(str(path))
    assert (out["seed"], out["num_images"], out["gen_prompt"]) == (11, 2, "a red fox")  # the batch, this image in it
    assert "set Seed 12 and 1 image" in out["status"] and "a red fox" in out["status"]

def test_inpainting_with_a_prompt_keeps_the_outside(pool):
    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((256, 256), Image.BICUBIC)
    mask = np.zeros((256, 256), np.uint8)
    mask[96:160, 96:160] = 255
    buf, mbuf = io.BytesIO(), io.BytesIO()
    picture.save(buf, format="PNG")
    Image.fromarray(mask).save(mbuf, format="PNG")
    view = _done(pool.submit("inpaint", {"image": buf.getvalue(), "mask": mbuf.getvalue(), "mask_blur": 0,
                                         "prompt": "green hills", "seed": 1}))
    out = np.asarray(Image.open(io.BytesIO(view.result.images[0])).convert("RGB")).astype(int)
    src = np.asarray(picture).astype(int)
    inside = mask > 0
    assert (out[~inside] == src[~inside]).all()  # outside the mask: the picture's pixels
    assert np.abs(out[inside] - src[inside]).mean() > 5  # inside: regenerated
    params, packed = read_png_info(view.result.images[0])
    assert params["task"] == "inpaint" and params["prompt"] == "green hills"

    # its re-roll from scale 3 keeps the known region: the outside pixels and bits, only the painted part resampled
    again = _done(pool.submit("reroll", {"source_png": view.result.images[0], "keep_scales": 3, "seed": 8,
                                         "preview": "none"}))
    rerolled = np.asarray(Image.open(io.BytesIO(again.result.images[0])).convert("RGB")).astype(int)
    assert (rerolled[~inside] == out[~inside]).all() and (rerolled[~inside] == src[~inside]).all()
    assert np.abs(rerolled[inside] - out[inside]).mean() > 5  # the painted part: resampled
    p2, packed2 = read_png_info(again.result.images[0])
    assert p2["rerolled_edit"] == "inpaint" and p2["prompt"] == "green hills" and p2["keep_scales"] == 3
    from studio.infinity import unpack_bits
    bits, bits2 = (unpack_bits(b, params["bit_scales"], params["bits_per_position"]) for b in (packed, packed2))
    cells = np.zeros((16, 16), bool)
    cells[6:10, 6:10] = True  # the 64 px square's latent cells (16 px each)
    assert torch.equal(bits2[-1][0][~cells], bits[-1][0][~cells]) and not torch.equal(bits2[-1], bits[-1])
    assert all(torch.equal(a, b) for a, b in zip(bits2[:3], bits[:3]))

    # out-painting: the canvas in-painted where it is new, at the official size nearest its shape
    view = _done(pool.submit("outpaint", {"image": buf.getvalue(), "right": 256, "mask_blur": 0, "prompt": "snow",
                                          "seed": 2, "preview": "none"}))
    out = np.asarray(Image.open(io.BytesIO(view.result.images[0])).convert("RGB")).astype(int)
    assert out.shape == (176, 352, 3)  # 512x256 -> the 1:2 template at 0.06M
    kept = np.asarray(picture.resize((176, 176), Image.BILINEAR)).astype(int)
    assert np.abs(out[:, :160] - kept[:, :160]).mean() < 12  # the picture stays on the left (resized)
    assert read_png_info(view.result.images[0])[0]["right"] == 256


@pytest.mark.parametrize("values, words", [
    ({"class_name": "volcano", "prompt": "a fox"}, "text-to-image .* no classes"),
    ({"prompt": ""}, "write a prompt"),
    ({"prompt": "a fox", "aspect_ratio": "wide"}, "width:height"),
])
def test_bad_text_requests_fail_in_words_and_the_worker_serves_on(pool, values, words):
    job = pool.submit("generate", dict(values, preview="none"))
    for _ in job.updates():
        pass
    view = job.view()
    assert view.status == "failed" and re.search(words, view.error), view.error
    _done(pool.submit("generate", {"prompt": "a dog", "seed": 1, "preview": "none"}))  # the worker serves on


def test_a_prompt_to_a_class_conditional_model_is_refused():
    p = P.parse("generate", {"prompt": "a red fox"})
    with pytest.raises(UserError, match="class-conditional .* not prompt"):
        P.check_conditioning(p, "var")
    P.check_conditioning(P.parse("generate", {"class_name": "volcano"}), "var")  # a class is fine
    with pytest.raises(UserError, match="no classes"):
        P.check_conditioning(P.parse("generate", {"class_name": "volcano"}), "infinity")


def test_the_page_sends_text_only_to_a_text_to_image_model():
    from studio.serve.protocol import ModelInfo
    from studio.serve.ui_infinity import text_values

    var = ModelInfo("default", "", ["alpine day"], 64, [1, 2, 4], 64)
    assert text_values(var, "", "", "1:1", None) == {}  # the hidden widgets' values: nothing is sent
    with pytest.raises(UserError, match="class-conditional: it takes a class, not prompt, aspect_ratio"):
        text_values(var, "a fox", "", "2:1", None)
    inf = ModelInfo("inf", "", [], 256, [1, 2, 4], 2, family="infinity")
    assert text_values(inf, " a fox ", "", "2:1", 0) == dict(prompt="a fox", negative_prompt="", aspect_ratio="2:1",
                                                             tau=None)  # an emptied number box: the model's tau


def test_reuse_settings_brings_back_a_prompt(tmp_path):  # an older PNG: one generator drew its batch
    from studio.pngmeta import encode_png
    from studio.serve.ui_infinity import reuse_outputs

    studio = _reuse_studio()
    assert set(reuse_outputs(studio.w)) <= set(vars(studio.w))
    path = tmp_path / "fox.png"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8)), dict(
        task="generate", model="inf", family="infinity", seed=5, num_images=2, index_in_batch=1, prompt="a red fox",
        negative_prompt="blue sky", aspect_ratio="2:1", tau=0.7, guidance_scale=3.0, top_k=2, top_p=0.97)))
    out = studio.reuse_settings(str(path))
    assert out["gen_prompt"] == out["edit_prompt"] == out["guide_prompt"] == "a red fox"
    assert (out["negative_prompt"], out["aspect_ratio"], out["tau"]) == ("blue sky", "2:1", 0.7)
    assert (out["seed"], out["num_images"], out["guidance"]) == (5, 2, 3.0)  # the batch's one seed makes it again
    assert "a red fox" in out["status"] and "number 2" in out["status"]


def test_choosing_a_model_shows_prompts_or_classes():
    from types import SimpleNamespace

    from studio.serve.protocol import ModelInfo
    from studio.serve.ui import Studio
    from studio.serve.ui_infinity import family_outputs

    names = ["gen_class", "edit_class", "guide_class", "control_class", "control_note", "keep_scales", "reroll_keep",
             "top_k", "gen_text", "edit_prompt", "guide_prompt", "text_sampling", "more_smooth", "guidance", "top_p",
             "aspect_ratio", "tau"]
    models = {"var": ModelInfo("var", "", ["alpine day"], 64, [1, 2, 4], 64),
              "inf": ModelInfo("inf", "", [], 256, [1, 2, 4, 6, 8, 12, 16], 2, family="infinity",
                               aspect_ratios=["1:1"], defaults=dict(guidance_scale=3.0, tau=0.5, top_k=2, top_p=0.97))}
    studio = object.__new__(Studio)
    studio.models = models
    studio.w = SimpleNamespace(**{n: n for n in names})
    assert set(family_outputs(studio.w)) <= set(names)
    inf, var = studio.model_and_family_changed("inf"), studio.model_and_family_changed("var")
    assert set(inf) <= set(names) and set(var) <= set(names)
    assert inf["gen_text"].visible and not inf["gen_class"]["visible"] and inf["gen_class"]["choices"] == ["(random)"]
    assert (inf["guidance"]["value"], inf["top_p"]["value"], inf["top_k"]["maximum"]) == (3.0, 0.97, 2)
    assert not var["gen_text"].visible and var["gen_class"]["visible"] and var["more_smooth"]["visible"]
    assert (var["guidance"]["value"], var["top_p"]["value"]) == (P.VAR_DEFAULTS["guidance_scale"], P.VAR_DEFAULTS["top_p"])


def test_app_takes_the_text_encoder_from_the_command_line(pool, infinity_folder, other_t5, tmp_path, monkeypatch):
    """app.py --text-encoder PATH reaches the worker, whose prompts are then encoded by that T5, not by the one
    inside the model's folder (the pool runs with other_t5, as --text-encoder makes it); a hub id that is not
    cached while the hub is offline stops the worker's start with a message saying so (app.py prints it and
    exits with code 2)."""
    import multiprocessing

    import app
    from studio.infinity import InfinityPipeline, unpack_bits
    from studio.serve.runner import worker_main

    flags = ["--model", str(infinity_folder), "--text-encoder", str(other_t5)]
    spec = app.create_pool(app.parse_args(flags)).model_specs[0]  # (not started)
    assert (spec.source, spec.text_encoder) == (pool.model_specs[0].source, pool.model_specs[0].text_encoder)
    view = _done(pool.submit("generate", {"prompt": "a red fox", "seed": 3, "preview": "none"}))
    params, packed = read_png_info(view.result.images[0])
    bits = unpack_bits(packed, params["bit_scales"], params["bits_per_position"])
    settings = dict({k: params[k] for k in ("guidance_scale", "tau", "top_k", "top_p")}, prompt="a red fox",
                    output_type="pt")
    given = InfinityPipeline.from_pretrained(infinity_folder, text_encoder=other_t5)(
        generator=torch.Generator().manual_seed(3), **settings)
    inside = InfinityPipeline.from_pretrained(infinity_folder)(generator=torch.Generator().manual_seed(3), **settings)
    assert all(torch.equal(a, b) for a, b in zip(bits, given.tokens))
    assert not torch.equal(bits[-1], inside.tokens[-1])  # the folder's own T5 would have made another image

    # the worker's start (here in this process, as the pool's child runs it) refuses a missing encoder in words
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parent, child = multiprocessing.Pipe()
    spec = app.model_specs([str(infinity_folder)], "nobody/no-such-t5")[0]
    worker_main(dict(device="cpu", torch_threads=1, models=[(spec.name, spec.source)], preview="none", preview_size=64,
                     text_encoders={spec.name: spec.text_encoder}), child, None)
    kind, why = parent.recv()
    assert kind == "fatal" and "nobody/no-such-t5 is no folder here" in why and "the hub is offline" in why, why


def test_the_api_gives_left_out_sampling_settings_the_chosen_models_defaults():
    """On a page whose first model is class-conditional, an API call to the Infinity model that leaves out
    guidance_scale, top_k or top_p gets Infinity's published defaults (ModelInfo.defaults), not VAR's: the API
    advertises None for them (gradio_client sends the advertised default of a left-out parameter) and the
    endpoint fills them from the chosen model; values a caller passes are kept."""
    import types

    from studio.serve.inputs import sampling
    from studio.serve.protocol import ModelInfo
    from studio.serve.ui import Studio, build_ui

    var = ModelInfo("var", "", ["alpine day"], 64, [1, 2, 4], 64)
    inf = ModelInfo("inf", "", [], 256, [1, 2, 4, 6, 8, 12, 16], 2, family="infinity",
                    defaults=dict(guidance_scale=3.0, tau=0.5, top_k=2, top_p=0.97))
    studio = object.__new__(Studio)
    studio.models, studio.default_model, studio.w = {"var": var, "inf": inf}, "var", types.SimpleNamespace()
    studio.pool = types.SimpleNamespace(preview="fast", devices=["cpu"])
    demo = build_ui(studio)
    w = studio.w
    assert (w.guidance.value, w.top_p.value) == (P.VAR_DEFAULTS["guidance_scale"], P.VAR_DEFAULTS["top_p"])  # the page: VAR's
    api = demo.get_api_info()["named_endpoints"]
    for endpoint in ("/generate", "/inpaint", "/outpaint", "/guide", "/reroll"):
        params = {p["parameter_name"]: p for p in api[endpoint]["parameters"]}
        for name in ("guidance_scale", "top_k", "top_p"):
            assert (params[name]["parameter_has_default"], params[name]["parameter_default"]) == (True, None)
        assert params["seed"]["parameter_default"] == -1  # the others keep theirs
    assert w.guidance.preprocess(None) is None and w.guidance.preprocess(3.5) == 3.5  # a left-out value reaches it

    def settings(info, *values):
        out = sampling(info, 0, *values, False, 1, None)
        return out["guidance_scale"], out["top_k"], out["top_p"]

    assert settings(inf, None, None, None) == (3.0, 2, 0.97)  # Infinity's own
    assert settings(var, None, None, None) == (P.VAR_DEFAULTS["guidance_scale"], 64, P.VAR_DEFAULTS["top_p"])  # VAR's (top-k: 64 tokens)
    assert settings(inf, 4.0, 1, 0.5) == (4.0, 1, 0.5)  # given: kept
