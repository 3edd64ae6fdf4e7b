"""Token pyramids of a training set, encoded once by a frozen VQVAE and trained on many times.

The `var` trainer spends most of its CPU outside the transformer when
it renders and encodes every batch: rendering (~70 ms / image) runs in a DataLoader worker and the
VQVAE encode (~80 ms / image at 128 px on one core) in the step. A cache turns both into a table
lookup. It is a folder:

    meta.json                 what was encoded (the source, the count, the resolution) and a fingerprint
                              of the encoder, quant_conv and quantiser weights: a cache made by another
                              tokenizer is refused, a decoder fine-tune (which leaves tokens unchanged)
                              keeps it valid
    chunk_00000.safetensors   `tokens` (n, L) int16 and `class_id` (n,) int64 for CHUNK source images,
    ...                       each encoded as it is and mirrored (items 2i and 2i+1)

Building writes one chunk at a time (atomically), so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

from lab.train.task import TrainError
from models.vqvae import VQVAE

CHUNK = 500  # source images per chunk file (1000 items with the mirrored copies)
FORMAT = "var-studio-token-cache"


def tokenizer_fingerprint(vae: VQVAE) -> str:
    """sha256 over everything that decides the tokens (encoder, quant_conv, quantiser), not the decoder."""
    h = hashlib.sha256()
    cfg = vae.cfg.to_dict()
    cfg.pop("decoder_fixed_norm")  # decoder layout only: a converted decoder reads the same tokens
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for k, v in sorted(vae.state_dict().items()):
        if k.startswith(("encoder.", "quant_conv.", "quantize.")) and v.is_floating_point():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _chunk_path(folder: Path, k: int) -> Path:
    return folder / f"chunk_{k:05d}.safetensors"


@torch.no_grad()
def _encode(vae: VQVAE, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(torch.cat(vae.img_to_tokens(x[i:i + batch_size]), 1))
    return torch.cat(out)


def build(folder, vae: VQVAE, source, count: int, describe: str, resolution: int, batch_size: int = 50,
          log=print) -> "TokenSource":
    """Encode the first `count` items of `source` (a data source: `.get(indices)` -> dict with image and
    class_id), each as it is and mirrored, into `folder`; resume a partial build; return the cache."""
    from safetensors.torch import save_file

    from lab.train.data import to_resolution

    folder = Path(folder)
    count = int(count)
    if count <= 0:
        raise TrainError("--cache-images must be at least 1")
    if count > len(source):
        raise TrainError(f"--cache-images {count}: the data has only {len(source)} images")
    if vae.cfg.vocab_size > 2 ** 15:
        raise TrainError(f"a vocabulary of {vae.cfg.vocab_size} codes does not fit the cache's int16 tokens")
    meta = {"format": FORMAT, "version": 1, "fingerprint": tokenizer_fingerprint(vae), "source": describe,
            "count": count, "resolution": int(resolution), "patch_nums": list(vae.cfg.patch_nums), "chunk": CHUNK}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise TrainError(f"--token-cache {folder}: made for other {', '.join(diff)} (a different tokenizer or "
                             f"data); give a new folder or delete this one")
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    vae.eval()
    n_chunks = (count + CHUNK - 1) // CHUNK
    todo = [k for k in range(n_chunks) if not _chunk_path(folder, k).exists()]
    if todo:
        log(f"[train] encoding {count} images (and their mirror images) into {folder}: {len(todo)} of {n_chunks} "
            f"chunks to go")
    t0 = time.time()
    for done, k in enumerate(todo, 1):
        idx = list(range(k * CHUNK, min(count, (k + 1) * CHUNK)))
        tok, cls = [], []
        for i in range(0, len(idx), batch_size):
            b = source.get(idx[i:i + batch_size])
            x = to_resolution(b["image"].float(), resolution)
            both = torch.stack([_encode(vae, x, batch_size), _encode(vae, x.flip(-1), batch_size)], 1)  # (b, 2, L)
            tok.append(both.flatten(0, 1).to(torch.int16))
            cls.append(b["class_id"].long().repeat_interleave(2))
        path = _chunk_path(folder, k)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"tokens": torch.cat(tok).contiguous(), "class_id": torch.cat(cls).contiguous()}, str(tmp))
        os.replace(tmp, path)
        rate = (time.time() - t0) / done
        log(f"[train] token cache: chunk {k + 1}/{n_chunks} ({rate:.0f} s per chunk, "
            f"{rate * (len(todo) - done) / 60:.0f} min to go)")
    return TokenSource(folder, expect=meta)


class TokenSource:
    """A token cache as a data source: item -> {"tokens": (L,) int64, "class_id"}; 2 x count items."""

    in_process = True  # a table lookup: no DataLoader worker

    def __init__(self, folder, expect: Dict = None):
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise TrainError(f"--token-cache {folder}: not a token cache ({e})") from None
        if expect is not None and any(self.meta.get(k) != v for k, v in expect.items()):
            raise TrainError(f"--token-cache {folder}: made for another tokenizer or data")
        n_chunks = (self.meta["count"] + CHUNK - 1) // CHUNK
        missing = [k for k in range(n_chunks) if not _chunk_path(folder, k).exists()]
        if missing:
            raise TrainError(f"--token-cache {folder}: {len(missing)} chunk(s) missing (an interrupted build: run "
                             f"the same command to finish it)")
        parts = [load_file(str(_chunk_path(folder, k))) for k in range(n_chunks)]
        self.tokens = torch.cat([p["tokens"] for p in parts])
        self.class_id = torch.cat([p["class_id"] for p in parts])
        L = sum(p * p for p in self.meta["patch_nums"])
        if self.tokens.shape != (2 * self.meta["count"], L):
            raise TrainError(f"--token-cache {folder}: tokens of shape {tuple(self.tokens.shape)}, expected "
                             f"{(2 * self.meta['count'], L)}")
        self.size = self.meta["resolution"]

    def __len__(self):
        return self.tokens.shape[0]

    def get(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"tokens": self.tokens[idx].long(), "class_id": self.class_id[idx]}
