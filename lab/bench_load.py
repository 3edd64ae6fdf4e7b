"""Many users at once: throughput, latency and time to the first preview through the real app.

    python -m lab.bench_load                              # 1, 4 and 16 clients, batching off and on
    python -m lab.bench_load --clients 1,8 --jobs 4 --model my_bundle/
    python -m lab.bench_load --soak 500                   # memory over 500 small jobs (and one big one)

Starts `app.py` twice on loopback (lab.bench_client.AppProcess), one with --no-batching and one
with --batching, and runs rounds of N concurrent gradio_client clients against each in turn (the
two rounds of one N back to back, so a drift in the machine's load hits both alike) (each its own
browser session) that submit /generate one after another, --jobs each, with fixed seeds (the same
seeds in both runs) and the app's default preview. Bounded: every round ends after its jobs (or
--round-timeout: no job starts after it, those running get 30 s more). Printed per round:

- jobs, of: the jobs that finished, of those planned (clients x --jobs); every one that did not is
  listed under the table with what became of it and why (failed: the error; unfinished: no result in
  time; not started: the time limit had passed, or its client never came back), never silently fewer;
- jobs/min: finished jobs over the round's wall time (from the first submit to the last result);
- p50 / p95 latency: from submit to the final image, over every job of the round;
- first preview p50: from submit to the first streamed preview picture;
- x off: jobs/min relative to the same number of clients without batching;
- RSS: the app and its workers' resident memory after the round;
- CPU s/job: processor time (user + system) per finished job spent in the web process (Gradio,
  the page's handlers, streaming), in the workers (the model) and in this benchmark's own clients,
  over the round: where a job's time goes outside the model (`python -m lab.bench_batch_stages`
  splits the worker's part into stages).

--soak N runs one app (batching on) instead: --soak-clients clients share N small generations
(one image, no preview, fixed seeds) and the web process's and the workers' resident memory is
printed at the start (after a warm-up job), after a big out-painting (--soak-big, on by default: a
256x256 picture out-painted by 128 px on every side, many windows), every --soak-every jobs and at
the end, each beside the start's (the baseline), so a leak shows as a growing column.

This process never imports torch.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lab.bench_client import AppProcess, close_client, make_client, terminate_as_exit, time_generation

# what became of a planned job that did not finish: every one is counted under one of these, with why
FAILED, UNFINISHED, NOT_STARTED = "failed", "unfinished", "not started"
GRACE_S = 30.0  # after the round's time limit no job starts; those running get this long to finish


@dataclass
class Round:
    batching: bool
    clients: int
    jobs: int  # finished
    failed: int
    seconds: float
    latencies: List[float]
    first_previews: List[float]
    rss_mb: Optional[float]
    cpu: Tuple[Optional[float], Optional[float], float] = (None, None, 0.0)  # web, workers, clients: seconds
    planned: int = 0  # clients x jobs each
    missing: Dict[str, int] = field(default_factory=dict)  # "failed: why" (or unfinished, not started) -> jobs

    @property
    def jobs_per_min(self) -> float:
        return 60.0 * self.jobs / self.seconds if self.seconds > 0 else 0.0

    def missing_text(self) -> str:
        """Every planned job that did not finish, and why ("" when all did)."""
        if not self.missing:
            return ""
        return (f"{self.planned - self.jobs} of {self.planned} jobs did not finish: "
                + "; ".join(f"{n} {why}" for why, n in sorted(self.missing.items(), key=lambda kv: -kv[1])))


def describe(error: BaseException) -> str:
    """An error in one line: its type and the start of its message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def drive(clients: int, jobs: int, run_job: Callable[[int, int, float], object], timeout: float,
          grace: float = GRACE_S, log=print) -> Tuple[List[List[tuple]], float]:
    """`clients` users at once, each running its `jobs` jobs one after another: run_job(i, k, until)
    returns job k of client i's result or raises (`until`: the time.monotonic() by which it must give
    up). No job starts after `timeout` seconds; running ones get `grace` more. Returns (outcomes,
    seconds): outcomes[i][k] is ("done", result) or (FAILED | UNFINISHED | NOT_STARTED, why) for every
    planned job, none left out (a client that never came back is not waited for, and says so)."""
    deadline = time.monotonic() + timeout
    until = deadline + grace
    outcomes: List[List[Optional[tuple]]] = [[None] * jobs for _ in range(clients)]

    def user(i: int):
        for k in range(jobs):
            if time.monotonic() > deadline:
                for rest in range(k, jobs):
                    outcomes[i][rest] = (NOT_STARTED, f"the round's time limit ({timeout:g} s) had passed")
                return
            outcomes[i][k] = (UNFINISHED, f"no result {grace:g} s after the round's time limit ({timeout:g} s)")
            try:
                result = run_job(i, k, until)
            except Exception as e:  # a failed job is counted with its reason, the user goes on
                outcomes[i][k] = (FAILED, describe(e))
                log(f"  client {i} job {k} failed: {describe(e)}")
                continue
            outcomes[i][k] = ("done", result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, until + min(5.0, grace) - time.monotonic()))
    seconds = time.perf_counter() - t0
    stuck = (NOT_STARTED, "its client never came back from an earlier job")
    return [[o if o is not None else stuck for o in row] for row in outcomes], seconds


