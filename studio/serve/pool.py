"""The parent side of the serving path: a pool of worker processes (one per device) and the jobs
waiting for them. Plain Python: the UI process imports this and never imports torch; the worker
process itself is studio.serve.runner, imported only in the spawned child.

    pool = WorkerPool([ModelSpec("default", None)], devices=["cpu"], outputs="outputs/")
    pool.start()                                   # spawns the workers, waits for the models
    job = pool.submit("generate", {"class_name": "volcano", "seed": 0})   # or a studio.params dataclass
    for view in job.updates():                     # the latest state; stale previews are dropped
        print(view.status, view.latest and view.latest.scale_index)
    job.result.paths                               # the PNGs, saved before anyone saw them

Pieces and why:
- one thread per worker process in the parent sends it one job at a time and reads its events;
  a job waits in the pool's queue until a worker is free, so a worker that dies takes only the
  job it was running with it (that job fails with a clear message, the worker is restarted, the
  queue goes on);
- each worker process has a shared cancel cell: the parent writes the running job's number into
  it and the per-scale callback checks it, so Stop lands at the next scale boundary;
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

from studio.params import JOBS, PREVIEW_MODES, JobParams
from studio.serve.protocol import FINISHED, JobResult, JobView, ModelInfo, ModelSpec, ScaleUpdate, WorkerError

__all__ = ["Job", "WorkerPool", "WorkerError", "ModelSpec", "ModelInfo", "JobView"]


class Job:
    """The parent's handle on one job; thread-safe. Use `updates()` to follow it."""

    def __init__(self, pool: "WorkerPool", seq: int, kind: str, model: str, params: dict):
        self.id = uuid.uuid4().hex[:12]
        self.seq, self.kind, self.model, self.params = seq, kind, model, params
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
        return JobView(self.id, self.status, position if self.status == "queued" else 0,
                       self.scales[-1] if self.scales else None,
                       tuple(s for s in self.scales if s.window == window), self.canvas, self.result,
                       self.error, time.monotonic() - self.submitted)

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


class WorkerPool:
    """One worker process per device, one shared queue of jobs.

    devices: e.g. ["cuda:0", "cuda:1"]; "auto" picks cuda when the worker sees a GPU, else cpu.
    preview: "full" decodes f_hat at every scale; "fast" maps the VAE's code channels to RGB with
        a linear map fitted when the worker starts (a job can ask for the other mode).
    scale_delay: seconds to sleep after every scale (demos and tests of streaming on tiny models).
    """

    def __init__(self, models: Sequence[ModelSpec], devices: Sequence[str] = ("auto",), outputs="outputs",
                 preview: str = "full", preview_size: int = 384, scale_delay: float = 0.0,
                 torch_threads: Optional[int] = None, start_timeout: float = 900.0):
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
        self.models: Dict[str, ModelInfo] = {}  # filled by the first worker that is ready
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._seq = itertools.count(1)
        self._closed = False
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
            pending, self._pending = list(self._pending), collections.deque()
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
    def submit(self, kind: str, params: Union[dict, JobParams], model: Optional[str] = None) -> Job:
        """Queue a job. `params`: the kind's studio.params dataclass, or a dict of its fields (the
        worker checks either; bad input fails the job with a message naming the parameter)."""
        if kind not in JOBS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(JOBS)}")
        model = model or self.model_specs[0].name
        if model not in {m.name for m in self.model_specs}:
            raise ValueError(f"unknown model {model!r}; loaded: {', '.join(m.name for m in self.model_specs)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if not any(s.alive_or_starting for s in self._slots):
                raise WorkerError("no worker is running: " + "; ".join(s.fatal or "" for s in self._slots))
            job = Job(self, next(self._seq), kind, model, params if isinstance(params, JobParams) else dict(params))
            self._pending.append(job)
            self._lock.notify_all()
        return job

    def position(self, job: Job) -> int:
        """The job's place in the queue (1 = next to start), 0 when it is not waiting."""
        with self._lock:
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return 0

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._pending)

    def cancel(self, job: Job) -> None:
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                job._update(status="cancelled", error="stopped before it started")
                self._lock.notify_all()
                return
            for slot in self._slots:
                slot.cancel(job)

    def worker_pids(self) -> List[Optional[int]]:
        return [slot.pid for slot in self._slots]

    def _next_job(self, slot: "_Slot"):
        """The next job for `slot`; None when the pool closes, _DIED when its idle process died."""
        with self._lock:
            while not self._closed and not self._pending:
                if not slot.proc.is_alive():
                    return _DIED
                self._lock.wait(0.5)
            if self._closed:
                return None
            job = self._pending.popleft()
            job.worker = slot.index
            slot.job = job  # under the lock, so a cancel never misses it
            job._update(status="running")
            self._lock.notify_all()
            return job

    def _requeue_front(self, job: Job) -> None:
        with self._lock:
            job._update(status="queued")
            self._pending.appendleft(job)
            self._lock.notify_all()

    def _fail_all_pending(self, message: str) -> None:
        with self._lock:
            if any(s.alive_or_starting for s in self._slots):
                return
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            job._update(status="failed", error=message)


