"""Published control weights in the studio's worker: a tiny random ControlVAR model and a CAR file
(released formats, tests/tiny_controlvar.py) served by the worker pool. The model info lists its four types,
the Control job streams and stores its control in the PNG, image i of a batch is seed + i alone, a
re-roll steers with the stored map again, and a map that cannot be made here says what can."""
import io

import numpy as np
import pytest
from PIL import Image
from tiny_controlvar import write_tiny_car, write_tiny_controlvar

from studio.pngmeta import decode_picture, read_png_extras, read_png_parameters
from studio.serve.pool import ModelSpec, WorkerPool


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo(size=96) -> bytes:
    a = np.full((size, size, 3), 30, np.uint8)
    a[20:70, 10:60] = (220, 180, 40)
    return png(Image.fromarray(a))


@pytest.fixture(scope="module")
def cvar_folder(tmp_path_factory):
    return write_tiny_controlvar(tmp_path_factory.mktemp("controlvar"))


@pytest.fixture(scope="module")
def pool(cvar_folder, tmp_path_factory):
    p = WorkerPool([ModelSpec("cvar", str(cvar_folder))], devices=["cpu"], outputs=tmp_path_factory.mktemp("outputs"),
                   torch_threads=1)
    with p:
        yield p


def done(job, timeout=600):
    assert job.wait(timeout) and job.status == "done", job.error
    return job.result


def test_the_worker_reports_controlvars_types_and_preprocessors(pool):
    info = pool.models["cvar"]
    assert info.controls == ["segmentation", "canny", "depth", "normal"] and info.control_family == "controlvar"
    assert info.control_preprocessors == {"segmentation": ["entities", "none"], "canny": ["canny", "none"],
                                          "depth": ["transformers", "none"], "normal": ["normal", "none"]}


def test_control_batch_png_fields_and_reroll(pool):
    job = pool.submit("control", {"image": photo(), "control_type": "canny", "class_name": "7", "seed": 40,
                                  "num_images": 2, "top_k": 20, "guidance_scale": 3.0, "type_guidance_scale": 1.5,
                                  "control_guidance_scale": 2.5})
    alone = pool.submit("control", {"image": photo(), "control_type": "canny", "class_name": "7", "seed": 41,
                                    "top_k": 20, "guidance_scale": 3.0, "type_guidance_scale": 1.5,
                                    "control_guidance_scale": 2.5})
    res, one = done(job), done(alone)
    assert [u.scale_index for u in job.scales] == list(range(4))  # every scale streamed
    assert all(np.array_equal(a, b) for a, b in zip(res.tokens[1], one.tokens[0]))  # image 2 = seed 41 alone
    params = read_png_parameters(res.paths[1])
    assert params["seed"] == 41 and params["control_type"] == "canny" and params["preprocessor"] == "canny"
    weights = (params["guidance_scale"], params["type_guidance_scale"], params["control_guidance_scale"])
    assert weights == (3.0, 1.5, 2.5)
    extras = read_png_extras(open(res.paths[1], "rb").read())["control"]
    stored = np.asarray(decode_picture(extras["picture"]))  # the condition picture itself, as a PNG
    assert stored.shape == (64, 64, 3) and set(np.unique(stored)) == {0, 255}
    assert len(extras["picture"]) < 4 * 64 * 64  # compact: a PNG, not its 12,288 bytes of pixels

    reroll = done(pool.submit("reroll", {"source_png": open(res.paths[0], "rb").read(), "keep_scales": 2, "seed": 9,
                                         "top_k": 20, "guidance_scale": 3.0}))
    again = read_png_parameters(reroll.paths[0])
    assert again["control_type"] == "canny" and again["type_guidance_scale"] == 1.5
    assert all(np.array_equal(a, b) for a, b in zip(reroll.tokens[0][:2], res.tokens[0][:2]))  # kept scales
    assert read_png_extras(open(reroll.paths[0], "rb").read())["control"]["picture"] == extras["picture"]


def test_preview_maps_and_what_cannot_be_made_here(pool):
    layout = np.zeros((64, 64, 3), np.uint8)
    layout[:, 32:] = (10, 200, 10)
    seg = done(pool.submit("preprocess", {"image": png(Image.fromarray(layout)), "control_type": "segmentation"}))
    shown = np.asarray(Image.open(io.BytesIO(seg.images[0])).convert("RGB"))
    assert shown.shape == (64, 128, 3)  # the map, and beside it the map as the model reads it (its VQVAE)
    from studio.preprocess import controlvar_segmentation

    assert np.array_equal(shown[:, :64], np.asarray(controlvar_segmentation(Image.fromarray(layout), 64).preview))
    assert seg.params[0]["preprocessor"] == "entities"
    pid = pool.worker_pids()[0]
    normal = pool.submit("preprocess", {"image": photo(), "control_type": "normal"})
    assert normal.wait(120) and normal.status == "failed"
    assert "normal maps cannot be made from a picture on this machine" in normal.error
    assert "made from a picture here: segmentation, canny" in normal.error and "'none'" in normal.error
    wrong = pool.submit("control", {"image": photo(), "control_type": "hed"})
    assert wrong.wait(120) and wrong.status == "failed" and "has no hed control" in wrong.error
    assert pool.worker_pids()[0] == pid