def missing_jobs(outcomes: Sequence[Sequence[tuple]]) -> Dict[str, int]:
    """How many planned jobs did not finish, by what became of them and why."""
    return dict(collections.Counter(f"{status}: {why}" for row in outcomes for status, why in row
                                    if status != "done"))


def _pct(values: Sequence[float], q: float) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


def tree_rss_mb(pid: int) -> Optional[float]:
    try:
        import psutil
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
        return sum(p.memory_info().rss for p in procs) / 2 ** 20
    except Exception:
        return None


def app_cpu_s(pid: int) -> Tuple[Optional[float], Optional[float]]:
    """(the web process's CPU seconds, its workers' summed), user + system, since they started."""
    try:
        import psutil
        root = psutil.Process(pid)
        workers = [c for c in root.children(recursive=True)
                   if "resource_tracker" not in " ".join(c.cmdline())]

        def cpu(p):
            t = p.cpu_times()
            return t.user + t.system
        return cpu(root), sum(cpu(c) for c in workers)
    except Exception:
        return None, None


def run_round(app: AppProcess, batching: bool, clients: int, jobs: int, class_name: str, timeout: float,
              log=print) -> Round:
    made = [make_client(app.url) for _ in range(clients)]
    cpu0, own0 = app_cpu_s(app.proc.pid) if app.proc else (None, None), time.process_time()
    submitted: List[list] = [[] for _ in range(clients)]

    def run_job(i: int, k: int, until: float):
        return time_generation(made[i], "fast", seed=1000 * i + k, class_name=class_name, jobs=submitted[i],
                               deadline=until)

    outcomes, seconds = drive(clients, jobs, run_job, timeout, log=log)
    cpu1, own1 = app_cpu_s(app.proc.pid) if app.proc else (None, None), time.process_time()
    for c, js in zip(made, submitted):
        close_client(c, js[-1:])
    runs = [result for row in outcomes for status, result in row if status == "done"]
    cpu = tuple(None if a is None or b is None else b - a for a, b in zip(cpu0, cpu1)) + (own1 - own0,)
    return Round(batching, clients, len(runs), sum(1 for row in outcomes for o in row if o[0] == FAILED), seconds,
                 [r.total for r in runs], [r.first_preview for r in runs if r.first_preview is not None],
                 tree_rss_mb(app.proc.pid) if app.proc else None, cpu, planned=clients * jobs,
                 missing=missing_jobs(outcomes))


def app_rss_mb(pid: int) -> Tuple[Optional[float], Optional[float]]:
    """(the web process's RSS, its workers' RSS summed), MB; the worker processes are the app's
    multiprocessing children other than its resource tracker."""
    try:
        import psutil
        root = psutil.Process(pid)
        workers = [c for c in root.children(recursive=True)
                   if "resource_tracker" not in " ".join(c.cmdline())]
        return root.memory_info().rss / 2 ** 20, sum(c.memory_info().rss for c in workers) / 2 ** 20
    except Exception:
        return None, None


@dataclass
class Sample:
    label: str
    jobs: int
    seconds: float
    web_mb: Optional[float]
    worker_mb: Optional[float]