class _Slot:
    """A parent-side thread that keeps one worker process alive and feeds it jobs one at a time."""

    def __init__(self, pool: WorkerPool, index: int, device: str):
        self.pool, self.index, self.device = pool, index, device
        self.ready = threading.Event()
        self.fatal: Optional[str] = None
        self.proc = None
        self.conn = None
        self.cancel_cell = None
        self.job: Optional[Job] = None
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
        if self.job is job and self.cancel_cell is not None:
            self.cancel_cell.value = job.seq

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
                job = self.pool._next_job(self)
                if job is None:
                    return
                if job is _DIED or not self._serve(job):
                    break  # the process died: restart it
            self._reap()
            self.restarts += 1

    def _spawn(self) -> bool:
        p = self.pool
        parent_conn, child_conn = p._ctx.Pipe(duplex=True)
        cell = p._ctx.RawValue("q", 0)
        config = dict(device=self.device, models=[(m.name, m.source) for m in p.model_specs],
                      outputs=str(p.outputs), preview=p.preview, preview_size=p.preview_size,
                      scale_delay=p.scale_delay, torch_threads=p.torch_threads, worker_index=self.index)
        proc = p._ctx.Process(target=_child_main, args=(config, child_conn, cell), daemon=True,
                              name=f"var-worker-{self.index}")
        proc.start()
        child_conn.close()
        self.proc, self.conn, self.cancel_cell = proc, parent_conn, cell
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

    def _serve(self, job: Job) -> bool:
        """Run one job on the process; False when the process died under it."""
        try:
            started = False
            try:
                self.conn.send(("job", job.seq, job.id, job.kind, job.model, job.params))
            except (OSError, ValueError):
                pass  # a dead process: _recv reports it below
            while True:
                msg = self._recv(timeout=1.0)
                if msg is _NOTHING:
                    continue
                if msg is _DIED and not started:  # it died before taking the job: the job goes back
                    self.job = None
                    self.pool._requeue_front(job)
                    return False
                if msg is _DIED:
                    self.proc.join(10)  # reap it, so the exit code can be told
                    job._update(status="failed", error=(
                        f"the worker on {self.device} stopped unexpectedly while running this job "
                        f"({_describe_exit(self.proc.exitcode)}); it is being restarted, so try again"))
                    return False
                kind = msg[0]
                if kind == "started":
                    started = True
                elif kind == "scale":
                    job._update(scale=msg[1])
                elif kind == "window":
                    job._update(canvas=msg[2])
                elif kind == "done":
                    job._update(status="done", result=msg[1])
                    return True
                elif kind == "error":
                    job._update(status="failed", error=msg[2])
                    return True
                elif kind == "cancelled":
                    job._update(status="cancelled", error=msg[2])
                    return True
        finally:
            self.job = None

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



def _child_main(config: dict, conn, cancel_cell) -> None:
    """The target of every spawned worker process: the runner (and torch with it) is imported there,
    never in the parent."""
    from studio.serve.runner import worker_main

    worker_main(config, conn, cancel_cell)
