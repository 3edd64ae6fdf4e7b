"""The History panel's listing (studio.serve.history): the outputs folder, newest first, a page at a time,
parameters read from each file's header."""
import os

import numpy as np
from PIL import Image

from studio.pngmeta import encode_png, read_parameters_chunk
from studio.serve import history
from test_worker import tiny_bundle  # noqa: F401 (the fixture)


def _save(path, params, mtime, tokens=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    toks = [np.arange(n * n) for n in (1, 2, 3)] if tokens else None
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), "red"), params, toks, {"edit": {"cells": [1, 2]}}))
    os.utime(path, ns=(mtime, mtime))


def test_newest_first_batches_in_order_paged_with_parameters(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    day1, day2 = out / "2026-11-30", out / "2026-12-01"
    s = 10 ** 9
    _save(day1 / "235959_generate_s1_aaaaaa_0.png", {"task": "generate", "seed": 1}, 100 * s)
    for i in range(3):  # a batch, saved in a burst: 0, 1, 2
        _save(day2 / f"000001_generate_s{5 + i}_bbbbbb_{i}.png", {"task": "generate", "seed": 5 + i}, 200 * s + i)
    _save(day2 / "000005_inpaint_s9_cccccc_0.png", {"task": "inpaint", "seed": 9, "class_name": "lake"}, 300 * s)
    Image.new("RGB", (4, 4)).save(out / "foreign.png")  # a picture the studio did not make: listed, no parameters
    os.utime(out / "foreign.png", ns=(50 * s, 50 * s))
    (day2 / ".000006_generate_s3_dddddd_0.ab12.part").write_bytes(b"half")  # a save in progress
    (out / "notes.txt").write_text("not a picture")

    names = [os.path.basename(p) for p in history.listing(out)]
    assert names == ["000005_inpaint_s9_cccccc_0.png", "000001_generate_s5_bbbbbb_0.png",
                     "000001_generate_s6_bbbbbb_1.png", "000001_generate_s7_bbbbbb_2.png",
                     "235959_generate_s1_aaaaaa_0.png", "foreign.png"]

    monkeypatch.setattr(history, "PAGE_SIZE", 4)
    first = history.history_page(out, 0, size=4)
    assert (first.index, first.pages, first.total) == (0, 2, 6)
    assert [p["seed"] for _, p in first.items] == [9, 5, 6, 7]
    assert first.label.startswith("Newest first · 1–4 of 6 saved results · page 1 of 2")
    assert history.caption(first.items[0][1], first.items[0][0]).startswith("inpaint · seed 9 · lake · ")
    last = history.history_page(out, 7, size=4)  # past the end: the last page
    assert (last.index, [os.path.basename(p) for p, _ in last.items]) == (1, ["235959_generate_s1_aaaaaa_0.png",
                                                                              "foreign.png"])
    assert last.items[1][1] is None and history.caption(None, last.items[1][0]).startswith("foreign.png · ")
    assert history.history_page(tmp_path / "empty", 0).label == "No results saved yet."


def test_parameters_come_from_the_header_alone(tmp_path):
    path = tmp_path / "a.png"
    _save(path, {"task": "generate", "seed": 3, "class_name": "fjord é"}, 10 ** 9)
    assert read_parameters_chunk(path) == {"task": "generate", "seed": 3, "class_name": "fjord é"}
    data = path.read_bytes()
    cut = data.index(b"IDAT") - 4
    (tmp_path / "head.png").write_bytes(data[:cut])  # the header is enough: no pixel data needed
    assert read_parameters_chunk(tmp_path / "head.png")["seed"] == 3
    (tmp_path / "text.png").write_bytes(b"not a png at all")
    other = tmp_path / "other.png"  # another program's plain-text parameters (not JSON)
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo, Steps: 20")
    Image.new("RGB", (4, 4)).save(other, pnginfo=info)
    for p in (tmp_path / "text.png", other, tmp_path / "missing.png"):
        assert read_parameters_chunk(p) is None


def test_a_users_history_holds_their_results_alone(tmp_path):
    out = tmp_path / "outputs"
    s = 10 ** 9
    a1, a2, b1 = (out / "2026-12-01" / f"00000{i}_generate_s{i}_j{i}xxxx_0.png" for i in (1, 2, 3))
    for i, p in enumerate((a1, a2, b1)):
        _save(p, {"task": "generate", "seed": i}, (i + 1) * s)
    history.record_owner(out, "alice", [a1, a2, tmp_path / "elsewhere.png"])  # (a path outside: not noted)
    history.record_owner(out, "bob ✓", [b1])
    assert [os.path.basename(p) for p in history.listing(out, "alice")] == [a2.name, a1.name]
    assert [os.path.basename(p) for p in history.listing(out, "bob ✓")] == [b1.name]
    assert history.listing(out, "carol") == []
    assert history.history_page(out, 0, user="carol").label == "No results saved yet."
    assert len(history.listing(out)) == 3  # no user (no --auth): every result, as before
    assert not any(".owners" in p for p in history.listing(out))  # the lists themselves are never listed


def test_under_auth_each_user_sees_only_their_own_results(tiny_bundle, tmp_path):  # noqa: F811
    """Issue 15: with --auth every user saw everyone's results in History. Two users sign in and generate;
    each run's History (and the page loaded afresh) shows that user's results alone."""
    from gradio_client import Client

    from test_app import free_port
    import app as app_module
    from studio.serve import ui

    args = app_module.parse_args(["--model", str(tiny_bundle), "--device", "cpu", "--outputs", str(tmp_path / "out"),
                                  "--threads", "1", "--preview", "none"])
    pool = app_module.create_pool(args).start(wait=False)
    try:
        pool.wait_ready()
        studio = ui.Studio(pool)
        demo = ui.build_ui(studio)
        _, url, _ = ui.launch(demo, studio, port=free_port(), prevent_thread_lock=True, quiet=True,
                              auth=[("alice", "a-secret"), ("bob", "b-secret")])
        try:
            seen = {}
            for user, pw, seed in (("alice", "a-secret", 1), ("bob", "b-secret", 2), ("alice", "a-secret", 3)):
                c = Client(url, auth=(user, pw), verbose=False, download_files=False)
                out = c.predict(api_name="/generate", seed=seed)
                assert out[1].startswith("✓ Done"), out[1]
                seen[user] = [params["seed"] for params in
                              (read_parameters_chunk(item["image"]["path"]) for item in out[5])]
            assert seen == {"alice": [3, 1], "bob": [2]}, seen  # newest first, each their own
            assert len(history.listing(tmp_path / "out")) == 3  # all three are in the folder

            # a result saved by the command line is no one's, listed for nobody, until bob claims it
            _save(tmp_path / "out" / "2026-11-30" / "120000_generate_s9_cli00000_0.png", {"task": "generate", "seed": 9},
                  10 ** 9)
            bob = Client(url, auth=("bob", "b-secret"), verbose=False, download_files=False)
            out = bob.predict(api_name="/generate", seed=5)
            assert [read_parameters_chunk(item["image"]["path"])["seed"] for item in out[5]] == [5, 2]
            assert history.main(["--outputs", str(tmp_path / "out"), "--claim", "bob"]) == 0
            out = bob.predict(api_name="/generate", seed=6)
            assert [read_parameters_chunk(item["image"]["path"])["seed"] for item in out[5]] == [6, 5, 2, 9]
            alice = Client(url, auth=("alice", "a-secret"), verbose=False, download_files=False)
            out = alice.predict(api_name="/generate", seed=7)
            assert [read_parameters_chunk(item["image"]["path"])["seed"] for item in out[5]] == [7, 3, 1]
        finally:
            demo.close()
    finally:
        pool.close()


def test_results_of_no_one_are_claimed_by_one_user_and_never_anothers(tmp_path, capsys):
    """Issue 15: under --auth, results saved before per-user History (or by `python -m studio`) were listed for
    nobody. `python -m studio.serve.history --unowned` lists them and `--claim USER` makes them USER's; a
    result in someone's list stays theirs alone, and one saved in the last minutes is left (a running studio
    may be about to note its owner)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "outputs"
    s = 10 ** 9
    old1, old2, alices, fresh = (out / "2026-11-30" / f"00000{i}_generate_s{i}_k{i}xxxx_0.png" for i in (1, 2, 3, 4))
    for i, p in enumerate((old1, old2, alices)):
        _save(p, {"task": "generate", "seed": i}, (i + 1) * s)
    _save(fresh, {"task": "generate", "seed": 4}, time.time_ns())
    history.record_owner(out, "alice", [alices])
    assert history.listing(out, "bob") == []

    cli = [sys.executable, "-m", "studio.serve.history", "--outputs", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = subprocess.run(cli + ["--unowned"], cwd=root, capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [os.path.relpath(p, out) for p in (fresh, old2, old1)], listed
    assert "3 result(s) belong to no one" in listed.stderr

    claimed = subprocess.run(cli + ["--claim", "bob"], cwd=root, capture_output=True, text=True, check=True)
    assert "2 result(s) that belonged to no one are now bob's" in claimed.stdout, claimed.stdout
    assert "1 saved in the last 600 s left" in claimed.stdout
    assert [os.path.basename(p) for p in history.listing(out, "bob")] == [old2.name, old1.name]
    assert [os.path.basename(p) for p in history.listing(out, "alice")] == [alices.name]  # hers alone still

    # carol claims what is left (with the studio stopped: --min-age 0): the fresh one, nothing of bob's or alice's
    assert history.main(["--outputs", str(out), "--claim", "carol", "--min-age", "0"]) == 0
    assert [os.path.basename(p) for p in history.listing(out, "carol")] == [fresh.name]
    assert history.unowned(out) == []
    assert history.main(["--outputs", str(out), "--claim", "dave"]) == 0
    assert history.listing(out, "dave") == []
    assert "0 result(s)" in capsys.readouterr().out
    assert history.main(["--outputs", str(tmp_path / "nowhere"), "--unowned"]) == 2
    assert "there is no outputs folder" in capsys.readouterr().err


def test_full_size_copies_are_not_listed_but_found_beside_their_result(tmp_path):
    """Issue 15: an edit of a huge upload saves `<result>_full.png` (thousands of pixels wide) beside its
    working-size result. History lists the result alone (no thumbnail of the huge one); the full copy is
    found from the result's name (what the page holds is Gradio's copy, same name), a user's own alone."""
    out = tmp_path / "outputs"
    s = 10 ** 9
    result = out / "2026-12-01" / "101010_inpaint_s5_abcd1234_0.png"
    plain = out / "2026-12-01" / "101000_generate_s4_dcba4321_0.png"
    full = result.with_name(result.stem + "_full.png")
    _save(plain, {"task": "generate"}, 1 * s)
    _save(result, {"task": "inpaint"}, 2 * s)
    _save(full, {"task": "inpaint"}, 2 * s, tokens=False)
    assert [os.path.basename(p) for p in history.listing(out)] == [result.name, plain.name]
    assert history.history_page(out).total == 2
    assert history.full_copy(out, "/tmp/gradio/0123abcd/" + result.name) == str(full)
    assert history.full_copy(out, plain.name) is None  # no full copy: none offered
    assert history.full_copy(out, full.name) is None  # the full copy has none itself
    assert history.full_copy(out, "photo.png") is None  # not a studio result's name
    # under --auth: only the owner is offered it; a claim takes the full copy with its result
    history.record_owner(out, "alice", [plain])
    assert history.full_copy(out, result.name, "alice") is None
    claimed, _ = history.claim(out, "bob", 0)
    assert sorted(os.path.basename(p) for p in claimed) == sorted([result.name, full.name])
    assert history.full_copy(out, result.name, "bob") == str(full)
    assert history.full_copy(out, result.name, "alice") is None
