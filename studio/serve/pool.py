"""The parent side of the serving path: a pool of worker processes (one per device) and the jobs
waiting for them. Plain Python: the UI process imports this and never imports torch; the worker
process itself is studio.serve.runner, imported only in the spawned child.

    pool = WorkerPool([ModelSpec("default", None)], devices=["cpu"], outputs="outputs/")
    pool.start()                                   # spawns the workers, waits for the models
    job = pool.submit("generate", {"class_name": "volcano", "seed": 0}, session="alice")  # or a params dataclass
    for view in job.updates():                     # the latest state; stale previews are dropped
        print(view.status, view.latest and view.latest.scale_index)
    job.result.paths                               # the PNGs, saved before anyone saw them

Pieces and why:
- one thread per worker process in the parent sends it one job, or one batch of generations,
  variations and re-rolls of one model, at a time and reads its events; jobs wait in the pool's
  queue until a worker is free, so a worker that dies takes only the jobs it was running with it
  (they fail with a clear message, the worker is restarted, the queue goes on);
- the queue is fair: one queue per session, sessions take turns, each may have only so many jobs
  waiting; `position` counts the turns before a job, `wait_estimate` turns it into seconds;
- each worker process has a shared cancel array: the parent writes a running job's number into
  the cell of its place in the batch and the per-scale callback checks it, so Stop lands at the
  next scale boundary, for that job only;
- a watchdog in the same thread kills and restarts a worker that stops beating its heartbeat (a
  shared timestamp), overruns the job time limit, or does not reach the next scale after Stop;
- every scale's preview is kept (the filmstrip needs them all), but a consumer only ever sees the
  latest state when it asks: previews it was too slow to show are dropped, never queued.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from studio.params import JOBS, PREVIEW_MODES, JobParams, UserError
from studio.serve.limits import Limits
from studio.serve.protocol import FINISHED, JobResult, JobView, ModelInfo, ModelSpec, ScaleUpdate, WorkerError

__all__ = ["Job", "WorkerPool", "WorkerError", "QueueFull", "ModelSpec", "ModelInfo", "JobView"]


class Job:
    """The parent's handle on one job; thread-safe. Use `updates()` to follow it."""

    def __init__(self, pool: "WorkerPool", seq: int, kind: str, model: str, params: dict, session: str = ""):
        self.id = uuid.uuid4().hex[:12]
        self.seq, self.kind, self.model, self.params, self.session = seq, kind, model, params, session
        self._pool = pool
        self._cond = threading.Condition()
        self._version = 0
        self.status = "queued"
        self.scales: List[ScaleUpdate] = []
        self.canvas: Optional[bytes] = None
        self.result: Optional[JobResult] = None
        self.error: Optional[str] = None
        self.worker: Optional[int] = None
        self.submitted = time.monotonic()
        self.started: Optional[float] = None  # when it (last) went to a worker
        self.stop_asked: Optional[float] = None  # when Stop was pressed while it ran

    # -- for consumers ---------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self._pool.position(self)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def cancel(self) -> None:
        """Remove a queued job, or stop a running one at its next scale boundary."""
        self._pool.cancel(self)

    def view(self) -> JobView:
        position = self._pool.position(self)  # never ask the pool while holding our lock (lock order: pool, job)
        with self._cond:
            return self._view_locked(position)

    def _view_locked(self, position: int) -> JobView:
        window = self.scales[-1].window if self.scales else 0
        queued = self.status == "queued"
        return JobView(self.id, self.status, position if queued else 0,
                       self.scales[-1] if self.scales else None,
                       tuple(s for s in self.scales if s.window == window), self.canvas, self.result,
                       self.error, time.monotonic() - self.submitted,
                       self._pool.wait_estimate(position) if queued and position else None)

    def wait(self, timeout: Optional[float] = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def updates(self, poll: float = 1.0) -> Iterator[JobView]:
        """Yield the job's state whenever it changed, ending with the finished state.

        A slow consumer gets the newest state, not a backlog: previews made meanwhile are dropped
        from the stream (they stay in `scales`). While nothing happens (a queued job) the state is
        yielded again every `poll` seconds so a waiting consumer can show the queue and be closed."""
        seen = -1
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._version != seen or self.finished, poll)
            position = self._pool.position(self)  # outside our lock: the pool takes its lock, then ours
            with self._cond:
                changed = self._version != seen
                seen = self._version
                view = self._view_locked(position)
            if changed or not view.finished:
                yield view
            if view.finished:
                return

    def __repr__(self):
        return f"Job({self.id}, {self.kind}, {self.status})"

    # -- for the pool ------------------------------------------------------------------------------
    def _update(self, **changes) -> None:
        with self._cond:
            if self.finished:
                return
            scale = changes.pop("scale", None)
            if scale is not None:
                self.scales.append(scale)
            for k, v in changes.items():
                setattr(self, k, v)
            self._version += 1
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# the pool (parent side)


