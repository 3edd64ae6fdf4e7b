"""What the live preview costs, seen from a client: the real app, driven through `gradio_client`.

    python -m lab.bench_client                          # the embedded default model, 5 runs per mode
    python -m lab.bench_client --model my_bundle/ --runs 9 --class volcano --device cuda

Starts `app.py` in its own process (loopback, a free port unless --port, outputs in a temporary
folder), waits until it serves, then times /generate in three preview modes: "full" (every scale
decoded), "fast" (the linear latent-to-RGB map) and "none" (no picture per scale, only the status:
the baseline). Every mode gets one warm-up run, then --runs runs with the same fixed seeds and the
same class (so every mode samples exactly the same tokens); the runs are interleaved, mode order
rotating, so a drift in machine load hits all modes alike. Printed per mode (medians):

- first preview: from submit to the first streamed preview image;
- total: from submit to the final image;
- previews: how many distinct previews the client received (the studio drops a preview the client
  was too slow to take, so this can be below the number of scales);
- worker preview: the time the worker spent making one preview (from the status lines);
- overhead: total time relative to "none".

The app is stopped at the end, also on Ctrl-C or an error. This process never imports torch.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from studio.params import VAR_DEFAULTS  # the studio's sampling defaults (plain Python, no torch)

ROOT = Path(__file__).resolve().parent.parent
MODES = ("full", "fast", "none")
MODE_LABELS = {"full": "full decode", "fast": "fast latent→RGB", "none": "previews off"}
SCALE = re.compile(r"Scale \*\*(\d+)/(\d+)\*\*")
PREVIEW_MS = re.compile(r"\(preview (\d+) ms\)")


# ---------------------------------------------------------------------------------------------
# the app in its own process (also used by tools/screenshot.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint():  # in the child before exec: Ctrl-C must work even if ours is ignored (a background job)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class AppProcess:
    """`python app.py ...` on loopback in a new process group; `stop()` ends it and its workers.

    model: a --model source, or None / "default" for the embedded default model."""

    def __init__(self, model: Optional[str] = None, port: Optional[int] = None, outputs: Optional[str] = None,
                 extra: Sequence[str] = (), start_timeout: float = 900.0, log=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._tmp = None
        if outputs is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="var-studio-bench-")
            outputs = self._tmp.name
        self.outputs = outputs
        self.cmd = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(self.port),
                    "--outputs", str(Path(outputs) / "outputs")]
        if model and model != "default":
            self.cmd += ["--model", str(model)]
        self.cmd += list(extra)
        self.start_timeout = start_timeout
        self.log_path = Path(outputs) / "app.log"
        self.proc: Optional[subprocess.Popen] = None
        self._log = log

    def start(self) -> "AppProcess":
        self._say(f"starting the app: {' '.join(self.cmd[1:])}")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_default_sigint if os.name == "posix" else None)
        deadline = time.monotonic() + self.start_timeout
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited (code {self.proc.returncode}) before serving:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not serve {self.url} in {self.start_timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)
        self._say(f"the app serves {self.url} ({time.monotonic() - t0:.1f} s to start)")
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Ctrl-C for the app (it closes the server and its workers), then the whole group if needed."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self._kill_group(proc.pid, signal.SIGKILL)
                        proc.wait(5)
            self._kill_group(proc.pid, signal.SIGKILL)  # a worker left behind, if any
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @staticmethod
    def _kill_group(pgid: int, sig) -> None:
        if hasattr(os, "killpg"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def _say(self, text: str) -> None:
        if self._log:
            self._log(text)

    def __enter__(self) -> "AppProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM -> SystemExit, so `finally` blocks (stopping the app) run for `kill` as for Ctrl-C."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------
# timing one generation


@dataclass
class Run:
    mode: str
    seed: int
    first_preview: Optional[float]  # seconds from submit; None when no preview came
    total: float  # seconds from submit to the final image
    previews: int  # distinct preview images received
    scales_seen: int  # distinct "Scale k/N" status lines received
    num_scales: int
    worker_preview_ms: List[float] = field(default_factory=list)


def _file_path(value) -> Optional[str]:
    if isinstance(value, dict):
        if value.get("__type__") == "update":
            return None
        return value.get("path") or value.get("url")
    return value if isinstance(value, str) and value else None


# gradio_client's HTTP requests other than the streams (the POST that queues a job) use httpx's default
# limit of 5 s; a web process starved of CPU (other programs, 16 clients' streams) can take longer to
# answer, and the job is then lost. The benchmarks' clients wait this long instead (seconds).
HTTP_TIMEOUT_S = 300.0


def make_client(url: str):
    """A gradio_client Client for the benchmarks: no downloads, patient HTTP requests (HTTP_TIMEOUT_S)."""
    import httpx
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False,
                  httpx_kwargs={"timeout": httpx.Timeout(HTTP_TIMEOUT_S, connect=60.0)})


def job_outputs(job, deadline: Optional[float] = None, poll: float = 0.001):
    """A gradio_client job's outputs as they stream, ending when the job ends. Unlike iterating the
    job, a job whose request failed (its future holds the error, and no status ever comes) raises that
    error instead of waiting forever; past `deadline` (time.monotonic()) a TimeoutError."""
    seen = 0
    while True:
        done = job.done()  # before reading the outputs: all of them are in once it is done
        outputs = job.outputs()
        while seen < len(outputs):
            yield outputs[seen]
            seen += 1
        if done:
            if not job.cancelled() and job.exception() is not None:
                raise job.exception()
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("no result before the round's time limit")
        time.sleep(poll)


def time_generation(client, mode: str, seed: int, class_name: str, jobs: Optional[list] = None,
                    deadline: Optional[float] = None, **sampling) -> Run:
    """Submit one /generate and time what streams back (client-side clock, 1 ms polling).
    `jobs`, when given, gets the submitted job (so an interrupted run can be cancelled); past
    `deadline` (time.monotonic()) the wait ends with a TimeoutError."""
    t0 = time.perf_counter()
    job = client.submit(class_name=class_name, seed=seed, preview=mode, num_images=1, api_name="/generate",
                        **sampling)
    if jobs is not None:
        jobs.append(job)
    first, total, previews, scales, num_scales, ms = None, None, set(), set(), 0, []
    for out in job_outputs(job, deadline):
        t = time.perf_counter() - t0
        status = out[1] if isinstance(out[1], str) else ""
        if status.startswith("✓ Done"):
            total = t
            break
        m = SCALE.search(status)
        if m is None:
            continue  # queue / starting messages
        scales.add(int(m.group(1)))
        num_scales = int(m.group(2))
        if (p := PREVIEW_MS.search(status)) and mode != "none":
            ms.append(float(p.group(1)))
        path = _file_path(out[0])
        if path and path not in previews:
            previews.add(path)
            if first is None:
                first = t
    final = job.result()  # raises the app's error, if any
    if total is None or not final[3]:
        raise RuntimeError(f"the {mode} run (seed {seed}) ended without a result: {final[1]!r}")
    return Run(mode, seed, first, total, len(previews), len(scales), num_scales, ms)


def close_client(client, jobs=()) -> None:
    """Cancel unfinished jobs and let their streams end before the app goes (no stray tracebacks)."""
    for job in jobs:
        if not job.done():
            with contextlib.suppress(Exception):
                job.cancel()
                deadline = time.monotonic() + 5
                while not job.done() and time.monotonic() < deadline:
                    time.sleep(0.02)
    with contextlib.suppress(Exception):
        client.close()


# ---------------------------------------------------------------------------------------------
# the benchmark


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: Sequence[Run]) -> Dict[str, dict]:
    rows = {}
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        rows[mode] = dict(runs=len(rs), first_preview=_median(r.first_preview for r in rs),
                          total=_median(r.total for r in rs), previews=_median(r.previews for r in rs),
                          num_scales=max(r.num_scales for r in rs),
                          worker_preview_ms=_median(m for r in rs for m in r.worker_preview_ms))
    base = rows.get("none", {}).get("total")
    for row in rows.values():
        row["overhead_pct"] = 100.0 * (row["total"] - base) / base if base else None
    return rows


def format_table(rows: Dict[str, dict]) -> str:
    def sec(v):
        return f"{v:.3f} s" if v is not None else "—"

    def num(v):
        return f"{v:g}" if v is not None else "—"

    header = ["mode", "first preview", "total", "previews", "worker preview", "overhead vs none"]
    lines = []
    for mode, r in rows.items():
        over = "baseline" if mode == "none" else (f"{r['overhead_pct']:+.1f} %" if r["overhead_pct"] is not None
                                                  else "—")
        lines.append([f"{mode} ({MODE_LABELS[mode]})", sec(r["first_preview"]), sec(r["total"]),
                      f"{num(r['previews'])}/{r['num_scales']}",
                      f"{r['worker_preview_ms']:.0f} ms" if r["worker_preview_ms"] is not None else "—", over])
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def run_benchmark(client, runs: int, class_name: str, modes: Sequence[str] = MODES, warmup: int = 1,
                  log=print, jobs: Optional[list] = None, **sampling) -> List[Run]:
    for mode in modes:
        for w in range(warmup):
            r = time_generation(client, mode, 10_000 + w, class_name, jobs, **sampling)
            log(f"warm-up  {mode:<4}  total {r.total:.3f} s")
    done = []
    for i in range(runs):
        k = i % len(modes)
        for mode in list(modes[k:]) + list(modes[:k]):  # rotate the order every round
            r = time_generation(client, mode, i, class_name, jobs, **sampling)
            done.append(r)
            first = f"{r.first_preview:.3f} s" if r.first_preview is not None else "—"
            log(f"run {i + 1}/{runs}  {mode:<4}  first preview {first:>8}  total {r.total:.3f} s  "
                f"previews {r.previews}/{r.num_scales}")
    return done


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time the studio's live preview modes through gradio_client")
    ap.add_argument("--model", default="default", help="a model source for app.py --model, or 'default' "
                                                       "(the embedded default model)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per mode, after one warm-up (default 5)")
    ap.add_argument("--port", type=int, default=None, help="port for the app (default: a free one)")
    ap.add_argument("--class", dest="class_name", default="0", help="class name or id for every run (default 0)")
    ap.add_argument("--guidance", type=float, default=VAR_DEFAULTS["guidance_scale"],
                    help=f"guidance scale (default {VAR_DEFAULTS['guidance_scale']})")
    ap.add_argument("--device", default=None, help="app.py --device (default: the app's choice)")
    ap.add_argument("--threads", type=int, default=None, help="app.py --threads (torch threads in the worker)")
    ap.add_argument("--preview-error", action=argparse.BooleanOptionalAction, default=True,
                    help="also print the fast preview's colour error per scale (in this process)")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the app to serve")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return args


def preview_error_table(model: str, num_images: int = 4, seed: int = 1) -> str:
    """The fast preview's colour error per scale (mean |fast - decode of the same f_hat|, 0..255, on
    the latent grid, `num_images` samples): the map the worker uses (the bundle's, fitted on the
    model's own samples) beside the CPU fallback (a linear map fitted on random colour patches)."""
    from studio import preview
    from studio.pipeline import VARPipeline
    from studio.serve.runner import Previewer

    pipe = VARPipeline.from_pretrained(None if model in (None, "default") else model)
    f_hats = preview.sample_prefixes(pipe, num_images, seed)
    maps = {"linear on random patches (fallback)": Previewer(pipe, pipe.resolution).fit_linear_on_patches()}
    if pipe.fast_preview is not None:
        maps["the bundle's map (model's own samples)"] = pipe.fast_preview
    head = ["fast preview colour error"] + [f"{p}x{p}" for p in pipe.patch_nums]
    lines = [head]
    for name, fmap in maps.items():
        errs = preview.colour_error_per_scale(pipe, fmap, f_hats=f_hats)
        lines.append([name] + [f"{e:.1f}" for e in errs])
    w = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = [f"fast preview colour error per scale (0-255, mean |fast - decode|, {num_images} samples, seed {seed})"]
    out += ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gradio_client.exceptions import AppError

    def log(text):
        print(text, flush=True)

    extra = (["--device", args.device] if args.device else []) + (["--threads", str(args.threads)]
                                                                  if args.threads else [])
    app = AppProcess(args.model, port=args.port, extra=extra, start_timeout=args.start_timeout, log=log)
    try:
        with terminate_as_exit(), app:
            client, jobs = make_client(app.url), []
            try:
                runs = run_benchmark(client, args.runs, args.class_name, log=log, jobs=jobs,
                                     guidance_scale=args.guidance)
            finally:
                close_client(client, jobs[-1:])
            rows = summarize(runs)
            print()
            print(f"VAR Studio client benchmark · model {args.model} · class {args.class_name} · "
                  f"guidance {args.guidance:g} · medians of {args.runs} run(s) per mode after 1 warm-up")
            print(format_table(rows))
        if args.preview_error:
            print()
            print(preview_error_table(args.model))
    except KeyboardInterrupt:
        print("interrupted; the app is stopped", file=sys.stderr)
        return 130
    except (RuntimeError, AppError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
