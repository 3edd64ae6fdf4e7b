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
  a URL to fetch) gets 403.
- private_temp_dir: each studio process has its own Gradio temp folder (uploads, previews, result
  copies), removed when the process exits.

Plain Python (Starlette's ASGI interface, no torch).
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterable, List, Optional, Sequence, Tuple
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


class FileGuard:
    """ASGI middleware in front of Gradio's file route: only images this instance made or holds."""

    def __init__(self, app, roots: Iterable[Path]):
        self.app = app
        self.roots = [Path(r).resolve() for r in roots]

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
        if scope["type"] == "http":
            path = scope.get("path", "")
            route = next((r for r in FILE_ROUTES if r in path), None)
            if route is not None:
                if not self.allowed(path.split(route, 1)[1]):
                    await _refuse(scope, send, 403, "File not allowed.")
                    return

                async def send_nosniff(message):
                    if message["type"] == "http.response.start":
                        message = dict(message, headers=[*message.get("headers", []),
                                                         (b"x-content-type-options", b"nosniff")])
                    await send(message)

                await self.app(scope, receive, send_nosniff)
                return
        await self.app(scope, receive, send)


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