def test_a_car_file_in_the_worker(tmp_path):
    """`app.py --model car_hed_d2.pth`: the worker lists the file's type with its preprocessors; a control run
    with the adapters' strength and range stores them and the condition picture; a re-roll steers with it again."""
    (tmp_path / "weights").mkdir()
    car = write_tiny_car(tmp_path / "weights", "hed")
    with WorkerPool([ModelSpec("car", str(car))], devices=["cpu"], outputs=tmp_path / "out", torch_threads=1) as pool:
        info = pool.models["car"]
        assert (info.controls, info.control_family, info.control_preprocessors) == (["hed"], "car",
                                                                                     {"hed": ["hed", "none"]})
        edges = Image.new("RGB", (64, 64), "black")
        edges.paste((255, 255, 255), (10, 10, 50, 14))
        res = done(pool.submit("control", {"image": png(edges), "control_type": "hed", "preprocessor": "none",
                                           "seed": 3, "control_strength": 0.75, "control_guidance_end": 0.8}))
        params = read_png_parameters(res.paths[0])
        steer = (params["control_type"], params["control_strength"], params["control_guidance_end"])
        assert steer == ("hed", 0.75, 0.8)
        extras = read_png_extras(open(res.paths[0], "rb").read())["control"]
        assert np.array_equal(np.asarray(decode_picture(extras["picture"])), np.asarray(edges))
        plain = done(pool.submit("control", {"image": png(edges), "control_type": "hed", "preprocessor": "none",
                                             "seed": 3, "control_strength": 0.0}))
        assert not all(np.array_equal(a, b) for a, b in zip(res.tokens[0], plain.tokens[0]))  # the map steers
        again = done(pool.submit("reroll", {"source_png": open(res.paths[0], "rb").read(), "keep_scales": 4,
                                            "seed": 3}))
        assert all(np.array_equal(a, b) for a, b in zip(again.tokens[0], res.tokens[0]))  # all kept: the same image
        assert read_png_parameters(again.paths[0])["control_strength"] == 0.75
        wrong = pool.submit("control", {"image": png(edges), "control_type": "canny"})
        assert wrong.wait(120) and wrong.status == "failed" and "has no canny control; it has: hed" in wrong.error


def edge_picture(size=96, box=(20, 20, 76, 40)) -> Image.Image:
    """An edge map drawn by hand: a white rectangle's outline on black."""
    a = np.zeros((size, size, 3), np.uint8)
    x0, y0, x1, y1 = box
    a[y0, x0:x1] = a[y1 - 1, x0:x1] = a[y0:y1, x0] = a[y0:y1, x1 - 1] = 255
    return Image.fromarray(a)


def square_mask(size=96, box=(12, 12, 84, 84)) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpainting_under_control_keeps_the_outside_and_follows_the_map(pool, cvar_folder):
    """The control_inpaint job (the Edit tab's 'In-paint under control'): a ControlVAR model in-paints the
    masked square of a 96 px picture (all but a 12 px frame) under a canny map (an edge picture, preprocessor none): outside the
    mask every pixel stays; inside, the tokens are the pipeline's own inpaint under that map (the sampler
    the faithfulness tests check); another map paints another inside; without a control picture the map is
    the picture's own edges; the PNG keeps the map and the edit, and a re-roll resamples inside only."""
    from studio.pipeline import VARPipeline
    from studio.preprocess import picture_map

    picture = Image.open(io.BytesIO(photo(96))).convert("RGB")
    mask = square_mask()
    common = {"image": png(picture), "mask": png(Image.fromarray((mask * 255).astype(np.uint8))),
              "mask_blur": 0, "inpaint_area": "whole", "class_name": "3", "seed": 5, "top_k": 20,
              "control_type": "canny", "preprocessor": "none", "type_guidance_scale": 2.0}
    jobs = {name: pool.submit("control_inpaint", dict(common, control_image=png(pic)))
            for name, pic in (("box", edge_picture()), ("other", edge_picture(box=(30, 50, 90, 90))))}
    own = pool.submit("control_inpaint", dict(common, preprocessor="canny"))  # the picture's own edges
    res = {name: done(job) for name, job in dict(jobs, own=own).items()}

    original = np.asarray(picture)
    for name, r in res.items():
        out = pixels(r.paths[0])
        assert np.array_equal(out[~mask], original[~mask]), name  # the outside, exactly
        assert not np.array_equal(out[mask], original[mask]), name  # the inside, regenerated
    assert not np.array_equal(pixels(res["box"].paths[0])[mask], pixels(res["other"].paths[0])[mask])

    import torch

    pipe = VARPipeline.from_pretrained(cvar_folder)

    cmap = picture_map("canny", edge_picture(), "none", size=pipe.resolution)
    api = pipe.inpaint(picture, Image.fromarray((mask * 255).astype(np.uint8)), class_labels=3, mask_blur=0,
                       inpaint_area="whole", control_image=cmap, control_type="canny", top_k=20,
                       type_guidance_scale=2.0, generator=[torch.Generator().manual_seed(5)])
    assert all(np.array_equal(a[0].numpy(), b) for a, b in zip(api.tokens, res["box"].tokens[0]))

    params = read_png_parameters(res["own"].paths[0])
    assert (params["task"], params["control_type"], params["preprocessor"]) == ("control_inpaint", "canny", "canny")
    assert params["map_from"] == "edited picture" and params["type_guidance_scale"] == 2.0
    stored = np.asarray(decode_picture(read_png_extras(open(res["own"].paths[0], "rb").read())["control"]["picture"]))
    assert np.array_equal(stored, np.asarray(picture_map("canny", picture, "canny", size=pipe.resolution)))

    source = open(res["box"].paths[0], "rb").read()
    reroll = done(pool.submit("reroll", {"source_png": source, "keep_scales": 2, "seed": 9, "top_k": 20}))
    again = read_png_parameters(reroll.paths[0])
    assert again["rerolled_edit"] == "control_inpaint" and again["control_type"] == "canny"
    out = pixels(reroll.paths[0])
    assert np.array_equal(out[~mask], original[~mask])
    assert all(np.array_equal(a, b) for a, b in zip(reroll.tokens[0][:2], res["box"].tokens[0][:2]))
