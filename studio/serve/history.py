"""The history: this instance's outputs folder, newest first, a page at a time.

    page = history_page(outputs, 0)          # Page(items=[(path, params), ...], index, pages, total)
    captions = [caption(params, path) for path, params in page.items]
    record_owner(outputs, "alice", paths)   # under --auth: these results are alice's ...
    page = history_page(outputs, 0, user="alice")   # ... and her history lists hers alone
    full_copy(outputs, "093000_inpaint_s1_ab12_0.png")  # the full-size copy of an edit of a huge upload, or None

The files on disk are the truth, so a reload (or a restart) loses nothing. A listing stats the PNGs
of the outputs folder and of its folders one level down (the worker writes `YYYY-MM-DD/HHMMSS_kind_
sSEED_JOBID_i.png`); only the page shown has its parameters read, from each file's header
(studio.pngmeta.read_parameters_chunk: no pixel decoded, no token chunk inflated). Newest first, with
the images of one batch in their own order. Hidden files (a save in progress, `.x.part`) are skipped, and
so are the full-size copies of edits of huge uploads (`..._full.png`, thousands of pixels wide: no
thumbnails of those); the working-size result beside each is listed and offers it as a download.

Whose results: under --auth each signed-in user sees only their own. The web process notes every result
it shows a user in that user's list, `.owners/<hash of the name>.txt` in the outputs folder (one path
relative to the folder a line, appended), so it survives a restart too; a listing for a user keeps the
files of that list. Without --auth (a single-user studio on one's own machine) there is no user and the
history lists every result in the folder, as before.

Results saved before per-user History, or by the command line (`python -m studio ...`), are in no one's
list, so under --auth they are listed for nobody. Their owner assigns them, with the studio running or not:

    python -m studio.serve.history --outputs outputs --unowned           # how many are no one's (and which)
    python -m studio.serve.history --outputs outputs --claim alice        # every one of them becomes alice's

A claim takes only results that are in no user's list: one user's results are never given to another.
Plain Python.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set, Tuple, Union

from studio.pngmeta import read_parameters_chunk

PAGE_SIZE = 24
OWNERS = ".owners"  # in the outputs folder: each signed-in user's results (hidden: never listed itself)
_owners_lock = threading.Lock()
_claim_lock = threading.Lock()
# HHMMSS_kind_sSEED_JOBID_i (or _i-2 after a name clash): one job's images share the stamp and the job id
_IN_BATCH = re.compile(r"^(?P<stamp>[^_]+)_.*_(?P<job>[^_]+)_(?P<i>\d+)(?:-\d+)?$")
# an edit of a huge upload pasted into the original (studio.serve.ui: `<working result>_full.png`): not
# listed (an 8000 px picture as a thumbnail); its working-size result is, and offers it as a download
_FULL_COPY = re.compile(r"_full(?:-\d+)?\.png$", re.IGNORECASE)


@dataclass
class Page:
    items: List[Tuple[str, Optional[dict]]]  # (path, parameters or None for a foreign picture)
    index: int  # 0 = newest
    pages: int
    total: int

    @property
    def label(self) -> str:
        if not self.total:
            return "No results saved yet."
        first = self.index * PAGE_SIZE + 1
        return (f"Newest first · {first}–{first + len(self.items) - 1} of {self.total} saved results · "
                f"page {self.index + 1} of {self.pages}")


def owners_file(folder: Union[str, Path], user: str) -> Path:
    """The list of `user`'s results (the name hashed: any user name is a safe file name)."""
    return Path(folder) / OWNERS / (hashlib.sha256(user.encode("utf-8")).hexdigest()[:32] + ".txt")


def record_owner(folder: Union[str, Path], user: str, paths) -> None:
    """Note `paths` (results in the outputs folder) as `user`'s; paths elsewhere are ignored."""
    root = Path(folder).resolve()
    lines = []
    for p in paths:
        try:
            rel = Path(p).resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        lines.append(rel.as_posix() + "\n")
    if not lines:
        return
    target = owners_file(root, user)
    with _owners_lock:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a", encoding="utf-8") as f:
            f.write("".join(lines))


def _relative(path, folder: Union[str, Path]) -> str:
    """A result's path as the owners' lists write it: relative to the outputs folder, with '/'."""
    return Path(os.path.relpath(path, str(folder))).as_posix()


def _read_list(path: Union[str, Path]) -> Set[str]:
    """The paths (relative to the outputs folder) in one user's list; none when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return set()
    return {line for line in text.splitlines() if line}


def owned(folder: Union[str, Path], user: str) -> Set[str]:
    """The paths (relative to the outputs folder) noted as `user`'s."""
    return _read_list(owners_file(folder, user))


def owned_by_anyone(folder: Union[str, Path]) -> Set[str]:
    """The paths (relative to the outputs folder) in any user's list."""
    out: Set[str] = set()
    try:
        lists = [e.path for e in os.scandir(Path(folder) / OWNERS) if e.name.endswith(".txt")]
    except OSError:
        return out
    for path in lists:
        out.update(_read_list(path))
    return out


def unowned(folder: Union[str, Path]) -> List[str]:
    """The results (paths, newest first) in no user's list: saved before per-user History, or by the
    command line. Under --auth they are listed for nobody until someone claims them."""
    anyone = owned_by_anyone(folder)
    return [p for p in listing(folder, full_copies=True) if _relative(p, folder) not in anyone]


RECENT_S = 600  # a claim leaves results younger than this: a running studio may be about to note their owner


