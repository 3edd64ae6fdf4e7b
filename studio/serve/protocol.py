"""What travels between the UI process and a worker process: plain dataclasses of numbers, strings
and bytes (no torch), and the messages on the pipe between them.

A job's parameters are the typed dataclasses of studio.params (one per job kind). The pipe carries
tuples whose first item says what they are:

    parent -> worker   ("job", seq, job_id, kind, model, params)   None: exit
                       ("batch", [(seq, job_id, kind, model, params), ...])   generate / guide / reroll, one model
    worker -> parent   ("ready", {"pid", "device", "models": {name: ModelInfo fields}})
                       ("fatal", message)                          the models could not be loaded
                       ("started", job_id)                         (per job of a batch)
                       ("scale", ScaleUpdate)                      after every scale
                       ("window", job_id, jpeg)                    out-painting: the canvas so far
                       ("done", JobResult) | ("error", job_id, message) | ("cancelled", job_id, message)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

FINISHED = ("done", "failed", "cancelled")  # a job's status once it has ended


class WorkerError(RuntimeError):
    """A worker could not start (bad model path, missing weights ...), with a readable reason."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # shown in the UI's model dropdown
    source: Optional[str]  # VARPipeline.from_pretrained's argument (None: the embedded default)
    # an Infinity model's T5 text encoder: a folder or a hub id (None: a T5 folder inside the weights
    # folder, else google/flan-t5-xl from the Hugging Face cache or hub); ignored by other models
    text_encoder: Optional[str] = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    class_names: List[str]
    resolution: int
    patch_nums: List[int]
    vocab_size: int
    controls: List[str] = ()  # the control types the model can be steered by (adapters, CAR files, ControlVAR's)
    control_family: str = ""  # "adapters" (ours), "car", "controlvar", or "" (no controls)
    control_preprocessors: Optional[Dict[str, List[str]]] = None  # control type -> its preprocessors, default first
    # "var" (class-conditional) or "infinity" (text-to-image: prompts, aspect ratios; no classes). For
    # Infinity, resolution and patch_nums describe its square size (the scales' widths).
    family: str = "var"
    aspect_ratios: List[str] = ()  # width:height choices of a text-to-image model
    defaults: Optional[dict] = None  # the model's own sampling defaults (guidance_scale, tau, top_k, top_p)

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
    preview: bytes  # JPEG; several images are tiled into one grid; b"" when previews are off
    seconds: float  # model time of this scale
    preview_seconds: float  # time spent making the preview
    elapsed: float  # since the job started on the worker
    window: int = 0  # out-painting: which window (1-based); 0 otherwise
    grid: Tuple[int, ...] = ()  # (h, w) of a non-square scale (Infinity); () = patch_num x patch_num


@dataclass(frozen=True)
class JobResult:
    job_id: str
    images: List[bytes]  # PNG files, parameters in their 'parameters' text chunk (studio.pngmeta)
    paths: List[str]  # where they were saved (before the result was sent), "" if not; none for a map
    params: List[dict]
    tokens: Optional[List[List[np.ndarray]]]  # per image, per scale (pn*pn,) token ids; None for edits
    timings: dict
    # why an image could not be saved (its path is then ""; its PNG is still in `images`); None: all saved
    save_error: Optional[str] = None


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
    wait_estimate: Optional[float] = None  # queued: seconds until it starts, from recent jobs (None: unknown)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED
