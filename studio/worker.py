"""The model worker: one process per device owns the models and runs jobs, streaming every scale.

    pool = WorkerPool([ModelSpec("default", None)], devices=["cpu"], outputs="outputs/")
    pool.start()                                   # spawns the workers, waits for the models
    job = pool.submit("generate", {"class_name": "volcano", "seed": 0})
    for view in job.updates():                     # the latest state; stale previews are dropped
        print(view.status, view.latest and view.latest.scale_index)
    job.result.paths                               # the PNGs, saved before anyone saw them

Two halves live here. The client half (WorkerPool, Job, the event dataclasses) is plain Python and
bytes: the UI process imports it and never imports torch. The process half (`_worker_main` and
below) runs in a `spawn`ed process per device and imports torch and the pipeline lazily.

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

import base64
import collections
import io
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image, PngImagePlugin

JOB_KINDS = ("generate", "inpaint", "outpaint", "guide", "reroll", "control", "preprocess")
PREVIEW_MODES = ("full", "fast", "none")  # "none": no picture per scale (status only)
TOKENS_CHUNK = "var_tokens"  # PNG text chunk holding a result's token pyramid (so it can be re-rolled)


class WorkerError(RuntimeError):
    """A worker could not start (bad model path, missing weights ...), with a readable reason."""


# ---------------------------------------------------------------------------------------------
# what travels between the processes: plain dataclasses of numbers, strings and bytes


@dataclass(frozen=True)
class ModelSpec:
    name: str  # shown in the UI's model dropdown
    source: Optional[str]  # VARPipeline.from_pretrained's argument (None: the embedded default)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    class_names: List[str]
    resolution: int
    patch_nums: List[int]
    vocab_size: int
    controls: List[str] = ()  # the control types the model has adapters for

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)


@dataclass(frozen=True)
class ScaleUpdate:
    """One scale of one job: the token grid made and a small JPEG preview of the image so far."""

    job_id: str
    scale_index: int  # 0-based
    num_scales: int
    patch_num: int  # the token grid is patch_num x patch_num
    preview: bytes  # JPEG; several images are tiled into one grid
    seconds: float  # model time of this scale
    preview_seconds: float  # time spent making the preview
    elapsed: float  # since the job started on the worker
    window: int = 0  # out-painting: which window (1-based); 0 otherwise


@dataclass(frozen=True)
class JobResult:
    job_id: str
    images: List[bytes]  # PNG files, parameters in their 'parameters' text chunk
    paths: List[str]  # where they were saved (before the result was sent); none for a "preprocess" map
    params: List[dict]
    tokens: Optional[List[List[np.ndarray]]]  # per image, per scale (pn*pn,) token ids; None for edits
    timings: dict


@dataclass(frozen=True)
class JobView:
    """What a consumer sees of a job at one moment."""

    job_id: str
    status: str  # queued | running | done | failed | cancelled
    position: int  # place in the queue, 1 = the next to start (0 once it runs)
    latest: Optional[ScaleUpdate]  # the newest preview
    scales: tuple  # every ScaleUpdate of the current window (the filmstrip)
    canvas: Optional[bytes]  # out-painting: JPEG of the canvas after the last window
    result: Optional[JobResult]
    error: Optional[str]
    elapsed: float  # since submission

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


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
        return self.status in ("done", "failed", "cancelled")

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
    def submit(self, kind: str, params: dict, model: Optional[str] = None) -> Job:
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; one of {JOB_KINDS}")
        model = model or self.model_specs[0].name
        if model not in {m.name for m in self.model_specs}:
            raise ValueError(f"unknown model {model!r}; loaded: {', '.join(m.name for m in self.model_specs)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if not any(s.alive_or_starting for s in self._slots):
                raise WorkerError("no worker is running: " + "; ".join(s.fatal or "" for s in self._slots))
            job = Job(self, next(self._seq), kind, model, dict(params))
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
        proc = p._ctx.Process(target=_worker_main, args=(config, child_conn, cell), daemon=True,
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
    import signal

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


# ---------------------------------------------------------------------------------------------
# PNG files with parameters and tokens (plain Python; both sides use these)


def encode_png(image: Image.Image, params: dict, tokens: Optional[Sequence[np.ndarray]] = None) -> bytes:
    """PNG bytes with `params` as JSON in the 'parameters' text chunk (what studio.generate writes
    and read_png_parameters reads) and, when given, the token pyramid in a compressed chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    if tokens is not None:
        info.add_text(TOKENS_CHUNK, encode_tokens(tokens), zip=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_tokens(tokens: Sequence[np.ndarray]) -> str:
    flat = np.concatenate([np.asarray(t).reshape(-1) for t in tokens])
    dtype = "<u2" if flat.size == 0 or int(flat.max()) < 65536 else "<u4"
    return json.dumps({"sizes": [int(np.asarray(t).size) for t in tokens], "dtype": dtype,
                       "data": base64.b64encode(flat.astype(dtype).tobytes()).decode("ascii")})


def decode_tokens(text: str) -> List[np.ndarray]:
    d = json.loads(text)
    flat = np.frombuffer(base64.b64decode(d["data"]), dtype=d["dtype"]).astype(np.int64)
    out, at = [], 0
    for n in d["sizes"]:
        out.append(flat[at:at + n])
        at += n
    if at != flat.size:
        raise ValueError("the token chunk is damaged")
    return out


def read_png_info(data: bytes) -> tuple:
    """PNG bytes -> (parameters dict, token list or None)."""
    with Image.open(io.BytesIO(data)) as im:
        text = getattr(im, "text", {}) or {}
    params = json.loads(text["parameters"]) if "parameters" in text else {}
    tokens = decode_tokens(text[TOKENS_CHUNK]) if TOKENS_CHUNK in text else None
    return params, tokens


# ---------------------------------------------------------------------------------------------
# the worker process (imports torch; runs only in the spawned child)


class _Cancelled(Exception):
    pass


def _worker_main(config: dict, conn, cancel_cell) -> None:
    try:
        import torch

        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        from studio.pipeline import VARPipeline

        device = config["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipes, previewers = {}, {}
        for name, source in config["models"]:
            try:
                pipes[name] = VARPipeline.from_pretrained(source, device=device)
            except Exception as e:
                conn.send(("fatal", f"could not load model {name!r} ({source or 'embedded default'}) on {device}: {e}"))
                return
            previewers[name] = _Previewer(pipes[name], int(config["preview_size"]))
            if config["preview"] == "fast":
                previewers[name].fit_fast_map()
        infos = {name: dict(name=name, source=str(p.source), class_names=list(p.class_names),
                            resolution=p.resolution, patch_nums=list(p.patch_nums),
                            vocab_size=p.var.cfg.vocab_size, controls=sorted(p.controls))
                 for name, p in pipes.items()}
        conn.send(("ready", {"pid": os.getpid(), "device": device, "models": infos}))
    except Exception as e:  # an import or device problem
        try:
            conn.send(("fatal", f"the worker could not start: {type(e).__name__}: {e}"))
        finally:
            return
    runner = _Runner(config, conn, cancel_cell, pipes, previewers, device)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        _, seq, job_id, kind, model, params = msg
        conn.send(("started", job_id))
        try:
            result = runner.run(seq, job_id, kind, model, params)
            conn.send(("done", result))
        except _Cancelled as e:
            conn.send(("cancelled", job_id, str(e)))
        except (ValueError, KeyError, TypeError, OSError) as e:  # bad input: tell the user, keep serving
            conn.send(("error", job_id, _message(e)))
        except Exception as e:  # a bug or a device error: still keep serving
            if "out of memory" in str(e).lower():
                _free_device_memory()
                conn.send(("error", job_id, "the device ran out of memory; try fewer images or a smaller model"))
            else:
                traceback.print_exc()
                conn.send(("error", job_id, f"internal error: {type(e).__name__}: {e}"))


def _message(e: Exception) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text or type(e).__name__


def _free_device_memory():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


class _Previewer:
    """f_hat -> a small RGB picture: a full decode, or the fitted linear latent-to-RGB map."""

    def __init__(self, pipe, size: int):
        self.pipe = pipe
        self.size = min(int(size), pipe.resolution)
        self.fast_map = None  # (C + 1, 3): code channels (and a bias) -> RGB in [-1, 1]

    def fit_fast_map(self, num_images: int = 4, seed: int = 0):
        """Least squares between f_hat and the decoded image (pooled to the latent grid), on a few
        smooth random colour images taken through encode at three depths of the pyramid, so the
        map also fits the coarse f_hat of early scales."""
        import torch
        import torch.nn.functional as F

        pipe = self.pipe
        g = torch.Generator().manual_seed(seed)
        R, S = pipe.resolution, pipe.num_scales
        with torch.no_grad():
            base = torch.rand(num_images, 3, 4, 4, generator=g) * 2 - 1
            imgs = F.interpolate(base, size=(R, R), mode="bicubic", align_corners=False).clamp(-1, 1)
            tokens = pipe.vae.img_to_tokens(imgs.to(pipe.device))
            depths = sorted({max(1, S // 3), max(1, (2 * S) // 3), S})
            f_hat = torch.cat([pipe.vae.quantize.tokens_to_fhat(tokens[:k]) for k in depths])  # (N, C, h, w)
            decoded = pipe.vae.fhat_to_img(f_hat).float()
            target = F.adaptive_avg_pool2d(decoded, f_hat.shape[-2:])  # (N, 3, h, w)
            C = f_hat.shape[1]
            X = f_hat.permute(0, 2, 3, 1).reshape(-1, C).double().cpu()
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
            Y = target.permute(0, 2, 3, 1).reshape(-1, 3).double().cpu()
            ridge = 1e-3 * torch.eye(C + 1, dtype=X.dtype) * X.pow(2).mean()
            self.fast_map = torch.linalg.solve(X.T @ X + ridge, X.T @ Y).float()
        return self.fast_map

    def __call__(self, f_hat, mode: str) -> Image.Image:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            if mode == "fast":
                if self.fast_map is None:
                    self.fit_fast_map()
                W = self.fast_map.to(f_hat.device)
                rgb = torch.einsum("bchw,cd->bdhw", f_hat.float(), W[:-1]) + W[-1].view(1, 3, 1, 1)
                rgb = F.interpolate(rgb, size=(self.size, self.size), mode="bilinear", align_corners=False)
            else:
                rgb = self.pipe.decode_fhat(f_hat).float()
                if rgb.shape[-1] != self.size:
                    rgb = F.interpolate(rgb, size=(self.size, self.size), mode="area")
            arr = rgb.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return tile(list(arr))

    def from_images(self, images: Sequence[Image.Image]) -> Image.Image:
        """Finished images (the decode of the last f_hat) as that scale's full preview."""
        side = (self.size, self.size)
        return tile([np.asarray(im.convert("RGB") if im.size == side else
                                im.convert("RGB").resize(side, Image.Resampling.BOX)) for im in images])


def tile(images: List[np.ndarray]) -> Image.Image:
    """Several (H, W, 3) uint8 images -> one grid image (a single image comes back as it is)."""
    if len(images) == 1:
        return Image.fromarray(images[0])
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    h, w = images[0].shape[:2]
    grid = np.full((rows * h + (rows - 1) * 2, cols * w + (cols - 1) * 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    return Image.fromarray(grid)


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _open_image(data, what: str) -> Image.Image:
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"no {what} was given")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise ValueError(f"the {what} could not be read as an image ({type(e).__name__}); "
                         "upload a PNG, JPEG or WebP file") from e
    if im.width < 1 or im.height < 1 or im.width * im.height > 64_000_000:
        raise ValueError(f"the {what} is {im.width}x{im.height}; images must be at most 64 megapixels")
    return im


def _label(value):
    """A class name, a class id given as text, or None (random / unconditional)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


class _Runner:
    def __init__(self, config, conn, cancel_cell, pipes, previewers, device):
        self.config, self.conn, self.cancel_cell = config, conn, cancel_cell
        self.pipes, self.previewers, self.device = pipes, previewers, device
        self.outputs = Path(config["outputs"])
        self.domain_nets: Dict[str, dict] = {}  # model -> its bundle's world nets, loaded on first use
        self.hf_models: Dict[tuple, object] = {}  # (control type, device) -> a transformers preprocessor

    def run(self, seq: int, job_id: str, kind: str, model: str, params: dict) -> JobResult:
        import torch

        if model not in self.pipes:
            raise ValueError(f"unknown model {model!r}")
        pipe, previewer = self.pipes[model], self.previewers[model]
        p = dict(params)
        if kind == "preprocess":  # the control map alone: a preview for the user, nothing saved
            t0 = time.perf_counter()
            cmap, record = self._control_map(model, pipe, p)
            return JobResult(job_id, [encode_png(cmap.preview, record)], [], [record], None,
                             {"total_job": time.perf_counter() - t0})
        mode = p.pop("preview", None) or self.config["preview"]
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {PREVIEW_MODES}, not {mode!r}")
        seed = int(p.get("seed", 0))
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be in 0..2^63-1, got {seed}")
        sampling = dict(guidance_scale=float(p.get("guidance_scale", 4.0)), top_k=int(p.get("top_k", 900)),
                        top_p=float(p.get("top_p", 0.95)), more_smooth=bool(p.get("more_smooth", False)),
                        generator=torch.Generator(pipe.device).manual_seed(seed))
        num_images = int(p.get("num_images", 1))
        if not 1 <= num_images <= 64:
            raise ValueError(f"the number of images must be in 1..64, got {num_images}")
        label = _label(p.get("class_name"))
        if label is not None:
            pipe.class_index(label)  # unknown classes fail here, before any work
        t0 = time.perf_counter()
        window = [1 if kind == "outpaint" else 0]  # out-painting: the window being made (1-based)
        delay = float(self.config.get("scale_delay") or 0.0)

        # the full preview of the last scale is the final image: taken from the result, not decoded twice
        last_from_result = mode == "full" and kind in ("generate", "control", "guide", "reroll")
        deferred = []

        def send_scale(ev, picture, t):
            jpeg = _jpeg(picture) if picture is not None else b""  # b"": previews off
            self.conn.send(("scale", ScaleUpdate(job_id, ev.scale_index, ev.num_scales, ev.patch_num, jpeg,
                                                 ev.seconds, time.perf_counter() - t, time.perf_counter() - t0,
                                                 window[0])))

        def on_scale(ev):
            t = time.perf_counter()
            if last_from_result and ev.scale_index == ev.num_scales - 1:
                deferred.append(ev)
            else:
                send_scale(ev, previewer(ev.f_hat, mode) if mode != "none" else None, t)
            if delay:
                time.sleep(delay)
            if self.cancel_cell.value == seq:
                raise _Cancelled(f"stopped at scale {ev.scale_index + 1}/{ev.num_scales}")

        def on_window(index, canvas):  # index: windows done so far
            window[0] = index + 1
            canvas.thumbnail((512, 512))
            self.conn.send(("window", job_id, _jpeg(canvas)))
            if self.cancel_cell.value == seq:
                raise _Cancelled(f"stopped after window {index}")

        record = {"task": kind, "model": model, "model_source": str(pipe.source), "seed": seed,
                  **{k: v for k, v in sampling.items() if k != "generator"}}
        keep_tokens = True
        if kind == "generate":
            out = pipe(class_labels=label, num_images_per_label=num_images, callback_on_scale_end=on_scale,
                       **sampling)
        elif kind == "inpaint":
            image = _open_image(p.get("image"), "image")
            mask = _open_image(p.get("mask"), "mask")
            if mask.size != image.size:
                raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is "
                                 f"{image.width}x{image.height}; they must be the same size")
            if not np.asarray(mask.convert("L")).any():
                raise ValueError("the mask is empty: paint (white) the part of the image to regenerate")
            edit = dict(mask_blur=int(p.get("mask_blur", 4)), mask_grow=int(p.get("mask_grow", 0)),
                        inpaint_area=str(p.get("inpaint_area", "masked")), padding=int(p.get("padding", 32)))
            out = pipe.inpaint(image, mask, class_labels=label, num_images=num_images,
                               callback_on_scale_end=on_scale, **edit, **sampling)
            record.update(edit, image_size=list(image.size))
            keep_tokens = False
        elif kind == "outpaint":
            image = _open_image(p.get("image"), "image")
            sides = {k: int(p.get(k, 0)) for k in ("left", "right", "top", "bottom")}
            if not any(sides.values()):
                raise ValueError("choose how many pixels to add on at least one side")
            blur = int(p.get("mask_blur", 8))
            out = pipe.outpaint(image, class_labels=label, mask_blur=blur, callback_on_scale_end=on_scale,
                                on_window=on_window, **sides, **sampling)
            record.update(sides, mask_blur=blur, image_size=list(image.size))
            keep_tokens = False
        elif kind == "guide":
            image = _open_image(p.get("image"), "guide image")
            keep = int(p.get("keep_scales", 2))
            out = pipe.variations(image, keep_scales=keep, class_labels=label, num_images=num_images,
                                  callback_on_scale_end=on_scale, **sampling)
            record.update(keep_scales=keep)
        elif kind == "control":
            cmap, control = self._control_map(model, pipe, p, need_adapter=True)
            steer = dict(control_strength=float(p.get("control_strength", 1.0)),
                         control_guidance_start=float(p.get("control_guidance_start", 0.0)),
                         control_guidance_end=float(p.get("control_guidance_end", 1.0)))
            out = pipe(class_labels=label, num_images_per_label=num_images, control_image=cmap.map,
                       control_type=control["control_type"], callback_on_scale_end=on_scale, **steer, **sampling)
            record.update(control, **steer)
        elif kind == "reroll":
            src_params, src_tokens = read_png_info(_png_bytes(p.get("source_png")))
            if src_tokens is None:
                raise ValueError("this image has no token pyramid stored with it: only images the studio "
                                 "generated (Generate, Guide, Re-roll) can be re-rolled")
            if [t.size for t in src_tokens] != [n * n for n in pipe.patch_nums]:
                raise ValueError(f"this image was made by a model with other scales ({src_params.get('model', '?')});"
                                 " select that model to re-roll it")
            keep = int(p.get("keep_scales", 1))
            if label is None:
                cid = src_params.get("class_id")
                label = int(cid) if isinstance(cid, int) and 0 <= cid < pipe.num_classes else -1
            tokens = [torch.from_numpy(t).view(1, -1).expand(num_images, -1) for t in src_tokens]
            out = pipe.reroll(tokens, from_scale=keep, class_labels=label, callback_on_scale_end=on_scale,
                              **sampling)
            record.update(keep_scales=keep, rerolled_from_seed=src_params.get("seed"))
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        if self.cancel_cell.value == seq:
            raise _Cancelled("stopped")
        for ev in deferred:
            send_scale(ev, previewer.from_images(out.images), time.perf_counter())
        return self._save(job_id, kind, pipe, out, record, keep_tokens, label, time.perf_counter() - t0)

    def _control_map(self, model: str, pipe, p: dict, need_adapter: bool = False):
        """The job's control map at the model's resolution (studio.preprocess) and the parameters
        that made it, for the PNG. need_adapter: fail before any work when the model lacks the adapter."""
        from studio import preprocess as pp

        ctype = p.get("control_type")
        if not isinstance(ctype, str) or ctype not in pp.PREPROCESSORS:
            raise ValueError(f"unknown control type {ctype!r}; one of {', '.join(pp.PREPROCESSORS)}")
        if need_adapter and ctype not in pipe.controls:
            raise ValueError(f"the model {model!r} has no {ctype} control adapter (it has: "
                             f"{', '.join(sorted(pipe.controls)) or 'none'}); its bundle needs "
                             f"control_{ctype}.safetensors")
        choice = p.get("preprocessor") or pp.PREPROCESSORS[ctype][0]
        image = _open_image(p.get("image"), f"{ctype} image")
        record = dict(control_type=ctype, preprocessor=choice, control_image_size=list(image.size))
        kw = {}
        if choice == "canny":
            kw.update(low=float(p.get("low", 100.0)), high=float(p.get("high", 200.0)))
            record.update(canny_low=kw["low"], canny_high=kw["high"])
        elif choice == "world":
            kw["net"] = self._domain_net(model, pipe, ctype)
        elif choice == "transformers":
            kw["model"] = self._hf_model(pipe, ctype)
        adapter = pipe.controls.get(ctype)
        if adapter is not None and adapter.cfg.label_map:
            kw["num_classes"] = adapter.cfg.in_channels
        return pp.preprocess(ctype, image, choice, size=pipe.resolution, **kw), record

    def _domain_net(self, model: str, pipe, ctype: str):
        """The world's depth or seg net that ships in the model's bundle (studio.domainnets)."""
        kind = "depth" if ctype == "depth" else "seg"
        if model not in self.domain_nets:
            from studio.domainnets import load_domain_nets

            folder = Path(str(pipe.source))
            self.domain_nets[model] = (load_domain_nets(folder, ("depth", "seg"), device=pipe.device)
                                       if folder.is_dir() else {})
        if kind not in self.domain_nets[model]:
            raise ValueError(f"the model {model!r} has no world {ctype} net ({kind}.safetensors in its bundle): "
                             f"choose the transformers preprocessor, or upload a {ctype} map (preprocessor none)")
        return self.domain_nets[model][kind]

    def _hf_model(self, pipe, ctype: str):
        """A transformers depth / segmentation model from the local Hugging Face cache (never downloaded;
        preprocess.WeightsNotCached says how to fetch it)."""
        from studio import preprocess as pp

        key = (ctype, str(pipe.device))
        if key not in self.hf_models:
            load = pp.load_depth_model if ctype == "depth" else pp.load_segmentation_model
            try:
                self.hf_models[key] = load(device=pipe.device)
            except ImportError as e:  # no transformers package: bad input for this studio, not a crash
                raise ValueError(str(e)) from e
        return self.hf_models[key]

    def _save(self, job_id, kind, pipe, out, record, keep_tokens, label, seconds) -> JobResult:
        """Write every image to the outputs folder first; only then is the result sent."""
        folder = self.outputs / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%H%M%S")
        images, paths, all_params, all_tokens = [], [], [], []
        labels = out.class_labels or []
        for i, im in enumerate(out.images):
            cid = labels[i] if i < len(labels) else (pipe.class_index(label) if label is not None else None)
            params = dict(record, index_in_batch=i, seconds=round(seconds, 3))
            if cid is not None and 0 <= cid < pipe.num_classes:
                params.update(class_id=int(cid), class_name=pipe.class_names[cid])
            else:
                params.update(class_id=None, class_name="unconditional")
            toks = [t[i].numpy().astype(np.int64) for t in out.tokens] if keep_tokens and out.tokens else None
            data = encode_png(im, params, toks)
            path = folder / f"{stamp}_{kind}_s{record['seed']}_{job_id[:6]}_{i}.png"
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            images.append(data)
            paths.append(str(path))
            all_params.append(params)
            all_tokens.append(toks)
        return JobResult(job_id, images, paths, all_params, all_tokens if keep_tokens else None,
                         dict(out.timings, total_job=seconds))


def _png_bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError("no image to re-roll was given")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:
        raise ValueError(f"the image to re-roll could not be read ({type(e).__name__})") from e
    return bytes(data)
