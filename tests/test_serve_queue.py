"""Serving many users: batched generations, the fair queue, and the watchdogs (real worker processes
on the tiny random model of test_worker.py; small limits keep them fast)."""
import io
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from studio.serve.pool import ModelSpec, QueueFull, WorkerPool
from studio.serve.runner import ThreadPolicy, busy_cores, jpeg
from tests.test_worker import TINY_PATCH_NUMS, tiny_bundle  # noqa: F401 (a fixture)

SCALES = len(TINY_PATCH_NUMS)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def first_preview(job, timeout=60):
    deadline = time.monotonic() + timeout
    for view in job.updates(poll=0.1):
        if view.latest is not None or view.finished or time.monotonic() > deadline:
            return view


@pytest.fixture(scope="module")
def batching_pool(tiny_bundle, tmp_path_factory):  # noqa: F811
    with WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu"], outputs=tmp_path_factory.mktemp("out"),
                    scale_delay=0.05, torch_threads=1, max_batch_images=16) as p:
        yield p


def _blocked(pool, seed=100):
    """A running job, so that the next submissions wait and batch together."""
    blocker = pool.submit("generate", {"seed": seed, "class_name": "class 0"}, session="blocker")
    first_preview(blocker)
    return blocker


def test_waiting_generations_run_as_one_batch_each_with_the_images_it_gets_alone(batching_pool):
    pool = batching_pool
    asks = [dict(seed=11, class_name="class 1", num_images=2), dict(seed=12, guidance_scale=0.0, top_k=0, top_p=0.0),
            dict(seed=13, class_name="class 7", guidance_scale=2.5, top_k=5, top_p=0.5), dict(seed=14)]
    blocker = _blocked(pool)
    jobs = [pool.submit("generate", a, session=f"user{i}") for i, a in enumerate(asks)]
    assert blocker.wait(60) and all(j.wait(60) for j in jobs)
    assert all(j.status == "done" for j in jobs), [j.error for j in jobs]
    assert {j.result.timings["batch_images"] for j in jobs} == {5}  # one batch of all five images
    alone = []
    for a in asks:  # the same asks one at a time: batches of one
        j = pool.submit("generate", a)
        assert j.wait(60) and j.status == "done", j.error
        assert j.result.timings["batch_images"] == a.get("num_images", 1)
        alone.append(j)
    for a, batched, single in zip(asks, jobs, alone):
        assert len(batched.result.images) == a.get("num_images", 1)
        for x, y in zip(batched.result.images, single.result.images):
            assert np.array_equal(pixels(x), pixels(y)), a
        for tx, ty in zip(batched.result.tokens, single.result.tokens):
            assert all(np.array_equal(u, v) for u, v in zip(tx, ty))
        assert batched.result.params[0]["seed"] == a["seed"]
        # each user's own stream: every scale, and the last preview is their own images, not the batch's
        assert [u.scale_index for u in batched.scales] == list(range(SCALES))
        assert all(u.job_id == batched.id for u in batched.scales)
        own = [pixels(p) for p in batched.result.images]
        if len(own) == 1:
            assert batched.scales[-1].preview == jpeg(Image.fromarray(own[0]))


def test_a_stop_in_a_batch_ends_that_job_only(batching_pool):
    pool = batching_pool
    blocker = _blocked(pool, seed=101)
    a, b, c = (pool.submit("generate", {"seed": s}, session=f"s{s}") for s in (21, 22, 23))
    assert blocker.wait(60)
    view = first_preview(b)
    assert view.status == "running"
    b.cancel()
    assert a.wait(60) and b.wait(60) and c.wait(60)
    assert b.status == "cancelled" and "stopped at scale" in b.error and len(b.scales) < SCALES
    assert a.status == c.status == "done" and a.result.timings["batch_images"] == 3
    assert len(a.scales) == len(c.scales) == SCALES


def test_more_smooth_jobs_run_alone(batching_pool):
    pool = batching_pool
    blocker = _blocked(pool, seed=102)
    smooth = pool.submit("generate", {"seed": 31, "more_smooth": True}, session="a")
    plain = [pool.submit("generate", {"seed": s}, session=f"b{s}") for s in (32, 33)]
    assert blocker.wait(60) and smooth.wait(60) and all(j.wait(60) for j in plain)
    assert smooth.status == "done" and smooth.result.timings["batch_images"] == 1
    assert [j.result.timings["batch_images"] for j in plain] == [2, 2]


