"""The serving limits, checked before any work: upload bytes and pixels (from the file's header, in
the web process, before anything is decoded), a job's cost (megapixels x images, out-painting's
windows), how many heavy jobs run at once; and memory handed back after a big one.

    limits = Limits.from_args(args)                       # app.py's --max-* flags (docs/operations.md)
    limits.check_upload(path, "image")                    # bytes and pixels, header only
    limits.check_job("outpaint", params, {"image": (w, h)})   # UserError naming the limit
    with limits.heavy(megapixels):                        # at most max_heavy_jobs big images at once
        ...
    release_memory()                                      # after a big job: free()d pages go back

Plain Python (numpy and PIL, no torch): the web process imports it; the worker process gets the
same limits from the pool (WorkerPool(limits=...), from the same flags) and checks every job as it
arrives with `check_arrived` (its pictures' bytes and pixels from their headers, its cost), so a
program that reaches the worker by another path than the page is refused by name too.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

from studio import params as P
from studio.params import UserError
from studio.uploads import check_image_size, image_header, megapixels
from studio.windows import MAX_WINDOWS, MIN_SIDE, count_windows


@dataclass(frozen=True)
class Limits:
    """Every limit, with the flag that changes it (app.py; docs/operations.md lists them)."""

    max_upload_mb: float = 25.0  # --max-upload-mb: one uploaded file, in MB (Gradio refuses more before storing it)
    max_upload_megapixels: float = 16.0  # --max-upload-megapixels: one uploaded image (from its header)
    max_job_megapixels: float = 64.0  # --max-job-megapixels: an edit's result size x its number of images
    max_outpaint_windows: int = 32  # --max-outpaint-windows: model runs one out-painting may take
    heavy_megapixels: float = 4.0  # a job whose uploads hold more than this is "heavy"
    max_heavy_jobs: int = 2  # --max-heavy-jobs: heavy jobs decoded and running at once in the web process

    FLAGS = {"max_upload_mb": "--max-upload-mb", "max_upload_megapixels": "--max-upload-megapixels",
             "max_job_megapixels": "--max-job-megapixels", "max_outpaint_windows": "--max-outpaint-windows",
             "max_heavy_jobs": "--max-heavy-jobs"}

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v or v <= 0:
                raise ValueError(f"{self.FLAGS.get(f.name, f.name)} must be a positive number, got {v!r}")
        if self.max_outpaint_windows > MAX_WINDOWS:
            raise ValueError(f"--max-outpaint-windows can be at most {MAX_WINDOWS} (the worker's own cap)")
        object.__setattr__(self, "_heavy", threading.BoundedSemaphore(int(self.max_heavy_jobs)))

    @classmethod
    def from_args(cls, args) -> "Limits":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_upload_pixels(self) -> int:
        return int(self.max_upload_megapixels * 1e6)

    # -- uploads -----------------------------------------------------------------------------------
    def check_upload(self, source: Union[str, Path, bytes], what: str) -> Tuple[int, int]:
        """An uploaded file's (width, height), from its header: refused (UserError naming the limit)
        when it is too many bytes or pixels or not a PNG, JPEG or WebP. Nothing is decoded."""
        self.check_bytes(len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source), what)
        w, h, _ = image_header(source, what)
        check_image_size(w, h, what, self.max_upload_pixels, setting=self.FLAGS["max_upload_megapixels"])
        return w, h

    def check_bytes(self, size: int, what: str) -> None:
        if size > self.max_upload_bytes:
            raise UserError(f"the {what} is a {size / 1e6:.1f} MB file; the limit is {self.max_upload_mb:g} MB "
                            f"(the server's {self.FLAGS['max_upload_mb']})")

    @property
    def max_picture_bytes(self) -> int:
        """The most bytes a picture may have when it reaches the worker: the upload limit, or (when
        larger) an uncompressed RGBA PNG of the pixel limit, since the web process sends the pictures
        it decoded as PNGs (a 5 MB JPEG can become a 40 MB PNG)."""
        return max(self.max_upload_bytes, 4 * self.max_upload_pixels + 1_000_000)

    def check_arrived(self, kind: str, p) -> dict:
        """The worker's check of a job's parsed parameters (studio.params) as it arrives: each picture
        it carries (image, mask, the PNG to re-roll) by bytes and by pixels from its header, nothing
        decoded; then the job's cost (check_job). UserError naming the limit and its flag."""
        sizes = {}
        for field, what in PICTURES.items():
            data = getattr(p, field, None)
            if not isinstance(data, (bytes, bytearray)) or not data:
                continue
            if field == "image" and getattr(p, "control_type", None):
                what = f"{p.control_type} image"
            if len(data) > self.max_picture_bytes:
                raise UserError(f"the {what} is a {len(data) / 1e6:.1f} MB file; the limit is "
                                f"{self.max_picture_bytes / 1e6:g} MB (from the server's {self.FLAGS['max_upload_mb']} "
                                f"and {self.FLAGS['max_upload_megapixels']})")
            w, h, _ = image_header(bytes(data), what)
            check_image_size(w, h, what, self.max_upload_pixels, setting=self.FLAGS["max_upload_megapixels"])
            sizes[field] = (w, h)
        return self.check_job(kind, p, sizes)

    # -- a job's cost --------------------------------------------------------------------------------
    def check_job(self, kind: str, p, sizes: Dict[str, Tuple[int, int]]) -> dict:
        """Refuse a job that would cost more than the limits, before it is queued; `sizes` holds the
        (width, height) of its pictures by name ("image"). Returns the cost (shown in the docs' terms:
        output megapixels, windows)."""
        n = int(getattr(p, "num_images", 1) or 1)
        cost = {"megapixels": 0.0, "windows": 0}
        if kind == "outpaint" and "image" in sizes:
            w, h = sizes["image"]
            if w < MIN_SIDE or h < MIN_SIDE:
                raise UserError(f"the image is {w}x{h} pixels; out-painting needs at least {MIN_SIDE}x{MIN_SIDE}")
            W2, H2 = w + p.left + p.right, h + p.top + p.bottom
            if W2 * H2 > P.MAX_PIXELS:
                raise UserError(f"the out-painted image would be {W2}x{H2} ({megapixels(W2 * H2)}); the limit is "
                                f"{megapixels(P.MAX_PIXELS)}: add fewer pixels (left, right, top, bottom)")
            windows = count_windows(w, h, p.left, p.right, p.top, p.bottom, limit=self.max_outpaint_windows)
            if windows > self.max_outpaint_windows:
                raise UserError(
                    f"out-painting {w}x{h} pixels by left {p.left}, right {p.right}, top {p.top}, bottom {p.bottom} "
                    f"needs more than {self.max_outpaint_windows} windows (one model run each; the server's "
                    f"{self.FLAGS['max_outpaint_windows']}): add fewer pixels, or out-paint in several steps "
                    f"from a larger image")
            cost.update(megapixels=W2 * H2 / 1e6, windows=windows)
        elif kind in ("inpaint", "control_inpaint") and "image" in sizes:
            w, h = sizes["image"]
            cost["megapixels"] = w * h * n / 1e6
        if cost["megapixels"] > self.max_job_megapixels:
            raise UserError(f"this job would make {n} image(s) of {megapixels(cost['megapixels'] * 1e6 / n)} "
                            f"({cost['megapixels']:.3g} megapixels in all); the limit is {self.max_job_megapixels:g} "
                            f"megapixels per job (the server's {self.FLAGS['max_job_megapixels']}): ask for fewer "
                            f"images (num_images) or use a smaller picture")
        return cost

    # -- heavy jobs ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def heavy(self, pixels: float, wait: float = 600.0) -> Iterator[bool]:
        """Hold one of max_heavy_jobs slots while a job with `pixels` of uploads is decoded and runs
        (light jobs pass straight through); memory goes back to the system when a heavy one ends."""
        if pixels <= self.heavy_megapixels * 1e6:
            yield False
            return
        if not self._heavy.acquire(timeout=wait):
            raise UserError(f"the studio is busy with {self.max_heavy_jobs} large pictures (over "
                            f"{self.heavy_megapixels:g} megapixels; the server's {self.FLAGS['max_heavy_jobs']}): "
                            "try again in a minute")
        try:
            yield True
        finally:
            self._heavy.release()
            release_memory()


PICTURES = {"image": "image", "mask": "mask", "source_png": "image to re-roll"}  # a job's picture fields

_libc = None


def release_memory() -> None:
    """Collect garbage and ask glibc to give freed heap pages back to the system (malloc_trim), so a
    big job's decoded images do not stay in the process's resident memory."""
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own policy
        _libc = False


def upload_pixels(sizes: Dict[str, Optional[Tuple[int, int]]]) -> int:
    return sum(w * h for s in sizes.values() if s for w, h in [s])
