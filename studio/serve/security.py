"""The web server's guards: who may reach it, and which files it serves.

    temp = private_temp_dir()                     # before any Gradio component exists: GRADIO_TEMP_DIR
    problem = auth_problem(host, auth, insecure)  # app.py: --host beyond loopback needs --auth
    app_kwargs = {"middleware": middleware(host, temp)}   # ui.launch passes it to Gradio's app

- HostCheck: bound to loopback, only requests whose Host header names loopback (localhost,
  127.0.0.1, [::1]) are served; a page on attacker.example whose name was re-pointed at 127.0.0.1
  (DNS rebinding) gets 421 and no data.
- FileGuard: the file route (/gradio_api/file=...) serves only PNG, JPEG and WebP files under this
  instance's private temp folder (uploads, previews, and the copies Gradio makes of the results it
  shows), always with nosniff; anything else (another instance's files, the outputs folder, HTML,
  a URL to fetch) gets 403. And only to the browser session the file was sent to or came from
  (or, with --auth, to the same user): every browser gets a session cookie (var-studio-session,
  HttpOnly, living as long as the temp files: FILE_LIFETIME_S, renewed at each page load and job), the guard notes the temp files named in what the server sends each session (results,
  previews, uploads: FileOwners), and refuses a file to anyone else, also as a job's input (a
  session cannot have another's result sent back to it by passing its path). Files named in the
  page's config are everyone's.
- private_temp_dir: each studio process has its own Gradio temp folder (uploads, previews, result
  copies), removed when the process exits.

Plain Python (Starlette's ASGI interface, no torch).
"""
from __future__ import annotations

import atexit
import collections
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Callable, Collection, Iterable, List, Optional, Sequence, Set, Tuple
from urllib.parse import unquote, urlsplit

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
FILE_ROUTES = ("/gradio_api/file=", "/file=")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def private_temp_dir() -> Path:
    """A temp folder of this process alone for Gradio's files (GRADIO_TEMP_DIR), removed at exit.
    Call before the page's components are made: each takes the folder when it is created."""
    folder = Path(tempfile.mkdtemp(prefix="var-studio-")).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    atexit.register(shutil.rmtree, str(folder), True)
    return folder


def parse_auth(values: Optional[Sequence[str]]) -> Optional[List[Tuple[str, str]]]:
    """--auth values ("user:password", or "@file" of such lines) -> Gradio's auth list."""
    if not values:
        return None
    pairs = []
    for v in values:
        lines = Path(v[1:]).read_text().splitlines() if v.startswith("@") else [v]
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise ValueError("--auth takes USER:PASSWORD (or @FILE with one USER:PASSWORD a line)")
            pairs.append((user, password))
    return pairs or None


def auth_problem(host: str, auth, insecure_no_auth: bool) -> Optional[str]:
    """Why the studio must not start as asked (None: fine). Beyond loopback anyone on the network can
    reach it: it needs --auth, or the operator's explicit --insecure-no-auth."""
    if is_loopback(host) or auth or insecure_no_auth:
        return None
    return (f"--host {host} makes the studio reachable from other machines; give --auth USER:PASSWORD "
            "(or --auth @FILE), or --insecure-no-auth to serve without a login (see docs/operations.md)")