def big_outpaint(client, folder: Path) -> float:
    """One large out-painting through the page's API: a 256x256 picture by 128 px on every side."""
    from gradio_client import handle_file
    from PIL import Image

    path = folder / "soak_picture.png"
    Image.new("RGB", (256, 256), "seagreen").save(path)
    t0 = time.perf_counter()
    out = client.predict(api_name="/outpaint", image={"background": handle_file(str(path)), "layers": [],
                                                      "composite": None},
                         left=128, right=128, top=128, bottom=128, seed=7, preview="none")
    if not str(out[1]).startswith("✓ Done"):
        raise RuntimeError(f"the big out-painting did not finish: {out[1]!r}")
    return time.perf_counter() - t0


def soak(app: AppProcess, jobs: int, clients: int, every: int, class_name: str, big: bool, timeout: float,
         log=print, stall: float = 120.0) -> List[Sample]:
    """`jobs` small generations from `clients` sessions; memory sampled at the start, after the big
    job, every `every` jobs and at the end."""
    made = [make_client(app.url) for _ in range(clients)]
    samples: List[Sample] = []
    t_start = time.perf_counter()

    def sample(label: str, done: int):
        web, workers = app_rss_mb(app.proc.pid)
        samples.append(Sample(label, done, time.perf_counter() - t_start, web, workers))
        log(f"  {label}: {done} jobs, web {web or 0:.0f} MB, workers {workers or 0:.0f} MB")

    time_generation(made[0], "none", seed=0, class_name=class_name)  # warm-up: the page, the queue, one job
    sample("start", 0)
    if big:
        seconds = big_outpaint(made[0], Path(app.outputs))
        sample(f"after a big out-painting ({seconds:.0f} s)", 0)
    counter, done, failed, lock = iter(range(jobs)), [0], [0], threading.Lock()
    deadline = time.monotonic() + timeout
    submitted: List[list] = [[] for _ in range(clients)]

    def user(i: int):
        while time.monotonic() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            try:
                time_generation(made[i], "none", seed=10_000 + k, class_name=class_name, jobs=submitted[i],
                                deadline=deadline)
            except Exception as e:
                with lock:
                    failed[0] += 1
                log(f"  client {i} job {k} failed: {describe(e)}")
                continue
            with lock:
                done[0] += 1
                if done[0] % every == 0 and done[0] < jobs:
                    sample(f"after {done[0]} jobs", done[0])
            submitted[i].clear()

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    # the end: every job answered, or none for `stall` seconds (a client whose stream never ends:
    # the app is not waited for, it is sampled as it is and the stuck clients are counted)
    last, seen = time.monotonic(), 0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.5)
        with lock:
            now_done = done[0] + failed[0]
        if now_done != seen:
            last, seen = time.monotonic(), now_done
        elif time.monotonic() - last > stall:
            log(f"  no job answered for {stall:.0f} s: {sum(t.is_alive() for t in threads)} client(s) still waiting")
            break
    stuck = sum(t.is_alive() for t in threads)
    left = jobs - done[0] - failed[0] - stuck  # never started: the time limit passed, or the run stalled
    sample(f"end ({failed[0]} failed{f', {stuck} clients stuck' if stuck else ''}"
           f"{f', {left} not started' if left > 0 else ''})", done[0])
    closers = [threading.Thread(target=close_client, args=(c, js[-1:]), daemon=True)
               for c, js in zip(made, submitted)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(10)
    return samples


def format_soak(samples: Sequence[Sample]) -> str:
    base = samples[0]

    def mb(v):
        return "-" if v is None else f"{v:.0f}"

    def delta(v, b):
        return "-" if v is None or b is None else f"{v - b:+.0f}"

    head = ["when", "jobs", "s", "web MB", "web vs start", "workers MB", "workers vs start"]
    rows = [head] + [[s.label, str(s.jobs), f"{s.seconds:.0f}", mb(s.web_mb), delta(s.web_mb, base.web_mb),
                      mb(s.worker_mb), delta(s.worker_mb, base.worker_mb)] for s in samples]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def format_table(rounds: Sequence[Round]) -> str:
    base = {r.clients: r.jobs_per_min for r in rounds if not r.batching}
    head = ["batching", "clients", "jobs", "of", "failed", "jobs/min", "p50 s", "p95 s", "1st preview p50 s", "x off",
            "RSS MB", "CPU s/job: web", "workers", "clients"]
    rows = [head]
    for r in rounds:
        def sec(v):
            return "-" if v is None else f"{v:.2f}"
        ratio = r.jobs_per_min / base[r.clients] if base.get(r.clients) else None
        rows.append(["on" if r.batching else "off", str(r.clients), str(r.jobs), str(r.planned), str(r.failed),
                     f"{r.jobs_per_min:.1f}", sec(_pct(r.latencies, 0.5)), sec(_pct(r.latencies, 0.95)),
                     sec(statistics.median(r.first_previews) if r.first_previews else None),
                     "-" if ratio is None else f"{ratio:.2f}x", "-" if r.rss_mb is None else f"{r.rss_mb:.0f}"]
                    + ["-" if v is None or not r.jobs else f"{v / r.jobs:.2f}" for v in r.cpu])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    for r in rounds:  # never silently fewer: each job that did not finish, and why
        if r.missing:
            lines.append(f"batching {'on' if r.batching else 'off'}, {r.clients} client(s): {r.missing_text()}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Load benchmark: N concurrent clients, batching off and on")
    ap.add_argument("--model", default="default", help="app.py --model source, or 'default' (the embedded model)")
    ap.add_argument("--clients", default="1,4,16", help="comma list of concurrent clients per round")
    ap.add_argument("--jobs", type=int, default=3, help="jobs each client submits, one after another (default 3)")
    ap.add_argument("--class", dest="class_name", default="0", help="class name or id for every job (default 0)")
    ap.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round may take at most")
    ap.add_argument("--threads", type=int, default=None, help="app.py --threads (default: the app's choice)")
    ap.add_argument("--device", default=None, help="app.py --device")
    ap.add_argument("--max-batch", type=int, default=16, help="app.py --max-batch")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="instead of the rounds: N small jobs on one app, memory printed along the way")
    ap.add_argument("--soak-clients", type=int, default=4, help="concurrent clients of the soak (default 4)")
    ap.add_argument("--soak-every", type=int, default=100, help="print memory every this many jobs (default 100)")
    ap.add_argument("--soak-big", action=argparse.BooleanOptionalAction, default=True,
                    help="one big out-painting after the start's sample (default: on)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]

    def log(text):
        print(text, flush=True)

    common = (["--threads", str(args.threads)] if args.threads else []) + (
        ["--device", args.device] if args.device else []) + ["--max-batch", str(args.max_batch),
                                                              "--max-queued", str(max(8, args.jobs))]
    rounds: List[Round] = []
    if args.soak:
        try:
            with terminate_as_exit(), AppProcess(args.model, extra=common + ["--batching"],
                                                 start_timeout=args.start_timeout, log=log) as app:
                samples = soak(app, args.soak, args.soak_clients, args.soak_every, args.class_name, args.soak_big,
                               args.round_timeout * max(1, args.soak // 50), log)
        except KeyboardInterrupt:
            print("interrupted; the app is stopped", file=sys.stderr)
            return 130
        print()
        print(f"VAR Studio soak · model {args.model} · {args.soak} small jobs from {args.soak_clients} clients · "
              "resident memory (RSS), the start's row is the baseline")
        print(format_soak(samples))
        return 0
    try:
        with terminate_as_exit(), contextlib.ExitStack() as stack:
            apps = {batching: stack.enter_context(AppProcess(
                args.model, extra=common + ["--batching" if batching else "--no-batching"],
                start_timeout=args.start_timeout, log=log)) for batching in (False, True)}
            for batching, app in apps.items():
                run_round(app, batching, 1, 1, args.class_name, args.round_timeout, log)  # warm-up
            for n in clients:  # off and on back to back, so that a drift in the machine's load hits both alike
                for batching, app in apps.items():
                    r = run_round(app, batching, n, args.jobs, args.class_name, args.round_timeout, log)
                    log(f"batching {'on' if batching else 'off'}, {n} client(s): {r.jobs} of {r.planned} jobs in "
                        f"{r.seconds:.1f} s ({r.jobs_per_min:.1f}/min), load average {os.getloadavg()[0]:.2f}")
                    if r.missing:
                        log(f"  {r.missing_text()}")
                    rounds.append(r)
            rounds.sort(key=lambda r: (r.batching, r.clients))
    except KeyboardInterrupt:
        print("interrupted; the app is stopped", file=sys.stderr)
        return 130
    print()
    load = " · load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"VAR Studio load benchmark · model {args.model} · {args.jobs} job(s) per client · loopback"
          f"{f' · --threads {args.threads}' if args.threads else ''}{load}")
    print(format_table(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