def claim(folder: Union[str, Path], user: str, min_age_s: float = RECENT_S) -> Tuple[List[str], List[str]]:
    """Make every result that is no one's `user`'s (their History lists it from now on): (claimed, left).
    A result in another user's list stays theirs alone. Results saved in the last `min_age_s` seconds are
    left (a running studio notes a result's owner just after its worker saved it: a claim in between would
    give one user's fresh result to another too); with the studio stopped, 0 takes them all."""
    with _claim_lock:  # two claims at once (two threads) would both take the same results
        paths = unowned(folder)
        cutoff = time.time() - min_age_s
        claimed, left = [], []
        for p in paths:
            try:
                (claimed if os.stat(p).st_mtime <= cutoff else left).append(p)
            except OSError:  # removed meanwhile
                continue
        record_owner(folder, user, claimed)
    return claimed, left


def listing(folder: Union[str, Path], user: Optional[str] = None, full_copies: bool = False) -> List[str]:
    """Every PNG in the outputs folder (and its folders one level down), newest first; the images of a
    batch (saved in a burst, `_0`, `_1` ...) in their order. With a `user` (under --auth), theirs alone;
    the full-size copies of edits of huge uploads only if `full_copies`."""
    mine = None if user is None else owned(folder, user)
    files = []  # (mtime_ns, group, index, path)
    for where in _folders(Path(folder)):
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or not e.name.lower().endswith(".png") or (
                    not full_copies and _FULL_COPY.search(e.name)):
                continue
            if mine is not None and _relative(e.path, folder) not in mine:
                continue
            try:
                if not e.is_file():
                    continue
                mtime = e.stat().st_mtime_ns
            except OSError:  # removed meanwhile
                continue
            m = _IN_BATCH.match(e.name[:-4])
            group, index = (os.path.join(where, m["stamp"] + "_" + m["job"]), int(m["i"])) if m else (e.path, 0)
            files.append((mtime, group, index, e.path))
    newest = {}
    for mtime, group, _, _ in files:
        newest[group] = max(mtime, newest.get(group, mtime))
    files.sort(key=lambda f: (-newest[f[1]], f[1], f[2]))
    return [f[3] for f in files]


def full_copy(folder: Union[str, Path], name: str, user: Optional[str] = None) -> Optional[str]:
    """The full-size copy of the result named `name` (an edit of a huge upload, pasted into the original and
    saved beside it as `<its stem>_full.png`), if there is one; with a `user` (under --auth), only theirs.
    By name: a picture shown in the page is Gradio's copy of the file, which keeps the name."""
    stem = Path(name).stem
    if not _IN_BATCH.match(stem) or _FULL_COPY.search(Path(name).name):
        return None
    mine = None if user is None else owned(folder, user)
    for where in _folders(Path(folder)):
        path = Path(where) / f"{stem}_full.png"
        if path.is_file() and (mine is None or _relative(path, folder) in mine):
            return str(path)
    return None


def _folders(folder: Path) -> List[str]:
    out = [str(folder)]
    try:
        out += [e.path for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return out


def history_page(folder: Union[str, Path], index: int = 0, size: int = PAGE_SIZE, user: Optional[str] = None) -> Page:
    """Page `index` of the listing (clamped to the pages there are), with each file's parameters; with a
    `user`, of their results alone."""
    files = listing(folder, user)
    pages = max(1, -(-len(files) // size))
    index = min(max(int(index or 0), 0), pages - 1)
    chunk = files[index * size:(index + 1) * size]
    return Page([(p, read_parameters_chunk(p)) for p in chunk], index, pages, len(files))


def caption(params: Optional[dict], path: str) -> str:
    """A short line under a history picture: what made it, its seed and class, when."""
    try:
        when = time.strftime("%d %b %H:%M", time.localtime(os.stat(path).st_mtime))
    except OSError:
        when = ""
    if not params:
        return f"{Path(path).name} · {when}"
    words = [str(params.get("task") or "result")]
    if params.get("seed") is not None:
        words.append(f"seed {params['seed']}")
    if params.get("class_name"):
        words.append(str(params["class_name"]))
    return " · ".join(words + [when])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m studio.serve.history",
        description="Under --auth each user's History lists their own results. Results saved before that, or "
                    "by the command line, are no one's: list them, or give them all to one user.")
    ap.add_argument("--outputs", default="outputs", help="the studio's outputs folder (default: outputs/)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--unowned", action="store_true", help="list the results that are no one's")
    what.add_argument("--claim", metavar="USER", help="make every result that is no one's USER's (the name they "
                                                      "sign in with)")
    ap.add_argument("--min-age", type=float, default=RECENT_S, metavar="SECONDS",
                    help=f"a claim leaves results saved in the last SECONDS (default {RECENT_S}: a running studio "
                         "notes whose a result is just after saving it); 0 with the studio stopped")
    args = ap.parse_args(argv)
    if not Path(args.outputs).is_dir():
        print(f"error: there is no outputs folder {Path(args.outputs).resolve()} (choose one with --outputs)",
              file=sys.stderr)
        return 2
    if args.unowned:
        paths = unowned(args.outputs)
        for p in paths:
            print(os.path.relpath(p, args.outputs))
        print(f"{len(paths)} result(s) belong to no one" + (
            "; `--claim USER` makes them USER's" if paths else ""), file=sys.stderr)
        return 0
    user = args.claim.strip()
    if not user:
        print("error: --claim needs the user name one signs in with", file=sys.stderr)
        return 2
    claimed, left = claim(args.outputs, user, max(0.0, args.min_age))
    print(f"{len(claimed)} result(s) that belonged to no one are now {user}'s" + (
        " (their History lists them, newest first)" if claimed else ""))
    if left:
        print(f"{len(left)} saved in the last {args.min_age:g} s left as they are (a running studio may be about "
              "to note their owner); claim again later, or with the studio stopped and --min-age 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
