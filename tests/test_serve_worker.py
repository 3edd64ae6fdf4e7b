"""The worker's side of serving many users (issue 17): it holds every job to the server's limits
whoever submitted it, it forgets finished jobs, and it batches variations and re-rolls with plain
generations, each image exactly the one the job makes alone. Real worker processes on the tiny
random model of test_worker.py."""
import gc
import io
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
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert pool.queue_length == 0 and not pool._queues and not pool._order
    assert all(not s.jobs for s in pool._slots)
