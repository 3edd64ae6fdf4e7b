"""Bad inputs and faults (issue 17): each gets a clear message naming the parameter and the limit,
the worker serves on, earlier outputs stay intact; the server refuses foreign Host headers and
another instance's files; a 100-megapixel upload never reaches the web process's memory.

Two studios run as real `python app.py` processes on the tiny random model (started together, so
their start-ups overlap); the rest are direct checks of the pieces."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from test_worker import tiny_bundle  # noqa: F401 (the fixture)

gradio_client = pytest.importorskip("gradio_client")
requests = pytest.importorskip("requests")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from studio.params import UserError  # noqa: E402
from studio.serve.limits import Limits  # noqa: E402
from studio.serve.outputs import SaveError, folder_problem, save_png  # noqa: E402
from studio.uploads import image_header, mask_levels  # noqa: E402
from studio.windows import count_windows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid, all-black greyscale PNG of width x height written row by row (a 100-megapixel one is
    ~100 kB and never exists decoded in this process either)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# ---------------------------------------------------------------------------------------------
# two studios in their own processes


class Studio:
    def __init__(self, bundle, outputs: Path, *extra):
        self.port, self.outputs = free_port(), outputs
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(outputs.parent / f"studio-{self.port}.log", "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(bundle), "--device", "cpu", "--threads", "1", "--preview",
             "none", "--port", str(self.port), "--outputs", str(outputs), *extra],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=600.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the studio exited: {self.text()}")
            try:
                if requests.get(self.url + "gradio_api/info", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the studio did not start: {self.text()}")

    def text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def client(self):
        return Client(self.url, verbose=False, download_files=False)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)  # the server closes, the worker is told to exit (seconds on a busy machine)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its group left behind
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def studios(tiny_bundle, tmp_path_factory):
    a = Studio(tiny_bundle, tmp_path_factory.mktemp("outputs_a"), "--max-upload-mb", "2")
    b = Studio(tiny_bundle, tmp_path_factory.mktemp("outputs_b"))
    try:
        yield a.wait(), b.wait()
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    Image.new("RGB", (64, 48), "seagreen").save(d / "image.png")
    Image.new("RGB", (1, 1), "red").save(d / "one.png")
    huge_png(d / "huge.png", 10_000, 10_000)
    (d / "big.png").write_bytes(os.urandom(3_000_000))  # over app A's --max-upload-mb 2
    (d / "notes.png").write_text("these are notes, not a picture")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "[" * 100_000)  # JSON nested past Python's recursion limit
    Image.new("RGB", (64, 64)).save(d / "deep.png", pnginfo=info)
    return d


def editor(path):
    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def refused(client, api_name, **kwargs) -> str:
    with pytest.raises(AppError) as e:
        client.predict(api_name=api_name, **kwargs)
    return str(e.value)


def generate(client, seed=1):
    out = client.predict(api_name="/generate", seed=seed)
    assert out[1].startswith("✓ Done"), out[1]
    return out


def test_a_100_megapixel_upload_is_refused_from_its_header_without_decoding(studios, inputs):
    a, _ = studios
    c = a.client()
    generate(c)  # the page, the queue and one job: the process at its working size
    before = peak_rss_mb(a.proc.pid)
    for api, extra in (("/inpaint", {"mask": None}), ("/outpaint", {"right": 64})):
        msg = refused(c, api, image=editor(inputs / "huge.png"), **extra)
        assert "10000x10000" in msg and "16 megapixels" in msg and "--max-upload-megapixels" in msg, msg
    msg = refused(c, "/guide", guide_image=editor(inputs / "huge.png"))
    assert "16 megapixels" in msg, msg
    after = peak_rss_mb(a.proc.pid)
    # decoded, the upload alone is 100 MB (L) to 400 MB (RGBA), and Gradio's editor made three copies
    assert after - before < 60, (before, after)
    assert after < 400, after
    generate(c, seed=2)  # the worker serves on


def test_an_upload_over_the_byte_limit_is_refused_by_gradio(studios, inputs):
    a, _ = studios
    with open(inputs / "big.png", "rb") as f:
        r = requests.post(a.url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert r.status_code == 413, r.text


def test_out_painting_that_needs_too_many_windows_is_refused_before_any_work(studios, inputs):
    a, _ = studios
    c = a.client()
    t = time.monotonic()
    msg = refused(c, "/outpaint", image=editor(inputs / "image.png"), left=512, right=512, top=512, bottom=512)
    assert "more than 32 windows" in msg and "--max-outpaint-windows" in msg, msg
    msg = refused(c, "/outpaint", image=editor(inputs / "one.png"), right=64)
    assert "1x1" in msg and "16x16" in msg, msg
    assert time.monotonic() - t < 60  # not the 188 s the worker once spent before failing
    generate(c, seed=3)


def test_developer_errors_become_messages_naming_the_parameter(studios, inputs):
    a, _ = studios
    c = a.client()
    # NaN is not JSON, so gradio_client will not send it; a hand-made request does (every input of /generate:
    # model, class, seed, guidance, top-k, top-p, more smooth, images, preview, history page, then the
    # text-to-image fields: prompt, negative prompt, aspect ratio, tau)
    r = requests.post(a.url + "gradio_api/call/generate", headers={"content-type": "application/json"},
                      data='{"data": [null, null, NaN, 4, 900, 0.95, false, 1, "none", 0, "", "", null, 0]}')
    msg = requests.get(a.url + "gradio_api/call/generate/" + r.json()["event_id"]).text
    assert "event: error" in msg and "Seed (-1 = random) must be a number, got nan" in msg, msg
    msg = refused(c, "/reroll", image=handle_file(str(inputs / "notes.png")))
    assert "could not be read as an image" in msg and "PNG, JPEG or WebP" in msg, msg
    msg = refused(c, "/reroll", image=handle_file(str(inputs / "deep.png")))
    assert "cannot read" in msg and "Recursion" in msg and "internal error" not in msg, msg
    generate(c, seed=4)


def test_a_foreign_host_header_is_refused_on_loopback(studios):
    a, _ = studios
    assert requests.get(a.url, headers={"Host": "attacker.example"}).status_code == 421
    assert requests.get(a.url + "gradio_api/info", headers={"Host": "attacker.example:7860"}).status_code == 421
    assert requests.get(a.url, headers={"Host": f"localhost:{a.port}"}).status_code == 200
    # a page elsewhere posting from a visitor's browser (the Host is right, the Origin is not)
    r = requests.post(a.url + "gradio_api/upload", headers={"Origin": "http://attacker.example"},
                      files={"files": ("x.png", b"\x89PNG", "image/png")})
    assert r.status_code == 403


def test_a_studio_serves_its_own_images_and_nothing_else(studios):
    a, b = studios
    alice, bob = b.client(), b.client()  # two browser sessions of one studio (each its own cookie)
    out = generate(alice, seed=5)
    url = out[3][0]["image"]["url"]  # the result as the page shows it (a copy in b's temp folder)
    own = requests.get(url, cookies=alice.cookies)
    assert own.status_code == 200 and own.headers["content-type"] == "image/png"
    assert own.headers["x-content-type-options"] == "nosniff"
    assert requests.get(url, cookies=bob.cookies).status_code == 403  # another session that knows the path
    assert requests.get(url).status_code == 403  # no session at all
    assert requests.get(url.replace(b.url, a.url), cookies=alice.cookies).status_code == 403  # another instance
    # nor can bob have alice's result sent back to him by naming it as a job's input (a re-roll of it)
    config = requests.get(b.url + "config", cookies=bob.cookies).json()
    reroll = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "reroll")
    path = out[3][0]["image"]["path"]
    join = dict(data=[None, {"path": path, "meta": {"_type": "gradio.FileData"}}], fn_index=reroll,
                session_hash="bobsession", event_data=None, trigger_id=None)
    r = requests.post(b.url + "gradio_api/queue/join", json=join, cookies=bob.cookies)
    assert r.status_code == 403 and "not yours" in r.text
    saved = next(b.outputs.rglob("*.png"))
    html = b.outputs / "page.html"
    html.write_text("<script>alert(1)</script>")
    for path in (html, saved, Path("/etc/passwd")):  # the outputs folder is not served as such
        assert requests.get(f"{b.url}gradio_api/file={path}").status_code == 403, path
    assert requests.get(f"{b.url}gradio_api/file=http://example.com/x.png").status_code == 403


def test_a_failed_save_keeps_the_image_and_says_why_without_a_path(studios):
    a, _ = studios
    first = generate(a.client(), seed=6)
    c = a.client()  # a new session: its history holds no file of the folder moved below
    kept = {p: p.read_bytes() for p in a.outputs.rglob("*.png")}
    day = a.outputs / time.strftime("%Y-%m-%d")
    moved = a.outputs / "day-moved"
    day.rename(moved)
    day.write_text("a file where the day's folder should be")  # the worker's save fails, the folder check passes
    try:
        out = c.predict(api_name="/generate", seed=7)
    finally:
        day.unlink()
        moved.rename(day)
    status = out[1]
    assert "could not be saved" in status and "download them now" in status, status
    assert str(a.outputs) not in status and "/" not in status.split("saved (")[1], status
    shown = Path(out[3][0]["image"]["path"])
    assert shown.exists() and Image.open(shown).size == (64, 64)  # the image is still there, in the page
    assert not list(a.outputs.rglob("*.part")) and not list(a.outputs.rglob(".*.part"))
    assert {p: p.read_bytes() for p in a.outputs.rglob("*.png")} == kept  # earlier outputs intact
    assert first[1].startswith("✓")
    params = json.loads(Image.open(next(iter(kept))).text["parameters"])
    assert not os.path.isabs(params["model_source"]) and "/" not in params["model_source"], params
    generate(c, seed=8)


def test_a_stopped_studio_leaves_no_temp_folder(studios):
    _, b = studios
    out = generate(b.client(), seed=9)
    shown = Path(out[3][0]["image"]["path"])
    temp = next(p for p in shown.parents if p.name.startswith("var-studio-"))
    assert temp.is_dir()
    b.stop()  # SIGTERM, as a service manager stops it
    assert b.proc.returncode == 0, b.text()
    assert not temp.exists()


# ---------------------------------------------------------------------------------------------
# start-up refusals (no workers are started)


def test_start_up_refuses_an_unusable_outputs_folder_and_an_open_host_without_login(tmp_path, capsys):
    import app

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert app.main(["--outputs", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "results cannot be saved" in err and "--outputs" in err and "Traceback" not in err, err
    assert app.main(["--host", "0.0.0.0", "--outputs", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--auth" in err and "--insecure-no-auth" in err, err
    assert app.main(["--max-outpaint-windows", "500", "--outputs", str(tmp_path / "o")]) == 2
    assert "at most 64" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the pieces


def test_the_header_check_reads_sizes_and_refuses_non_images(tmp_path):
    huge = huge_png(tmp_path / "huge.png", 10_000, 10_000)
    assert image_header(huge, "image") == (10_000, 10_000, "PNG")
    with pytest.raises(UserError, match="limit is 16 megapixels"):
        Limits().check_upload(huge, "image")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    with pytest.raises(UserError, match="GIF file: upload a PNG, JPEG or WebP"):
        image_header(gif.getvalue(), "mask")
    with pytest.raises(UserError, match="could not be read as an image"):
        image_header(b"<html></html>", "mask")


def test_window_count_is_the_pipelines_own(tiny_bundle):
    from studio.pipeline import VARPipeline

    pipe = VARPipeline.from_pretrained(str(tiny_bundle), device="cpu")  # 64 px: cheap windows
    image = Image.new("RGB", (32, 24), "teal")
    for sides in (dict(right=20), dict(left=12, top=6)):  # 2 and 3 windows
        seen = []
        pipe.outpaint(image, **sides, on_window=lambda n, canvas: seen.append(n), top_k=1)
        full = {**dict(left=0, right=0, top=0, bottom=0), **sides}
        assert count_windows(32, 24, **full) == len(seen), sides
    assert count_windows(64, 48, 512, 512, 512, 512, limit=32) == 33  # "more than 32", at once


def test_job_cost_is_refused_naming_the_limit():
    from studio import params as P

    limits = Limits(max_job_megapixels=8)
    with pytest.raises(UserError, match=r"limit is 8 megapixels per job .*--max-job-megapixels.*num_images"):
        limits.check_job("inpaint", P.parse("inpaint", {"num_images": 4}), {"image": (2000, 1500)})
    limits.check_job("inpaint", P.parse("inpaint", {"num_images": 2}), {"image": (2000, 1500)})
    with pytest.raises(UserError, match="out-painted image would be"):
        Limits().check_job("outpaint", P.parse("outpaint", {"right": 512}), {"image": (15000, 4300)})


def test_heavy_jobs_take_turns():
    limits = Limits(max_heavy_jobs=1)
    with limits.heavy(10e6) as heavy:
        assert heavy
        with pytest.raises(UserError, match="busy with 1 large pictures .*--max-heavy-jobs"):
            with limits.heavy(10e6, wait=0.1):
                pass
        with limits.heavy(1e6) as light:  # small jobs never wait
            assert not light
    with limits.heavy(10e6):
        pass


def test_16_bit_masks_keep_their_depth():
    from studio import images as im
    from studio.serve.inputs import layer_mask

    a = np.full((8, 8), 300, np.uint16)  # near-black in 16 bits
    a[:, 4:] = 60000  # white
    mask = Image.fromarray(a)
    assert mask.mode.startswith("I;16")
    want = np.zeros((8, 8), bool)
    want[:, 4:] = True
    assert (layer_mask(mask) == want).all()
    assert ((im.mask_to_array(mask, (8, 8)) > 0.5) == want).all()
    assert ((mask_levels(mask) > 0.5) == want).all()


def test_a_painted_layer_is_fitted_without_stretching_or_refused():
    import gradio as gr

    from studio.serve.inputs import editor_mask

    layer = Image.new("RGBA", (65, 49), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (60, 0, 65, 10))  # a stroke at the right edge
    mask = np.asarray(editor_mask({"layers": [layer]}, None, (64, 48), False)) > 0
    assert mask[:10, 60:].all() and not mask[:, :60].any() and not mask[10:].any()  # in place, not moved
    with pytest.raises(gr.Error, match="painted layer is 128x96 but the image is 64x48"):
        editor_mask({"layers": [Image.new("RGBA", (128, 96), (255, 0, 0, 255))]}, None, (64, 48), False)


def test_saves_never_overwrite_and_leave_nothing_partial(tmp_path):
    first = save_png(tmp_path, "same", b"one")
    second = save_png(tmp_path, "same", b"two")
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SaveError, match="the outputs path is a file") as e:
        save_png(blocker / "day", "x", b"data")
    assert str(tmp_path) not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "same-2.png", "same.png"]
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path, min_free=2 ** 62).startswith("the disk is full")


def test_a_bundle_whose_config_does_not_match_its_weights_is_refused_before_allocating(tiny_bundle, tmp_path):
    from studio.checkpoints import CheckpointError, load_bundle

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["var"]["patch_nums"] = cfg["vae"]["patch_nums"] = list(range(1, 200))
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"pos_1LC would be \(1, 2646700, 64\).*hold \(1, 130, 64\)"):
        load_bundle(bad)


def test_malformed_studio_pngs_are_user_errors():
    from studio.serve.runner import studio_png

    for text in ("[" * 100_000, "[1, 2]"):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
        with pytest.raises(UserError, match="re-roll holds"):
            studio_png(buf.getvalue())


def test_an_editors_upload_button_is_checked_against_the_limits_before_it_is_decoded(tmp_path):
    """The editors' own upload button (issue 15) goes through the same header check as every other
    upload: over the server's pixel limit it is refused with the limit's message and the editor is left
    as it was; within it, a picture above the working size arrives downscaled, with a line that says so."""
    import gradio as gr
    from studio.serve.ui import _uploaded
    big = tmp_path / "wide.png"
    Image.new("RGB", (3000, 1000), (10, 20, 30)).save(big)
    value, note = _uploaded(Limits(max_upload_megapixels=1), str(big))
    assert value == gr.skip()  # the editor keeps what it had
    assert "--max-upload-megapixels" in note and "3000x1000" in note
    value, note = _uploaded(Limits(), str(big))
    assert value["background"].size == (2048, 683)
    assert "downscaled to 2048×683" in note
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    value, note = _uploaded(Limits(), str(fake))
    assert value == gr.skip() and "could not be read as an image" in note


def test_the_session_cookie_lives_as_long_as_the_files_it_reads(tmp_path):
    """Not until the browser closes: Max-Age is the temp files' lifetime (the page's delete_cache), set
    on the first answer and renewed on a page load or a job, never on the other requests."""
    from http.cookies import SimpleCookie

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from studio.serve import security

    def ok(request):
        return PlainTextResponse("ok")

    app = security.FileGuard(Starlette(routes=[Route("/", ok), Route("/gradio_api/info", ok),
                                               Route("/gradio_api/queue/join", ok, methods=["POST"])]),
                             roots=[tmp_path])
    browser = TestClient(app)

    def cookie(response):
        jar = SimpleCookie(response.headers.get("set-cookie", ""))
        return jar.get(security.SESSION_COOKIE)

    first = cookie(browser.get("/"))
    assert first is not None and first["max-age"] == str(security.FILE_LIFETIME_S) == "86400"
    assert first["httponly"] and first["samesite"] == "Lax"
    assert cookie(browser.get("/gradio_api/info")) is None  # other requests leave it as it is
    for again in (browser.get("/"), browser.post("/gradio_api/queue/join", json={"data": []})):
        renewed = cookie(again)
        assert renewed is not None and renewed.value == first.value, again.headers
        assert renewed["max-age"] == "86400"


def test_the_file_guard_forgets_files_gone_or_expired_and_keeps_serving_the_live_ones(tmp_path):
    """A long-running studio: the owner map holds about the live temp files, not every file it ever named.
    Files removed (a closed tab's uploads, Gradio's clean-up) leave it at the next sweep, and an entry nothing
    named for the files' lifetime expires; so the memory backstop (`limit`) does not push out a file that
    is still there and still its session's (with the cap alone, 27 files named past a limit of 20 did)."""
    from studio.serve.security import FileOwners

    now = [0.0]
    owners = FileOwners([tmp_path], limit=20, max_age=100.0, sweep_every=30.0, clock=lambda: now[0])

    def made(name):
        path = tmp_path / name
        path.write_bytes(b"picture")
        return str(path)

    kept = made("kept.png")
    owners.add(kept, {"s:a"})
    for i in range(15):  # named to the session, then removed
        now[0] += 1
        gone = made(f"gone{i}.png")
        owners.add(gone, {"s:a"})
        os.remove(gone)
    assert len(owners) == 16
    now[0] = 31.0
    late = made("late.png")
    owners.add(late, {"s:b"})  # the first add past sweep_every starts a sweep (a thread: the server answers on)
    owners.sweeper.join(30)
    assert len(owners) == 2
    for i in range(10):
        owners.add(made(f"new{i}.png"), {"s:a"})
    assert owners.may_read(kept, {"s:a"}) and not owners.may_read(kept, {"s:b"}) and owners.may_read(late, {"s:b"})
    assert not owners.may_read(str(tmp_path / "gone3.png"), {"s:a"})

    now[0] = 101.0 + 0.5  # kept was last named more than max_age ago: refused, and dropped at the next add
    assert not owners.may_read(kept, {"s:a"}) and owners.may_read(late, {"s:b"})
    owners.add(late, {"s:b"})  # named again (a later answer shows it): fresh
    owners.sweeper.join(30)
    assert len(owners) == 11
    now[0] = 140.0  # the ten named at 31 expire; late, named again at 101.5, stays
    owners.add(made("newest.png"), {"s:a"})
    assert len(owners) == 2 and owners.may_read(late, {"s:b"})
