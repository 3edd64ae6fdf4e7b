"""PNG files that carry their parameters and, for generated images, their token pyramid.

    data = encode_png(image, {"seed": 0, ...}, tokens)   # tokens: per scale (pn*pn,) ids, or None
    params, tokens = read_png_info(data)                 # back from the bytes
    read_png_parameters("out.png")                       # only the parameters, from a file

The parameters are JSON in the PNG's 'parameters' text chunk; the tokens a compressed 'var_tokens'
chunk, so a result can be re-rolled from any scale later. Plain Python (numpy and PIL): the UI, the
worker, the CLI and the tests all read and write these files through this module.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image, PngImagePlugin

PARAMETERS_CHUNK = "parameters"  # JSON of the job's parameters
TOKENS_CHUNK = "var_tokens"  # a result's token pyramid (so it can be re-rolled)


EXTRA_PREFIX = "var_"  # what else a re-roll needs: "var_edit" (where an edit goes), "var_control" (its map)


def encode_png(image: Image.Image, params: dict, tokens: Optional[Sequence[np.ndarray]] = None,
               extras: Optional[dict] = None) -> bytes:
    """PNG bytes with `params` as JSON in the 'parameters' text chunk and, when given, the token
    pyramid in a compressed chunk; `extras` (name -> JSON-able dict) each in a compressed 'var_<name>' chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, json.dumps(params, sort_keys=True))
    if tokens is not None:
        info.add_text(TOKENS_CHUNK, encode_tokens(tokens), zip=True)
    for name, value in (extras or {}).items():
        info.add_text(EXTRA_PREFIX + name, json.dumps(value), zip=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_tokens(tokens: Sequence[np.ndarray]) -> str:
    flat = np.concatenate([np.asarray(t).reshape(-1) for t in tokens])
    dtype = "<u2" if flat.size == 0 or int(flat.max()) < 65536 else "<u4"
    return json.dumps({"sizes": [int(np.asarray(t).size) for t in tokens], "dtype": dtype,
                       "data": base64.b64encode(flat.astype(dtype).tobytes()).decode("ascii")})


def decode_tokens(text: str) -> List[np.ndarray]:
    d = json.loads(text)
    if not isinstance(d, dict) or d.get("dtype") not in ("<u2", "<u4") or not isinstance(d.get("sizes"), list) \
            or not all(isinstance(n, int) and n >= 0 for n in d["sizes"]):
        raise ValueError("the token chunk is damaged")
    flat = np.frombuffer(base64.b64decode(d["data"]), dtype=d["dtype"]).astype(np.int64)
    out, at = [], 0
    for n in d["sizes"]:
        out.append(flat[at:at + n])
        at += n
    if at != flat.size:
        raise ValueError("the token chunk is damaged")
    return out


def read_png_info(data: bytes) -> tuple:
    """PNG bytes -> (parameters dict, token list or None)."""
    with Image.open(io.BytesIO(data)) as im:
        text = getattr(im, "text", {}) or {}
    params = json.loads(text[PARAMETERS_CHUNK]) if PARAMETERS_CHUNK in text else {}
    tokens = decode_tokens(text[TOKENS_CHUNK]) if TOKENS_CHUNK in text else None
    return params, tokens


def read_png_extras(data: bytes) -> dict:
    """PNG bytes -> the extras encode_png stored (name -> dict; {} when none)."""
    with Image.open(io.BytesIO(data)) as im:
        text = getattr(im, "text", {}) or {}
    return {k[len(EXTRA_PREFIX):]: json.loads(v) for k, v in text.items()
            if k.startswith(EXTRA_PREFIX) and k != TOKENS_CHUNK}


def encode_array(a: np.ndarray) -> dict:
    """An array as a JSON-able dict (dtype, shape, base64 bytes) for an extra chunk."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def encode_picture(picture: Image.Image) -> str:
    """A picture (a control map) as base64 PNG text for an extra chunk: far smaller than its pixels."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_picture(text: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        if im.width * im.height > 4096 * 4096:  # checked before decoding: a stored map is the model's size
            raise ValueError(f"the stored control picture is {im.width}x{im.height}")
        im.load()
        return im.copy()


def read_png_parameters(path: Union[str, Path]) -> dict:
    """The parameters stored in a PNG file ({} when it has none)."""
    with Image.open(path) as im:
        text = (getattr(im, "text", {}) or {}).get(PARAMETERS_CHUNK)
    return json.loads(text) if text else {}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PARAMETERS_BYTES = 1 << 20  # a 'parameters' chunk larger than this is not the studio's


def read_parameters_chunk(path: Union[str, Path]) -> Optional[dict]:
    """The parameters of a PNG file read from its header alone: the chunks before the pixels are walked
    (their lengths skipped, nothing decompressed, no pixel read), and the plain 'parameters' text chunk
    that encode_png writes is parsed. None for a file that is not a PNG or carries no studio parameters
    (another program's text, damaged JSON): a listing of many files stays cheap and never raises."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND"):  # the text chunks the studio writes come before the pixels
                    return None
                if kind == b"tEXt" and length <= MAX_PARAMETERS_BYTES:
                    keyword, _, text = f.read(length).partition(b"\0")
                    f.seek(4, 1)  # CRC
                    if keyword == PARAMETERS_CHUNK.encode():
                        params = json.loads(text.decode("latin-1"))
                        return params if isinstance(params, dict) else None
                else:
                    f.seek(length + 4, 1)
    except (OSError, ValueError, RecursionError):
        return None
