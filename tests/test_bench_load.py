"""The load benchmark's accounting (lab.bench_load): every planned job is reported, finished or not and
why, never silently fewer; and a client's job whose request failed ends with that error instead of
waiting forever (what a round that stopped at 16 of 32 jobs with no word looked like)."""
import threading
import time
from concurrent.futures import Future

import pytest

from lab import bench_load as bl
from lab.bench_client import job_outputs


def test_every_planned_job_is_counted_with_what_became_of_it():
    release = threading.Event()

    def run_job(i, k, until):
        if i == 0:  # quick jobs: all done
            time.sleep(0.05)
            return f"result {i}.{k}"
        if i == 1:
            if k == 0:
                raise RuntimeError("you already have 8 jobs waiting\n(at most 8)")
            time.sleep(0.7)  # started before the time limit, ends in its grace: done; the next one never starts
            return f"result {i}.{k}"
        release.wait(10)  # client 2: a job that never answers (and ignores `until`)
        return "too late"

    try:
        outcomes, seconds = bl.drive(3, 3, run_job, timeout=0.5, grace=0.4, log=lambda text: None)
    finally:
        release.set()
    assert [len(row) for row in outcomes] == [3, 3, 3] and all(o is not None for row in outcomes for o in row)
    assert outcomes[0] == [("done", "result 0.0"), ("done", "result 0.1"), ("done", "result 0.2")]
    assert outcomes[1][0] == (bl.FAILED, "RuntimeError: you already have 8 jobs waiting (at most 8)")
    assert outcomes[1][1] == ("done", "result 1.1")
    assert outcomes[1][2] == (bl.NOT_STARTED, "the round's time limit (0.5 s) had passed")
    assert outcomes[2][0][0] == bl.UNFINISHED and outcomes[2][1:] == [
        (bl.NOT_STARTED, "its client never came back from an earlier job")] * 2
    assert seconds < 5  # the client that never came back is not waited for

    missing = bl.missing_jobs(outcomes)
    assert sum(missing.values()) == 5 and missing[f"{bl.NOT_STARTED}: its client never came back from an earlier job"] == 2
    r = bl.Round(False, 3, 4, 1, seconds, [1.0] * 4, [], None, planned=9, missing=missing)
    table = bl.format_table([r])
    assert "5 of 9 jobs did not finish: 2 not started: its client never came back" in table
    assert "1 failed: RuntimeError: you already have 8 jobs waiting" in table and "1 unfinished: no result" in table
    whole = bl.Round(True, 3, 9, 0, 1.0, [1.0] * 9, [], None, planned=9)
    assert whole.missing_text() == "" and "did not finish" not in bl.format_table([whole])


def test_a_job_whose_request_failed_raises_its_error_instead_of_waiting_forever():
    """gradio_client's own iterator waits for a status that never comes when the request that queues the
    job fails (httpx's 5 s timeout on a busy server): job_outputs raises the request's error."""
    from gradio_client.client import Job
    from gradio_client.utils import Communicator, JobStatus

    failed = Future()
    failed.set_exception(TimeoutError("timed out"))
    job = Job(failed, communicator=Communicator(threading.Lock(), JobStatus(), lambda *a: a, ""))
    with pytest.raises(TimeoutError, match="timed out"):
        list(job_outputs(job))

    running = Job(Future(), communicator=Communicator(threading.Lock(), JobStatus(), lambda *a: a, ""))
    running.communicator.job.outputs.extend(["scale 1", "scale 2"])
    seen = []
    with pytest.raises(TimeoutError, match="round's time limit"):
        for out in job_outputs(running, deadline=time.monotonic() + 0.2):
            seen.append(out)
    assert seen == ["scale 1", "scale 2"]  # what streamed came through before the time limit

    finished = Future()
    finished.set_result(("final",))
    done = Job(finished, communicator=Communicator(threading.Lock(), JobStatus(), lambda *a: a, ""))
    done.communicator.job.outputs.extend(["scale 1", ("final",)])
    assert list(job_outputs(done)) == ["scale 1", ("final",)]
