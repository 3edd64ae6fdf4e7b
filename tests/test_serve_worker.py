"""The worker's side of serving many users (issue 17): it holds every job to the server's limits
whoever submitted it, it forgets finished jobs, and it batches variations and re-rolls with plain
generations, each image exactly the one the job makes alone. Real worker processes on the tiny
random model of test_worker.py."""
import gc
import io
import time
import weakref

import numpy as np
import pytest
from PIL import Image

from studio.serve.limits import Limits
from studio.serve.pool import ModelSpec, WorkerPool
from tests.test_worker import tiny_bundle  # noqa: F401 (a fixture)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# small limits, so that small pictures cross them: 10,000 pixels an upload, 0.02 megapixels a job, 2 windows
LIMITS = Limits(max_upload_megapixels=0.01, max_job_megapixels=0.02, max_outpaint_windows=2)


@pytest.fixture(scope="module")
def pool(tiny_bundle, tmp_path_factory):  # noqa: F811
    with WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu"], outputs=tmp_path_factory.mktemp("out"),
                    scale_delay=0.05, torch_threads=1, limits=LIMITS) as p:
        yield p


def run(pool, kind, params, session=""):
    job = pool.submit(kind, params, session=session)
    assert job.wait(60)
    return job


def test_the_worker_refuses_jobs_over_the_servers_limits_by_name(pool):
    """A program that reaches the pool directly (not through the page's checks) meets the same limits,
    from the same flags, and the worker serves on."""
    small, wide = png(Image.new("RGB", (64, 64), "teal")), png(Image.new("RGB", (128, 100), "teal"))
    mask = png(Image.new("L", (64, 64), 255))
    cases = [
        ("inpaint", dict(image=wide, mask=png(Image.new("L", (128, 100), 255))), "--max-upload-megapixels"),
        ("guide", dict(image=wide), "--max-upload-megapixels"),
        ("inpaint", dict(image=small, mask=mask, num_images=8), "--max-job-megapixels"),  # 8 x 4096 pixels
        ("outpaint", dict(image=small, left=64, right=64), "--max-outpaint-windows"),  # needs 4 windows
    ]
    for kind, params, flag in cases:
        job = run(pool, kind, params)
        assert job.status == "failed" and flag in job.error, (kind, job.error)
    assert "128x100 pixels" in run(pool, "guide", dict(image=wide)).error  # the picture's size and the limit
    pid = pool.worker_pids()[0]
    ok = run(pool, "inpaint", dict(image=small, mask=mask, num_images=4, seed=1))  # 0.016 megapixels: fits
    assert ok.status == "done", ok.error
    assert run(pool, "outpaint", dict(image=small, left=32, seed=1)).status == "done"
    assert pool.worker_pids()[0] == pid  # refusals are answers, not crashes


def test_a_big_out_painting_gives_its_memory_back_and_small_jobs_skip_it(pool):
    small = png(Image.new("RGB", (64, 64), "teal"))
    big = run(pool, "outpaint", dict(image=small, left=32, right=32, seed=2))  # two windows: a big job
    assert big.status == "done", big.error
    assert big.result.timings.get("released_memory") is True
    plain = run(pool, "generate", dict(seed=3))
    assert plain.status == "done" and "released_memory" not in plain.result.timings


def test_the_pool_keeps_no_record_of_finished_jobs(pool):
    """A long-running server's memory must not grow with the jobs it has served: once a job has
    ended and its consumer lets it go, nothing in the pool holds it (queues, slots, batches)."""
    jobs = [pool.submit("generate", dict(seed=s, num_images=1), session=f"user{s % 3}") for s in range(12)]
    gone = pool.submit("generate", dict(seed=99), session="user0")
    gone.cancel()  # stopped while queued
    assert all(j.wait(60) for j in jobs) and all(j.status == "done" for j in jobs)
    refs = [weakref.ref(j) for j in jobs + [gone]]
    del jobs, gone
    for _ in range(200):  # the slot's thread lets go of its last batch once it has read the last answer
        gc.collect()
        if all(r() is None for r in refs):
            break
        time.sleep(0.05)
    assert [r() for r in refs] == [None] * len(refs)
    assert pool.queue_length == 0 and not pool._queues and not pool._order
    assert all(not s.jobs for s in pool._slots)


def test_variations_and_re_rolls_batch_with_generations_each_as_it_is_alone(pool):
    source = run(pool, "generate", dict(seed=5, class_name="class 3"))
    picture = png(Image.fromarray(pixels(source.result.images[0])))
    edited = run(pool, "inpaint", dict(image=picture, mask=png(Image.new("L", (64, 64), 255)), seed=6))
    assert source.status == edited.status == "done", (source.error, edited.error)
    asks = [("guide", dict(image=picture, keep_scales=3, seed=21)),  # no class: unguided
            ("guide", dict(image=picture, keep_scales=2, seed=22, class_name="class 2", num_images=2)),
            ("reroll", dict(source_png=source.result.images[0], keep_scales=3, seed=23)),
            ("reroll", dict(source_png=source.result.images[0], keep_scales=0, seed=24, guidance_scale=1.5, top_k=7)),
            ("generate", dict(seed=25, top_p=0.6)),
            ("reroll", dict(source_png=edited.result.images[0], keep_scales=2, seed=26))]  # an edit's: alone
    blocker = pool.submit("generate", dict(seed=100), session="blocker")
    for view in blocker.updates(poll=0.05):  # it runs: what comes next waits and batches
        if view.status != "queued":
            break
    jobs = [pool.submit(kind, a, session=f"user{i}") for i, (kind, a) in enumerate(asks)]
    assert blocker.wait(60) and all(j.wait(60) for j in jobs)
    assert all(j.status == "done" for j in jobs), [j.error for j in jobs]
    batched = sum(a.get("num_images", 1) for _, a in asks[:-1])
    assert [j.result.timings["batch_images"] for j in jobs] == [batched] * 5 + [1]
    for (kind, a), together in zip(asks, jobs):
        single = run(pool, kind, a)  # the same ask by itself: a batch of one
        assert single.status == "done" and single.result.timings["batch_images"] == a.get("num_images", 1)
        assert len(together.result.images) == len(single.result.images) == a.get("num_images", 1)
        for x, y in zip(together.result.images, single.result.images):
            assert np.array_equal(pixels(x), pixels(y)), (kind, a)
        for tx, ty in zip(together.result.tokens, single.result.tokens):
            assert all(np.array_equal(u, v) for u, v in zip(tx, ty)), (kind, a)
        assert together.result.params[0]["seed"] == a["seed"]
        assert together.result.params[0].get("keep_scales") == single.result.params[0].get("keep_scales")
    # a batched re-roll keeps the source's first scales
    assert all(np.array_equal(u, v) for u, v in zip(jobs[2].result.tokens[0][:3], source.result.tokens[0][:3]))