# -- the fair queue (no worker needed: a pool that was never started keeps its queue) -------------


def test_sessions_take_turns_and_each_may_queue_only_so_many(tiny_bundle):  # noqa: F811
    pool = WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu"], max_queued_per_session=3,
                      batching=False)
    greedy = [pool.submit("generate", {"seed": i}, session="greedy") for i in range(3)]
    with pytest.raises(QueueFull, match="at most 3"):
        pool.submit("generate", {"seed": 9}, session="greedy")
    late = pool.submit("generate", {"seed": 10}, session="late")
    assert [j.position for j in greedy] == [1, 3, 4] and late.position == 2  # not behind all of greedy's
    assert late.view().wait_estimate is None  # nothing has run yet: no estimate
    pool._ran(12.0, 2)  # a worker made two jobs in 12 s
    assert late.view().wait_estimate == pytest.approx(12.0)
    order = []
    with pool._lock:
        while pool._order:
            order.append(pool._take_batch(pool._slots[0])[0])
    assert order == [greedy[0], late, greedy[1], greedy[2]]
    greedy[0].cancel()  # a cancelled queued job frees its place in the session's limit
    pool.close()


def test_thread_policy_leaves_busy_cores_alone():
    policy = ThreadPolicy(None, cpu_workers=1)
    assert policy.choose(cores=2, busy=0.1) == 2
    assert policy.choose(cores=2, busy=1.0) == 1  # another busy process: one thread, not two fighting
    assert policy.choose(cores=2, busy=2.0) == 1
    assert policy.choose(cores=16, busy=2.0) == 14
    assert ThreadPolicy(None, cpu_workers=2).choose(cores=16, busy=0.0) == 8
    assert ThreadPolicy(3).choose(cores=16, busy=9.0) == 3  # --threads wins
    assert 0.0 <= busy_cores(0.02) <= (os.cpu_count() or 1) + 0.01


# -- the watchdogs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def watched(tiny_bundle, tmp_path_factory):  # noqa: F811
    with WorkerPool([ModelSpec("tiny", str(tiny_bundle))], devices=["cpu"], outputs=tmp_path_factory.mktemp("out"),
                    scale_delay=0.3, torch_threads=1, batching=False, heartbeat_timeout=1.5, stop_timeout=60,
                    job_timeout=60) as p:
        yield p


def _replaced(pool, old_pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pool.worker_pids()[0] in (None, old_pid):
        time.sleep(0.05)
    return pool.worker_pids()[0] not in (None, old_pid)


def test_a_hung_worker_is_killed_its_job_fails_and_the_queue_goes_on(watched):
    victim = watched.submit("generate", {"seed": 1})
    assert first_preview(victim).status == "running"
    waiting = watched.submit("generate", {"seed": 2})
    old = watched.worker_pids()[0]
    os.kill(old, signal.SIGSTOP)
    try:
        assert victim.wait(30) and victim.status == "failed"
        assert "stopped answering" in victim.error and "restarted" in victim.error
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert waiting.wait(90) and waiting.status == "done", waiting.error
    assert _replaced(watched, old)


def test_a_job_over_the_time_limit_is_stopped_and_the_worker_restarted(watched):
    old = watched.worker_pids()[0]
    watched.job_timeout = 0.6  # six scales at 0.3 s each cannot make it
    try:
        victim = watched.submit("generate", {"seed": 3})
        assert victim.wait(60) and victim.status == "failed"
        assert "time limit of 0.6 s" in victim.error
    finally:
        watched.job_timeout = 60
    assert _replaced(watched, old)
    after = watched.submit("generate", {"seed": 4})
    assert after.wait(90) and after.status == "done", after.error


def test_a_stop_that_does_not_land_in_time_restarts_the_worker(watched):
    job = watched.submit("generate", {"seed": 5})
    assert first_preview(job).status == "running"
    old = watched.worker_pids()[0]
    watched.stop_timeout = 0.05  # the worker sleeps 0.3 s after every scale before it looks at Stop
    try:
        job.cancel()
        assert job.wait(30) and job.status == "cancelled"
        assert "did not reach the next scale" in job.error
    finally:
        watched.stop_timeout = 60
    assert _replaced(watched, old)
    after = watched.submit("generate", {"seed": 6})
    assert after.wait(90) and after.status == "done", after.error