class QueueFull(UserError):
    """A session has as many jobs waiting as it may have (WorkerPool.max_queued_per_session)."""


class WorkerPool:
    """Worker processes (one per device; a device may be named twice for two CPU workers) and one
    fair queue of jobs.

    devices: e.g. ["cuda:0", "cuda:1"]; "auto" picks cuda when the worker sees a GPU, else cpu.
    preview: "full" decodes f_hat at every scale; "fast" maps the VAE's code channels to RGB with
        a linear map fitted when the worker starts (a job can ask for the other mode).
    scale_delay: seconds to sleep after every scale (demos and tests of streaming on tiny models).
    torch_threads: intra-op threads per worker; None: chosen by the worker before every job from
        the free cores (studio.serve.runner.ThreadPolicy).
    batching / max_batch_images: waiting generations, variations and re-rolls of one model run as one
        batch of up to this many images (each job keeps its own seed, previews, stop and result).
    max_queued_per_session: jobs one session may have waiting; sessions are served round-robin.
    job_timeout: seconds a job (or a batch) may run; heartbeat_timeout: seconds a worker may go
        without a heartbeat; stop_timeout: seconds a stopped job may take to reach its next scale.
        Past any of them the worker is killed and restarted and the queue goes on.
    limits: studio.serve.limits.Limits (app.py's --max-* flags; None: the defaults). The worker
        checks every job against them as it arrives (Limits.check_arrived), whoever submitted it.
    """

    def __init__(self, models: Sequence[ModelSpec], devices: Sequence[str] = ("auto",), outputs="outputs",
                 preview: str = "full", preview_size: int = 384, scale_delay: float = 0.0,
                 torch_threads: Optional[int] = None, start_timeout: float = 900.0, batching: bool = True,
                 max_batch_images: int = 16, max_queued_per_session: int = 8, job_timeout: float = 600.0,
                 heartbeat_timeout: float = 30.0, stop_timeout: float = 30.0, limits: Optional[Limits] = None):
        if not models:
            raise ValueError("give at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {PREVIEW_MODES}, not {preview!r}")
        self.model_specs = list(models)
        self.devices = list(devices) or ["auto"]
        self.outputs = Path(outputs).resolve()
        self.preview, self.preview_size, self.scale_delay = preview, int(preview_size), float(scale_delay)
        self.torch_threads, self.start_timeout = torch_threads, start_timeout
        self.batching, self.max_batch_images = bool(batching), min(MAX_BATCH, max(1, int(max_batch_images)))
        self.max_queued_per_session = max(1, int(max_queued_per_session))
        self.job_timeout, self.heartbeat_timeout, self.stop_timeout = job_timeout, heartbeat_timeout, stop_timeout
        self.limits = limits if limits is not None else Limits()
        self.models: Dict[str, ModelInfo] = {}  # filled by the first worker that is ready
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Condition()
        self._queues: Dict[str, collections.deque] = {}  # session -> its waiting jobs, in submission order
        self._order: List[str] = []  # sessions with waiting jobs, the next to be served first
        self._seq = itertools.count(1)
        self._closed = False
        self._seconds_per_job: Optional[float] = None  # a running average of worker time per job
        self._slots = [_Slot(self, i, d) for i, d in enumerate(self.devices)]

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> "WorkerPool":
        """Spawn the workers; with `wait`, also wait_ready()."""
        self.outputs.mkdir(parents=True, exist_ok=True)
        for slot in self._slots:
            slot.start()
        return self.wait_ready() if wait else self

    def wait_ready(self) -> "WorkerPool":
        """Wait until every worker has loaded its models, or raise WorkerError with the reason."""
        deadline = time.monotonic() + self.start_timeout
        for slot in self._slots:
            slot.ready.wait(max(0.0, deadline - time.monotonic()))
            if slot.fatal:
                self.close()
                raise WorkerError(slot.fatal)
            if not slot.ready.is_set():
                self.close()
                raise WorkerError(f"the worker on {slot.device} did not load its models in {self.start_timeout:.0f} s")
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = self._take_all()
            self._lock.notify_all()
        for job in pending:
            job._update(status="cancelled", error="the studio is shutting down")
        for slot in self._slots:
            slot.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, kind: str, params: Union[dict, JobParams], model: Optional[str] = None,
               session: str = "") -> Job:
        """Queue a job. `params`: the kind's studio.params dataclass, or a dict of its fields (the
        worker checks either; bad input fails the job with a message naming the parameter).
        session: who asks (the browser session); sessions take turns, and each may have at most
        max_queued_per_session jobs waiting (QueueFull, a UserError, says so)."""
        if kind not in JOBS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(JOBS)}")
        model = model or self.model_specs[0].name
        if model not in {m.name for m in self.model_specs}:
            raise ValueError(f"unknown model {model!r}; loaded: {', '.join(m.name for m in self.model_specs)}")
        session = str(session or "")
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if not any(s.alive_or_starting for s in self._slots):
                raise WorkerError("no worker is running: " + "; ".join(s.fatal or "" for s in self._slots))
            queue = self._queues.setdefault(session, collections.deque())
            if len(queue) >= self.max_queued_per_session:
                raise QueueFull(f"you already have {len(queue)} jobs waiting (at most {self.max_queued_per_session} "
                                "at a time); wait for one to start, or stop one")
            job = Job(self, next(self._seq), kind, model, params if isinstance(params, JobParams) else dict(params),
                      session)
            queue.append(job)
            if session not in self._order:
                self._order.append(session)
            self._lock.notify_all()
        return job

    def position(self, job: Job) -> int:
        """The job's place in the queue (1 = next to start), 0 when it is not waiting. Sessions take
        turns: a job waits for its own session's earlier jobs and, per earlier job of its own, one
        job of every other session (one more of those whose turn comes first)."""
        with self._lock:
            queue = self._queues.get(job.session)
            if not queue or job not in queue or job.session not in self._order:
                return 0
            k, mine = queue.index(job), self._order.index(job.session)
            ahead = k
            for i, session in enumerate(self._order):
                if i != mine:
                    ahead += min(len(self._queues[session]), k + 1 if i < mine else k)
            return ahead + 1

    @property
    def queue_length(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def wait_estimate(self, position: int) -> Optional[float]:
        """Seconds until the job at `position` starts, from the recent worker time per job (None
        before any job has finished). Takes no lock."""
        per_job, workers = self._seconds_per_job, sum(1 for s in self._slots if s.alive_or_starting)
        if per_job is None or position < 1:
            return None
        return position * per_job / max(1, workers)

    def _ran(self, seconds: float, jobs: int) -> None:
        """A worker finished `jobs` jobs in `seconds` (one batch): the wait estimates follow."""
        per_job = seconds / max(1, jobs)
        old = self._seconds_per_job
        self._seconds_per_job = per_job if old is None else 0.7 * old + 0.3 * per_job

    def cancel(self, job: Job) -> None:
        with self._lock:
            queue = self._queues.get(job.session)
            if queue is not None and job in queue:
                queue.remove(job)
                self._forget_empty(job.session)
                job._update(status="cancelled", error="stopped before it started")
                self._lock.notify_all()
                return
            for slot in self._slots:
                slot.cancel(job)

    def worker_pids(self) -> List[Optional[int]]:
        return [slot.pid for slot in self._slots]

    def _batchable(self, job: Job) -> bool:
        """Plain generations, variations (guide) and re-rolls of one model batch together (each keeps its
        own scales: VARPipeline.generate_batch), except more_smooth: its soft codes carry the batch's
        rounding. (A re-roll of an edit or of a control result is found out by the worker, which runs
        it alone after the batch.)"""
        if not self.batching or job.kind not in BATCH_KINDS:
            return False
        p = job.params
        return not (p.get("more_smooth") if isinstance(p, dict) else getattr(p, "more_smooth", False))

    @staticmethod
    def _images(job: Job) -> int:
        p = job.params
        try:
            return max(1, int(p.get("num_images", 1) if isinstance(p, dict) else getattr(p, "num_images", 1)))
        except (TypeError, ValueError):
            return 1

    def _take_batch(self, slot: "_Slot") -> List[Job]:
        """Under the lock: the next job in turn, and with it (when it batches) the first waiting job
        of every other session, round after round, that batches with it and fits."""
        first_session = self._order[0]
        first = self._queues[first_session].popleft()
        batch, served = [first], [first_session]
        # the waiting jobs are shared among the idle workers (this one included) before any batches
        idle = 1 + sum(1 for s in self._slots if not s.jobs and s.ready.is_set() and s.alive_or_starting
                       and s.proc is not None and s.proc.is_alive() and s is not slot)
        most = -(-(1 + sum(len(q) for q in self._queues.values())) // idle)
        if self._batchable(first):
            images = self._images(first)
            taken = True
            while taken and images < self.max_batch_images and len(batch) < most:
                taken = False
                for session in list(self._order):
                    queue = self._queues[session]
                    if not queue:
                        continue
                    head = queue[0]
                    if len(batch) >= most:
                        break
                    if (head.model == first.model and self._batchable(head)
                            and images + self._images(head) <= self.max_batch_images):
                        batch.append(queue.popleft())
                        images += self._images(head)
                        taken = True
                        if session not in served:
                            served.append(session)
        # served sessions go to the back of the line, in the order they were served; the rest keep theirs
        self._order = [s for s in self._order if s not in served] + served
        for session in served:
            self._forget_empty(session)
        return batch

    def _forget_empty(self, session: str) -> None:
        if not self._queues.get(session):
            self._queues.pop(session, None)
            if session in self._order:
                self._order.remove(session)

    def _take_all(self) -> List[Job]:
        jobs = [j for s in self._order for j in self._queues.get(s, ())]
        self._queues, self._order = {}, []
        return jobs

    def _next_batch(self, slot: "_Slot"):
        """The next jobs for `slot`; None when the pool closes, _DIED when its idle process died."""
        with self._lock:
            while not self._closed and not self._order:
                if not slot.proc.is_alive():
                    return _DIED
                self._lock.wait(0.5)
            if self._closed:
                return None
            batch = self._take_batch(slot)
            now = time.monotonic()
            for job in batch:
                job.worker, job.started = slot.index, now
                job._update(status="running")
            slot.jobs = list(batch)  # under the lock, so a cancel never misses them
            self._lock.notify_all()
            return batch

    def _requeue_front(self, jobs: Sequence[Job]) -> None:
        """Jobs a worker could not finish through no fault of theirs go back to the front, progress reset."""
        with self._lock:
            for job in reversed(list(jobs)):
                job._update(status="queued", scales=[], canvas=None, stop_asked=None)
                self._queues.setdefault(job.session, collections.deque()).appendleft(job)
                if job.session in self._order:
                    self._order.remove(job.session)
                self._order.insert(0, job.session)
            self._lock.notify_all()

    def _fail_all_pending(self, message: str) -> None:
        with self._lock:
            if any(s.alive_or_starting for s in self._slots):
                return
            pending = self._take_all()
        for job in pending:
            job._update(status="failed", error=message)


MAX_BATCH = 64  # cells of a worker's cancel array: the most jobs one batch may hold
BATCH_KINDS = ("generate", "guide", "reroll")  # the job kinds that share batches (runner: Handler.prepare)


class _Slot:
    """A parent-side thread that keeps one worker process alive, feeds it jobs (one, or one batch,
    at a time) and watches it: heartbeat, time limit, and Stop."""

    def __init__(self, pool: WorkerPool, index: int, device: str):
        self.pool, self.index, self.device = pool, index, device
        self.ready = threading.Event()
        self.fatal: Optional[str] = None
        self.proc = None
        self.conn = None
        self.cancel_cell = None
        self.heartbeat = None
        self.jobs: List[Job] = []
        self.restarts = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"var-worker-{index}", daemon=True)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive_or_starting(self) -> bool:
        return not self._stop and self.fatal is None

    def start(self):
        self._thread.start()

    def cancel(self, job: Job):
        jobs = self.jobs
        if job in jobs and self.cancel_cell is not None:
            if job.stop_asked is None:
                job.stop_asked = time.monotonic()
            self.cancel_cell[jobs.index(job)] = job.seq

    def stop(self):
        self._stop = True
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        if self.proc is not None:
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self):
        while not self._stop:
            if not self._spawn():
                self.pool._fail_all_pending(f"no worker could be started: {self.fatal}")
                return
            while not self._stop:
                batch = self.pool._next_batch(self)
                if batch is None:
                    return
                served = batch is not _DIED and self._serve(batch)
                batch = None  # while it waits for the next batch, the thread holds no finished job
                if not served:
                    break  # the process died or was killed: restart it
            self._reap()
            self.restarts += 1

    def _spawn(self) -> bool:
        p = self.pool
        parent_conn, child_conn = p._ctx.Pipe(duplex=True)
        cell = p._ctx.RawArray("q", MAX_BATCH)
        heartbeat = p._ctx.RawValue("d", time.monotonic())
        cpu_workers = sum(1 for d in p.devices if d in ("cpu", "auto"))
        config = dict(device=self.device, models=[(m.name, m.source) for m in p.model_specs],
                      text_encoders={m.name: m.text_encoder for m in p.model_specs if m.text_encoder},
                      outputs=str(p.outputs), preview=p.preview, preview_size=p.preview_size,
                      scale_delay=p.scale_delay, torch_threads=p.torch_threads, worker_index=self.index,
                      cpu_workers=cpu_workers, limits=p.limits.as_dict())
        proc = p._ctx.Process(target=_child_main, args=(config, child_conn, cell, heartbeat), daemon=True,
                              name=f"var-worker-{self.index}")
        proc.start()
        child_conn.close()
        self.proc, self.conn, self.cancel_cell, self.heartbeat = proc, parent_conn, cell, heartbeat
        deadline = time.monotonic() + p.start_timeout
        while time.monotonic() < deadline and not self._stop:
            msg = self._recv(timeout=1.0)
            if msg is _NOTHING:
                continue
            if msg is _DIED:
                proc.join(10)
                self.fatal = (f"the worker on {self.device} exited while loading the models "
                              f"({_describe_exit(proc.exitcode)})")
                break
            if msg[0] == "ready":
                info = msg[1]
                if not p.models:
                    p.models.update({name: ModelInfo(**mi) for name, mi in info["models"].items()})
                self.fatal = None
                self.ready.set()
                return True
            if msg[0] == "fatal":
                self.fatal = msg[1]
                break
        else:
            if not self._stop:
                self.fatal = f"the worker on {self.device} did not load its models in {p.start_timeout:.0f} s"
        self._reap()
        self.ready.set()  # start() looks at .fatal
        return False

    def _serve(self, batch: List[Job]) -> bool:
        """Run one job or one batch on the process; False when the process died under it or the
        watchdog killed it (it is then restarted)."""
        p = self.pool
        by_id = {job.id: job for job in batch}
        started, open_ids = set(), set(by_id)
        last_scale = {}  # job id -> when its last scale arrived
        t0 = time.monotonic()
        try:
            for i in range(len(self.cancel_cell)):
                self.cancel_cell[i] = 0
            for job in batch:  # a Stop pressed between the hand-over and now
                if job.stop_asked is not None:
                    self.cancel_cell[batch.index(job)] = job.seq
            try:
                if len(batch) == 1:
                    job = batch[0]
                    self.conn.send(("job", job.seq, job.id, job.kind, job.model, job.params))
                else:
                    self.conn.send(("batch", [(j.seq, j.id, j.kind, j.model, j.params) for j in batch]))
            except (OSError, ValueError):
                pass  # a dead process: _recv reports it below
            while open_ids:
                msg = self._recv(timeout=0.2)
                if msg is _NOTHING:
                    reason = self._watchdog(batch, open_ids, last_scale, t0)
                    if reason is None:
                        continue
                    self._kill_for(reason, batch, open_ids, started)
                    return False
                if msg is _DIED:
                    self.proc.join(10)  # reap it, so the exit code can be told
                    self._end_after_death(batch, open_ids, started, (
                        f"the worker on {self.device} stopped unexpectedly while running this job "
                        f"({_describe_exit(self.proc.exitcode)}); it is being restarted, so try again"))
                    return False
                kind = msg[0]
                if kind == "started":
                    started.add(msg[1])
                elif kind == "scale":
                    last_scale[msg[1].job_id] = time.monotonic()
                    by_id[msg[1].job_id]._update(scale=msg[1])
                elif kind == "window":
                    last_scale[msg[1]] = time.monotonic()
                    by_id[msg[1]]._update(canvas=msg[2])
                elif kind == "done":
                    by_id[msg[1].job_id]._update(status="done", result=msg[1])
                    open_ids.discard(msg[1].job_id)
                elif kind in ("error", "cancelled"):
                    by_id[msg[1]]._update(status="failed" if kind == "error" else "cancelled", error=msg[2])
                    open_ids.discard(msg[1])
                # (a watchdog check here too: a worker that streams but never ends is still timed)
                reason = self._watchdog(batch, open_ids, last_scale, t0)
                if reason is not None and open_ids:
                    self._kill_for(reason, batch, open_ids, started)
                    return False
            p._ran(time.monotonic() - t0, len(batch))
            return True
        finally:
            self.jobs = []

    def _watchdog(self, batch, open_ids, last_scale, t0) -> Optional[tuple]:
        """Why the worker must be killed now: ("hung" | "timeout" | "stop", message), or None."""
        p, now = self.pool, time.monotonic()
        silent = now - self.heartbeat.value
        if p.heartbeat_timeout and silent > p.heartbeat_timeout:
            return ("hung", f"the worker on {self.device} stopped answering (no heartbeat for {silent:.0f} s); "
                            "it was restarted, so try again")
        if p.job_timeout and now - t0 > p.job_timeout:
            return ("timeout", f"the job took longer than the time limit of {p.job_timeout:g} s and was stopped; "
                               "the worker was restarted (try fewer images or a smaller job)")
        if p.stop_timeout:
            for job in batch:
                asked = job.stop_asked
                if (job.id in open_ids and asked is not None and now - asked > p.stop_timeout
                        and last_scale.get(job.id, t0) < asked):
                    return ("stop", f"stopped; the worker did not reach the next scale within {p.stop_timeout:g} s, "
                                    "so it was restarted")
        return None

    def _kill_for(self, reason: tuple, batch, open_ids, started) -> None:
        """The watchdog's verdict: kill the process (it is restarted by _run). On a Stop that did not
        land, the stopped jobs end cancelled and the others of the batch go back to the queue; on a
        hang or a time limit every unfinished job fails with the reason."""
        what, message = reason
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
        self.proc.join(10)
        unfinished = [j for j in batch if j.id in open_ids]
        if what == "stop":
            again = []
            for job in unfinished:
                if job.stop_asked is not None:
                    job._update(status="cancelled", error=message)
                else:
                    again.append(job)
            self.pool._requeue_front(again)
        else:
            for job in unfinished:
                if job.id in started or what == "timeout":
                    job._update(status="failed", error=message)
                else:  # never reached the worker's hands: it waits for the new worker
                    self.pool._requeue_front([job])
        open_ids.clear()

    def _end_after_death(self, batch, open_ids, started, message: str) -> None:
        unfinished = [j for j in batch if j.id in open_ids]
        self.pool._requeue_front([j for j in unfinished if j.id not in started])  # died before taking them
        for job in unfinished:
            if job.id in started:
                job._update(status="failed", error=message)
        open_ids.clear()

    def _recv(self, timeout: float):
        """The next message, _NOTHING after `timeout` seconds, or _DIED if the process is gone."""
        try:
            ready = mp_connection.wait([self.conn, self.proc.sentinel], timeout)
            if self.conn in ready:
                return self.conn.recv()
            if self.proc.sentinel in ready:
                if self.conn.poll(0):  # it wrote its last words before exiting
                    return self.conn.recv()
                return _DIED
            return _NOTHING
        except Exception:  # EOF, or a message torn by a dying process
            self.proc.join(2)
            return _DIED

    def _reap(self):
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()


_NOTHING, _DIED = object(), object()


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " - killed, perhaps out of memory" if -code == signal.SIGKILL else ""
        return f"{name}{hint}"
    return f"exit code {code}"



def _child_main(config: dict, conn, cancel_cell, heartbeat=None) -> None:
    """The target of every spawned worker process: the runner (and torch with it) is imported there,
    never in the parent."""
    from studio.serve.runner import worker_main

    worker_main(config, conn, cancel_cell, heartbeat)
