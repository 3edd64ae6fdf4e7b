"""VAR Studio: serve the browser studio.

    python app.py                                  # the embedded default model, http://127.0.0.1:7860
    python app.py --model weights/:d16 --model weights/:d30 --device cuda:0 --device cuda:1
    python app.py --model my_bundle/ --preview full --outputs ~/var-outputs
    python app.py --host 0.0.0.0 --auth alice:secret     # beyond loopback a login is required
    python app.py --model weights/infinity-2b --text-encoder weights/flan-t5-xl   # text-to-image, T5 from a folder

Limits, auth and where outputs go: docs/operations.md.

The models live in worker processes (one per --device); this process runs the web server only and
never imports torch.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from studio.serve.limits import Limits
from studio.serve.outputs import folder_problem
from studio.serve.pool import ModelSpec, WorkerError, WorkerPool
from studio.serve.security import auth_problem, is_loopback, parse_auth


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="VAR Studio: a browser studio for next-scale prediction models")
    ap.add_argument("--model", action="append", default=None, metavar="SOURCE",
                    help="a folder of official weights (folder:d16 picks the depth), one of our bundles or a hub id; "
                         "repeat for several models (default: the embedded model)")
    ap.add_argument("--text-encoder", default=None, metavar="PATH_OR_HUB_ID",
                    help="the T5 text encoder of the Infinity models: a folder (flan-t5-xl saved with transformers) "
                         "or a hub id (default: a T5 folder inside the model's folder, else google/flan-t5-xl from "
                         "the Hugging Face cache, or the hub when online); checked at start")
    ap.add_argument("--device", action="append", default=None,
                    help="cpu, cuda, cuda:1 ...; repeat for one worker per device (default: cuda if present, else cpu)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--outputs", default="outputs", help="folder where every result is saved (default: outputs/)")
    ap.add_argument("--preview", choices=["fast", "full", "none"], default="fast",
                    help="the live preview's default (each request can ask for another): a fast linear latent-to-RGB "
                         "map of every scale (default), a full decode of every scale (costs a decode per scale), "
                         "or none (status only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: chosen before every job from the cores other programs "
                         "leave free, shared among the CPU workers)")
    ap.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                    help="run waiting generations of one model as one batch (default: on)")
    ap.add_argument("--max-batch", type=int, default=16, help="the most images in one batch (default 16)")
    ap.add_argument("--max-queued", type=int, default=8, help="jobs one browser session may have waiting (default 8)")
    ap.add_argument("--job-timeout", type=float, default=600.0,
                    help="seconds a job (or a batch) may run before its worker is restarted (default 600)")
    ap.add_argument("--heartbeat-timeout", type=float, default=30.0,
                    help="seconds a worker may go silent before it is restarted (default 30)")
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="seconds a stopped job may take to reach its next scale before its worker is restarted "
                         "(default 30)")
    ap.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                    help="require a login (repeat for several users; @FILE reads USER:PASSWORD lines); needed "
                         "with a --host other than loopback")
    ap.add_argument("--insecure-no-auth", action="store_true",
                    help="serve a non-loopback --host without a login (anyone who reaches the port can use it)")
    d = Limits()
    ap.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                    help=f"largest uploaded file, MB (default {d.max_upload_mb:g})")
    ap.add_argument("--max-upload-megapixels", type=float, default=d.max_upload_megapixels,
                    help=f"largest uploaded image, read from its header before decoding (default "
                         f"{d.max_upload_megapixels:g})")
    ap.add_argument("--max-job-megapixels", type=float, default=d.max_job_megapixels,
                    help=f"an edit's result megapixels x its images (default {d.max_job_megapixels:g})")
    ap.add_argument("--max-outpaint-windows", type=int, default=d.max_outpaint_windows,
                    help=f"model runs one out-painting may take (default {d.max_outpaint_windows}, at most 64)")
    ap.add_argument("--max-heavy-jobs", type=int, default=d.max_heavy_jobs,
                    help=f"jobs with uploads over {d.heavy_megapixels:g} megapixels handled at once "
                         f"(default {d.max_heavy_jobs})")
    ap.add_argument("--scale-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # demos/tests of streaming
    return ap.parse_args(argv)


def model_specs(sources: Optional[List[str]], text_encoder: Optional[str] = None) -> List[ModelSpec]:
    """--model values -> named models (the names fill the model dropdown); --text-encoder goes with
    each (an Infinity model reads it, the others ignore it)."""
    if not sources:
        return [ModelSpec("default", None, text_encoder)]
    specs, used = [], set()
    for src in sources:
        m = re.match(r"^(.*?)(?::(d\d+))?$", src)
        base, variant = m.group(1), m.group(2)
        name = Path(base.rstrip("/")).name or base
        if "/" in base and not Path(base).exists():  # a hub id keeps its owner
            name = base
        name += f":{variant}" if variant else ""
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name} ({k})", k + 1
        used.add(unique)
        specs.append(ModelSpec(unique, src, text_encoder))
    return specs


def create_pool(args: argparse.Namespace, limits: Optional[Limits] = None) -> WorkerPool:
    """The worker pool of the flags; its workers hold every job to the same --max-* limits as the page."""
    return WorkerPool(model_specs(args.model, args.text_encoder), devices=args.device or ["auto"], outputs=args.outputs,
                      preview=args.preview, scale_delay=args.scale_delay, torch_threads=args.threads,
                      batching=args.batching, max_batch_images=args.max_batch, max_queued_per_session=args.max_queued,
                      job_timeout=args.job_timeout, heartbeat_timeout=args.heartbeat_timeout,
                      stop_timeout=args.stop_timeout, limits=limits or Limits.from_args(args))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def outputs_problem(folder) -> Optional[str]:
    problem = folder_problem(folder)
    if problem:
        return (f"results cannot be saved in the outputs folder {Path(folder).resolve()}: {problem}; "
                "choose another with --outputs")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:  # every refusal before anything starts: a message and exit code 2
        limits = Limits.from_args(args)
        auth = parse_auth(args.auth)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = auth_problem(args.host, auth, args.insecure_no_auth) or outputs_problem(args.outputs)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.insecure_no_auth and auth is None and not is_loopback(args.host):
        print(f"warning: serving {args.host} without a login (--insecure-no-auth)", file=sys.stderr)
    pool = create_pool(args, limits)
    print(f"loading {', '.join(s.name for s in pool.model_specs)} on {', '.join(pool.devices)} ...", flush=True)
    pool.start(wait=False)
    from studio.serve import ui  # Gradio loads while the workers load the models

    try:
        pool.wait_ready()
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ui.patch_gradio()
    studio = ui.Studio(pool, limits)
    # SIGTERM (a service manager, kill) stops the server as Ctrl-C does, so the workers are closed
    # and the private temp folder removed
    signal.signal(signal.SIGTERM, _interrupt)
    demo = ui.build_ui(studio)
    try:
        ui.launch(demo, studio, host=args.host, port=args.port, auth=auth)
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