class HostCheck:
    """ASGI middleware: serve only requests whose Host header is one of `allowed` (any port), and
    whose Origin, when a browser sends one, is too: a page elsewhere cannot post uploads or jobs
    to a loopback studio from a visitor's browser."""

    def __init__(self, app, allowed: Collection[str] = LOOPBACK_NAMES):
        self.app, self.allowed = app, {a.lower() for a in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                await _refuse(scope, send, 421, "This studio answers only to localhost (Host header refused).")
                return
            origin = headers.get(b"origin", b"").decode("latin-1")
            if origin and _host_name(urlsplit(origin).netloc) not in self.allowed:
                await _refuse(scope, send, 403, "This studio takes requests only from its own pages (Origin refused).")
                return
        await self.app(scope, receive, send)


SESSION_COOKIE = "var-studio-session"
# how long the temp folder keeps a file (Gradio's delete_cache, set by studio.serve.ui.build_ui), and
# so how long a session cookie lives: the files it may read are gone by then. Renewed at each page
# load and job, so a file is readable for its whole life from the job that made it.
FILE_LIFETIME_S = 86400
_SESSION_VALUE = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
PUBLIC = "*"  # the owner of files named in the page's config: everyone's


class FileOwners:
    """Which sessions (and signed-in users) may read each file of the temp folder.

    An entry lives as long as its file may: it goes when its file is gone (Gradio's hourly clean-up of
    files older than a day, a closed tab's uploads) or when nothing named the file to anyone for
    `max_age` seconds (the temp files' lifetime: Gradio deletes the file then, the cookie that read it
    has lapsed). Expired entries go at each add (oldest first, cheap); gone files are found by a sweep
    that stats every entry in a background thread at most every `sweep_every` seconds. So the map
    holds about the live temp files; `limit` is a backstop on memory only (past it the oldest entries
    go first, and a file forgotten so is refused, not leaked): it would take `limit` files named
    within one sweep interval to reach it."""

    def __init__(self, roots: Iterable[Path], limit: int = 200_000, max_age: float = FILE_LIFETIME_S,
                 sweep_every: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.roots = [Path(r).resolve() for r in roots]
        self.limit, self.max_age, self.sweep_every, self.clock = int(limit), float(max_age), float(sweep_every), clock
        # path -> (when it was last named, who may read it); oldest first
        self._owners: "collections.OrderedDict[str, Tuple[float, Set[str]]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._next_sweep = clock() + self.sweep_every
        self.sweeper: Optional[threading.Thread] = None  # the sweep running now, if any

    def key(self, raw: str) -> Optional[str]:
        """A path as the map keys it (resolved), or None when it is not in the temp folder."""
        try:
            path = Path(unquote(raw)).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        return str(path) if any(path.is_relative_to(r) for r in self.roots) else None

    def add(self, raw: str, owners: Iterable[str]) -> None:
        key = self.key(raw)
        if key is None:
            return
        now = self.clock()
        with self._lock:
            _, mine = self._owners.pop(key, (now, set()))
            mine.update(owners)
            self._owners[key] = (now, mine)  # the newest, at the end
            self._drop_expired(now)
            while len(self._owners) > self.limit:
                self._owners.popitem(last=False)
            due = now >= self._next_sweep and not (self.sweeper and self.sweeper.is_alive())
            if due:
                self._next_sweep = now + self.sweep_every
                self.sweeper = threading.Thread(target=self.prune, name="file-owners-sweep", daemon=True)
        if due:
            self.sweeper.start()

    def _drop_expired(self, now: float) -> int:
        dropped = 0
        while self._owners:
            when, _ = next(iter(self._owners.values()))
            if now - when <= self.max_age:
                break
            self._owners.popitem(last=False)
            dropped += 1
        return dropped

    def prune(self) -> int:
        """Drop the entries whose files are gone or that expired; how many went. The files are
        looked at without the lock (the server answers meanwhile); an entry named again since is kept."""
        with self._lock:
            dropped = self._drop_expired(self.clock())
            seen = [(k, when) for k, (when, _) in self._owners.items()]
        gone = [(k, when) for k, when in seen if not os.path.exists(k)]
        with self._lock:
            for k, when in gone:
                entry = self._owners.get(k)
                if entry is not None and entry[0] == when:
                    del self._owners[k]
                    dropped += 1
        return dropped

    def may_read(self, raw: str, owners: Iterable[str]) -> bool:
        key = self.key(raw)
        if key is None:
            return False
        with self._lock:
            when, mine = self._owners.get(key, (0.0, ()))
            if mine and self.clock() - when > self.max_age:
                return False  # expired (the next add drops it)
            return PUBLIC in mine or any(o in mine for o in owners)

    def __len__(self) -> int:
        return len(self._owners)


def file_paths(value) -> Iterable[str]:
    """The file paths a JSON value names: a "path" of a file's record, and the path in a file URL
    (also inside Gradio's streamed diffs, which carry the same records)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            path = v.get("path")
            if isinstance(path, str):
                yield path
            stack.extend(x for k, x in v.items() if k != "path")
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            for route in FILE_ROUTES:
                if route in v:
                    yield unquote(v.split(route, 1)[1])
                    break


class FileGuard:
    """ASGI middleware in front of Gradio's file route: only images this instance made or holds,
    and only for the session (or user) they were made for or uploaded by."""

    # requests whose bodies name files as a job's inputs: each must be the asking session's own
    INPUT_ROUTES = ("/gradio_api/queue/join", "/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")
    MAX_INPUT_BODY = 4 * 1024 * 1024  # a job's request (its files are uploaded apart): JSON of a few kB

    def __init__(self, app, roots: Iterable[Path], max_age: int = FILE_LIFETIME_S):
        self.app = app
        self.roots = [Path(r).resolve() for r in roots]
        self.owners = FileOwners(self.roots, max_age=max_age)

    def _renews(self, scope, path: str) -> Optional[str]:
        """The session whose cookie this answer sets again (a page load or a job's request), so that
        it outlives the files that request makes by their lifetime; None for other requests."""
        page = scope.get("method") == "GET" and path.rstrip("/") == scope.get("root_path", "").rstrip("/")
        job = scope.get("method") == "POST" and any(path.startswith(r) or r in path for r in self.INPUT_ROUTES)
        if not (page or job):
            return None
        jar = _cookies(scope)
        return jar[SESSION_COOKIE].value if SESSION_COOKIE in jar else None

    def allowed(self, raw: str) -> bool:
        text = unquote(raw)
        if "://" in text or text.startswith(("//", "data:")):
            return False
        try:
            path = Path(text).resolve()
        except (OSError, RuntimeError, ValueError):
            return False
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return False
        return any(path.is_relative_to(r) for r in self.roots)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope, new_session = _with_session(scope)
        owners = _owners_of(scope)
        path = scope.get("path", "")

        renew = new_session or self._renews(scope, path)

        async def send_with_cookie(message):
            if renew and message["type"] == "http.response.start":
                cookie = (f"{SESSION_COOKIE}={renew}; Path=/; Max-Age={int(self.owners.max_age)}; HttpOnly; "
                          "SameSite=Lax").encode()
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie)])
            await send(message)

        route = next((r for r in FILE_ROUTES if r in path), None)
        if route is not None:
            raw = path.split(route, 1)[1]
            if not self.allowed(raw) or not self.owners.may_read(raw, owners):
                await _refuse(scope, send_with_cookie, 403, "File not allowed.")
                return

            async def send_nosniff(message):
                if message["type"] == "http.response.start":
                    message = dict(message, headers=[*message.get("headers", []),
                                                     (b"x-content-type-options", b"nosniff")])
                await send_with_cookie(message)

            await self.app(scope, receive, send_nosniff)
            return
        if scope.get("method") == "POST" and any(path.startswith(r) or r in path for r in self.INPUT_ROUTES):
            body = b""
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.MAX_INPUT_BODY:
                    await _refuse(scope, send_with_cookie, 413, "Request too large.")
                    return
            foreign = [p for p in _json_paths(body) if self.owners.key(p) and not self.owners.may_read(p, owners)]
            if foreign:
                await _refuse(scope, send_with_cookie, 403, "A file in this request is not yours.")
                return
            receive = _replay(body)
        public = path.rstrip("/").endswith("/config")
        upload = path.rstrip("/").endswith("/upload")  # answers a bare list of the stored files' paths
        await self.app(scope, receive, _Recorder(send_with_cookie, self.owners, {PUBLIC} if public else owners,
                                                 bare_paths=upload))


class _Recorder:
    """The response's sender: the temp files named in a JSON answer or in each event of a stream
    become readable by the session (or user) it goes to, before the part naming them is sent."""

    def __init__(self, send, owners: FileOwners, to: Set[str], bare_paths: bool = False):
        self.send, self.owners, self.to, self.bare_paths = send, owners, to, bare_paths
        self.kind = None  # "json" | "stream" | None (not looked at)
        self.buffer = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers") or []).get(b"content-type", b"").decode("latin-1")
            self.kind = "stream" if "event-stream" in ctype else "json" if "json" in ctype else None
        elif message["type"] == "http.response.body" and self.kind is not None:
            self.buffer += message.get("body", b"")
            if self.kind == "stream":
                *events, self.buffer = self.buffer.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            self._note(line[5:])
            elif not message.get("more_body", False):
                self._note(self.buffer)
                self.buffer = b""
        await self.send(message)

    def _note(self, data: bytes) -> None:
        for path in _json_paths(data, self.bare_paths):
            self.owners.add(path, self.to)


def _json_paths(data: bytes, bare: bool = False) -> List[str]:
    """The file paths named in a JSON text (bare: it is a list of paths, the upload route's answer)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return []
    if bare and isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return list(file_paths(value))


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _cookies(scope) -> SimpleCookie:
    jar = SimpleCookie()
    for name, value in scope.get("headers") or []:
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                pass
    return jar


def _with_session(scope) -> Tuple[dict, Optional[str]]:
    """The request with a session cookie: its own, or a new one (returned too, to be set on the
    answer), added to the request's headers so the app sees the same session on this first request."""
    jar = _cookies(scope)
    if SESSION_COOKIE in jar and _SESSION_VALUE.match(jar[SESSION_COOKIE].value):
        return scope, None
    sid = secrets.token_urlsafe(24)
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"cookie"]
    others = "; ".join(f"{k}={m.value}" for k, m in jar.items() if k != SESSION_COOKIE)
    headers.append((b"cookie", (f"{others}; " if others else "").encode("latin-1") +
                    f"{SESSION_COOKIE}={sid}".encode()))
    return dict(scope, headers=headers), sid


def _owners_of(scope) -> Set[str]:
    """Who asks: "s:" + the browser session, and "u:" + the signed-in user under Gradio's --auth."""
    jar = _cookies(scope)
    owners = {f"s:{jar[SESSION_COOKIE].value}"} if SESSION_COOKIE in jar else set()
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if tokens and cookie_id:
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            user = tokens.get(jar[name].value) if name in jar else None
            if user:
                owners.add(f"u:{user}")
                break
    return owners


def middleware(host: str, temp_dir: Path) -> list:
    """The guards for Gradio's app (FastAPI's `middleware=`): the file guard always, the Host check
    when the studio listens on loopback."""
    from starlette.middleware import Middleware

    out = [Middleware(FileGuard, roots=[temp_dir])]
    if is_loopback(host):
        out.insert(0, Middleware(HostCheck))
    return out


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:7860
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _refuse(scope, send, status: int, text: str) -> None:
    body = text.encode()
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
