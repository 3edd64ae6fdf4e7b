"""The outputs folder: checked at start-up and before each job, and written so nothing is lost.

    problem = folder_problem(folder)        # None, or why results cannot be saved there (user words)
    path = save_png(folder, "1530_generate_s42_ab12cd_0", data)   # SaveError(reason) when it cannot

A result is written to a hidden `.part` file, fsynced, then linked to its final name, which is never
an existing file's (a clash takes the next free "-2", "-3" ...); the folder is fsynced too. When the
write fails (read-only folder, disk full ...) the partial file is removed and SaveError says why in a
user's words, with no server path: the worker keeps the image in its result, and the page shows it
with the reason. Plain Python.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

MIN_FREE_BYTES = 64 * 1024 * 1024  # below this the folder counts as full: a job would fail to save


class SaveError(OSError):
    """A result could not be saved; the message is for the user (no server paths)."""


def reason(e: BaseException) -> str:
    """An OS error in a user's words (no paths)."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return "the disk is full"
    if code == errno.EROFS:
        return "the outputs folder is on a read-only disk"
    if code in (errno.EACCES, errno.EPERM):
        return "the studio may not write to the outputs folder"
    if code == errno.ENOENT:
        return "the outputs folder is gone"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "the outputs path is a file, not a folder"
    return getattr(e, "strerror", None) or type(e).__name__


def folder_problem(folder: Union[str, Path], min_free: int = MIN_FREE_BYTES) -> Optional[str]:
    """Why results cannot be saved in `folder` now (created if missing), or None: a probe file is
    written, fsynced and removed, and the free space checked."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return reason(e)
    if free < min_free:
        return f"the disk is full ({free // 2**20} MB free; the studio needs {min_free // 2**20} MB)"
    return None


def save_png(folder: Union[str, Path], stem: str, data: bytes) -> Path:
    """Write `data` as `folder/stem.png` (or stem-2.png ... if taken), durably; SaveError on failure
    with nothing partial left behind."""
    folder = Path(folder)
    tmp = folder / f".{stem}.{uuid.uuid4().hex[:8]}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        path = _link_free_name(tmp, folder, stem)
        _fsync_dir(folder)
        return path
    except OSError as e:
        raise SaveError(reason(e)) from e
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _link_free_name(tmp: Path, folder: Path, stem: str) -> Path:
    for k in range(1, 1000):
        path = folder / (f"{stem}.png" if k == 1 else f"{stem}-{k}.png")
        try:
            os.link(tmp, path)  # atomic and never replaces: a clash raises FileExistsError
            return path
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists():  # a file system without hard links: the next free name, then rename
                continue
            os.replace(tmp, path)
            return path
    raise FileExistsError(errno.EEXIST, "no free file name")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
