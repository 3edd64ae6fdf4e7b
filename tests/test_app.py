"""The studio end to end: the real app on a free loopback port, a tiny random model, gradio_client.

The model is slowed to 0.15 s per scale so streaming and Stop can be watched on a 64 px model; the
cheap latent-to-RGB preview keeps the runs short (one test uses the full decode)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from test_worker import TINY_PATCH_NUMS, layout_png, tiny_bundle  # noqa: F401 (the fixture)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from studio.generate import read_png_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NUM_SCALES = len(TINY_PATCH_NUMS)
SCALE = re.compile(r"Scale \*\*(\d+)/(\d+)\*\*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(bundle, outputs, *extra):
    """What app.main does, minus the blocking launch."""
    import app

    args = app.parse_args(["--model", str(bundle), "--device", "cpu", "--outputs", str(outputs), "--threads", "1",
                           *extra])
    pool = app.create_pool(args).start(wait=False)
    from studio.serve import ui  # Gradio loads while the worker loads the model

    pool.wait_ready()
    ui.patch_gradio()
    studio = ui.Studio(pool)
    demo = ui.build_ui(studio)
    _, url, _ = ui.launch(demo, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    return SimpleNamespace(url=url, pool=pool, demo=demo, outputs=outputs)


IMPORT_CHECK = ("import sys; import app, studio.params, studio.pngmeta, studio.serve.ui, studio.serve.pool; "
                "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
                "print(bad); sys.exit(1 if bad else 0)")


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):
    # the import check runs in its own interpreter, started now so it overlaps the app's start
    check = subprocess.Popen([sys.executable, "-c", IMPORT_CHECK], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    served = start_app(tiny_bundle, tmp_path_factory.mktemp("outputs"), "--scale-delay", "0.15", "--preview", "fast",
                       "--model", str(tiny_bundle))  # the same weights again: a second entry in the model menu
    served.import_check = check
    assert served.url.startswith("http://127.0.0.1:")
    yield served
    served.demo.close()
    served.pool.close()
    check.kill()


def connect(app):
    # files stay on the server (the same machine): no download of every streamed frame
    return Client(app.url, verbose=False, download_files=False)


@pytest.fixture
def client(app):
    return connect(app)


def path(file_data) -> Path:
    return Path(file_data["path"] if isinstance(file_data, dict) else file_data)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 48), "seagreen").save(d / "image.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[12:30, 20:44] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.new("L", (32, 32), 255).save(d / "mask_small.png")
    Image.new("L", (64, 48), 0).save(d / "mask_empty.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (d / "layout.png").write_bytes(layout_png(48))  # sky above grass, in the world's palette
    return d


def editor(path):
    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def run(client, api_name, **kwargs):
    """Submit, collect every streamed output, and return (outputs, final); raises AppError on failure."""
    job = client.submit(api_name=api_name, **kwargs)
    outs = list(job)
    return outs, job.result()


def scales_seen(outs):
    """The scales the status line reported, in order; a scale repeated back to back counts once (on a busy
    machine a scale can outlast the pool's one-second status refresh, which says it again)."""
    seen = [int(m.group(1)) for o in outs if isinstance(o[1], str) and (m := SCALE.search(o[1]))]
    return [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]


def test_the_ui_process_never_imports_torch(app):
    out, _ = app.import_check.communicate(timeout=120)
    assert app.import_check.returncode == 0, out


def test_generate_streams_one_preview_per_scale_then_the_final_image(app, client):
    outs, final = run(client, "/generate", class_name="class 3", seed=11, guidance_scale=2.0, num_images=1,
                      preview="full")
    assert scales_seen(outs) == list(range(1, NUM_SCALES + 1))
    previews = [path(o[0]) for o in outs if isinstance(o[1], str) and SCALE.search(o[1])]
    assert len(set(previews)) == NUM_SCALES and all(Image.open(p).format == "JPEG" for p in previews)
    strip_lengths = [len(o[2]) for o in outs if isinstance(o[2], list)]  # the filmstrip grows, at most every 0.25 s
    assert strip_lengths[0] == 1 and strip_lengths == sorted(strip_lengths) and strip_lengths[-1] == NUM_SCALES
    assert outs[-1] == final and final[1].startswith("✓ Done")
    result = final[3]
    assert len(result) == 1
    png = path(result[0]["image"])
    params = read_png_parameters(png)
    assert params["seed"] == 11 and params["class_name"] == "class 3" and params["guidance_scale"] == 2.0
    saved = list(Path(app.outputs).rglob("*.png"))
    assert any(p.read_bytes() == png.read_bytes() for p in saved)  # on disk, identical to what was shown
    assert Image.open(path(final[0])).size == (64, 64)


def test_a_sessions_gradio_state_does_not_grow_with_its_jobs(app, client):
    """Gradio files a new component in the session's config for every output a run's early yields
    skip and a later one fills (four a job: the web process grew ~10 MB per 100 jobs); they are
    dropped when the run ends, so a session's state is as big after five jobs as after one."""
    def size():
        state = app.demo.state_holder.session_data[client.session_hash]
        return len(state.blocks_config.blocks), len(state.config_values)

    run(client, "/generate", seed=21, preview="fast")
    first = size()
    for seed in range(22, 26):
        run(client, "/generate", seed=seed, preview="fast")
    assert size() == first
    assert first[0] <= len(app.demo.blocks)  # the page's components, nothing more


def test_stop_ends_the_job_early_and_the_next_job_runs(app, client):
    job = client.submit(seed=1, api_name="/generate")
    for out in job:
        if scales_seen([out]):
            client.predict(api_name="/stop")
            break
    rest = list(job)
    final = job.result()
    assert final[1].startswith("⏹ Stopped"), final[1]
    assert max(scales_seen(rest) or [1]) < NUM_SCALES
    outs, final = run(client, "/generate", seed=2)
    assert final[1].startswith("✓ Done") and scales_seen(outs)[-1] == NUM_SCALES


def test_a_closed_client_cancels_its_job_on_the_worker(app, client):
    job = client.submit(seed=777, api_name="/generate")
    for out in job:
        if scales_seen([out]):
            job.cancel()  # what a closed browser tab does
            break
    outs, final = run(connect(app), "/generate", seed=778)
    assert final[1].startswith("✓ Done")
    assert not list(Path(app.outputs).rglob("*_s777_*.png"))  # the cancelled job never finished


def test_a_second_model_is_selectable(app, client):
    second = list(app.pool.models)[1]
    outs, final = run(client, "/generate", model=second, seed=3, class_name="7")
    params = read_png_parameters(path(final[3][0]["image"]))
    assert params["model"] == second and params["class_name"] == "class 7"


def test_a_killed_worker_is_restarted_and_the_next_job_runs(app, client):
    job = client.submit(seed=3, api_name="/generate")
    for out in job:
        if scales_seen([out]):
            old = app.pool.worker_pids()[0]
            os.kill(old, signal.SIGKILL)
            break
    with pytest.raises(AppError, match="stopped unexpectedly"):
        list(job)
        job.result()
    outs, final = run(client, "/generate", seed=4)
    assert final[1].startswith("✓ Done")
    assert app.pool.worker_pids()[0] not in (None, old)


def test_bad_input_gets_a_clear_error_and_the_app_keeps_serving(app, client, images):
    pid = app.pool.worker_pids()[0]
    cases = [
        ("unknown class name 'zebra'", "/generate", dict(class_name="zebra")),
        ("image could not be read", "/inpaint", dict(image=editor(images / "corrupt.png"),
                                                     mask=handle_file(str(images / "mask.png")))),
        ("mask could not be read", "/inpaint", dict(image=editor(images / "image.png"),
                                                    mask=handle_file(str(images / "corrupt.png")))),
        ("must be the same size", "/inpaint", dict(image=editor(images / "image.png"),
                                                   mask=handle_file(str(images / "mask_small.png")))),
        ("mask is empty", "/inpaint", dict(image=editor(images / "image.png"),
                                           mask=handle_file(str(images / "mask_empty.png")))),
        ("mask is empty", "/inpaint", dict(image=editor(images / "image.png"), mask=None)),
        ("at least one side", "/outpaint", dict(image=editor(images / "image.png"), right=0)),
        ("Select a result first", "/reroll", dict(image=None)),
        ("no token pyramid", "/reroll", dict(image=handle_file(str(images / "image.png")))),
    ]
    for expected, api_name, kwargs in cases:
        with pytest.raises(AppError, match=re.escape(expected)):
            run(client, api_name, **kwargs)
    outs, final = run(client, "/generate", seed=5)
    assert final[1].startswith("✓ Done")
    assert app.pool.worker_pids()[0] == pid  # no input ever took the worker down


def test_inpaint_outpaint_guide_and_reroll(app, client, images):
    outs, final = run(client, "/inpaint", image=editor(images / "image.png"),
                      mask=handle_file(str(images / "mask.png")), mask_blur=2, seed=1)
    assert scales_seen(outs)[-1] == NUM_SCALES
    inpainted = Image.open(path(final[3][0]["image"]))
    assert inpainted.size == (64, 48)
    a, b = np.asarray(inpainted), np.asarray(Image.open(images / "image.png"))
    assert (a[:4] == b[:4]).all()  # far from the mask the original pixels are kept exactly
    assert read_png_parameters(path(final[3][0]["image"]))["task"] == "inpaint"

    outs, final = run(client, "/outpaint", image=editor(images / "image.png"), right=16, top=8, seed=1)
    assert Image.open(path(final[3][0]["image"])).size == (80, 56)

    outs, final = run(client, "/guide", guide_image=editor(images / "image.png"), keep_scales=2, class_name="class 1",
                      seed=1, num_images=2)
    assert len(final[3]) == 2 and read_png_parameters(path(final[3][1]["image"]))["keep_scales"] == 2

    source = path(final[3][0]["image"])
    outs, final = run(client, "/reroll", image=handle_file(str(source)), keep_scales=3, seed=9)
    params = read_png_parameters(path(final[3][0]["image"]))
    assert params["task"] == "reroll" and params["keep_scales"] == 3 and params["class_name"] == "class 1"
    assert scales_seen(outs) == list(range(1, NUM_SCALES + 1))


def test_a_waiting_job_shows_its_queue_position(app, images):
    first, second = connect(app), connect(app)
    a = first.submit(seed=1, api_name="/generate")
    while not app.pool.queue_length and not any(scales_seen([o]) for o in a.outputs()):
        time.sleep(0.02)
    outs, final = run(second, "/generate", seed=2)
    a.result()
    assert any(isinstance(o[1], str) and "Waiting in the queue: position **1**" in o[1] for o in outs)
    assert final[1].startswith("✓ Done")


def test_app_exits_with_a_clear_message_for_a_missing_model(app, tmp_path, capsys):
    import app as app_py

    assert app_py.main(["--model", str(tmp_path / "missing"), "--device", "cpu", "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not load model" in err and "no such folder" in err


def test_control_streams_one_preview_per_scale_then_the_final_image(app, client, images):
    outs, final = run(client, "/control", image=editor(images / "layout.png"), control_type="segmentation",
                      preprocessor="none", control_strength=1.5, control_guidance_end=0.5, class_name="class 2",
                      seed=12, preview="full")
    assert scales_seen(outs) == list(range(1, NUM_SCALES + 1))
    previews = [path(o[0]) for o in outs if isinstance(o[1], str) and SCALE.search(o[1])]
    assert len(set(previews)) == NUM_SCALES and all(Image.open(p).format == "JPEG" for p in previews)
    assert outs[-1] == final and final[1].startswith("✓ Done")
    png = path(final[3][0]["image"])
    assert Image.open(png).size == (64, 64) and path(final[4]) == png
    assert path(final[5][0]["image"]) == png  # first in the history
    params = read_png_parameters(png)
    assert params["task"] == "control" and params["control_type"] == "segmentation"
    assert params["preprocessor"] == "none" and params["control_strength"] == 1.5
    assert params["control_guidance_end"] == 0.5 and params["class_name"] == "class 2" and params["seed"] == 12

    outs, final = run(client, "/control", image=editor(images / "image.png"), canny_low=50, canny_high=120, seed=1,
                      num_images=2)  # the defaults: canny edges of the picture
    params = read_png_parameters(path(final[3][1]["image"]))
    assert len(final[3]) == 2 and params["control_type"] == "canny" and params["canny_low"] == 50


def test_preprocess_previews_the_map_at_the_model_resolution(app, client, images):
    for control_type, preprocessor, image in [("canny", "canny", "image.png"), ("depth", "world", "image.png"),
                                              ("segmentation", "world", "image.png"),
                                              ("segmentation", "none", "layout.png")]:
        out = client.predict(image=editor(images / image), control_type=control_type, preprocessor=preprocessor,
                             api_name="/preprocess")
        assert Image.open(path(out)).size == (64, 64), (control_type, preprocessor)
    try:  # never downloaded: without the weights in the local cache, a message that says how to get them
        out = client.predict(image=editor(images / "image.png"), control_type="depth", preprocessor="transformers",
                             api_name="/preprocess")
        assert Image.open(path(out)).size == (64, 64)
    except AppError as e:
        assert "not in the local Hugging Face cache" in str(e) and "hf download" in str(e), str(e)


def test_bad_control_requests_get_a_clear_error_and_the_app_keeps_serving(app, client, images):
    pid = app.pool.worker_pids()[0]
    layout = editor(images / "layout.png")
    cases = [
        ("hed", dict(image=layout, control_type="hed")),
        ("has no depth control adapter (it has: canny, segmentation)", dict(image=layout, control_type="depth",
                                                                            preprocessor="none")),
        ("control image could not be read", dict(image=editor(images / "corrupt.png"))),
        ("preprocessors canny, none, not 'world'", dict(image=layout, preprocessor="world")),
        ("Canny thresholds need 0 ≤ low ≤ high", dict(image=layout, canny_low=200, canny_high=100)),
        ("greater than maximum value 2", dict(image=layout, control_strength=3)),
        ("must start before it ends", dict(image=layout, control_guidance_start=0.6, control_guidance_end=0.4)),
    ]
    for expected, kwargs in cases:
        with pytest.raises(AppError, match=re.escape(expected)):
            run(client, "/control", **kwargs)
    with pytest.raises(AppError, match="control image could not be read"):
        client.predict(image=editor(images / "corrupt.png"), api_name="/preprocess")
    outs, final = run(client, "/control", image=layout, control_type="segmentation", preprocessor="world", seed=5)
    assert final[1].startswith("✓ Done")
    assert app.pool.worker_pids()[0] == pid


def test_the_ui_lists_the_preprocessors_of_studio_preprocess():
    from studio import preprocess
    from studio.serve import ui

    assert ui.CONTROL_PREPROCESSORS == preprocess.PREPROCESSORS
    assert [t for _, t in ui.CONTROL_TYPES] == list(preprocess.PREPROCESSORS)
