"""Keep a browser session's Gradio state from growing with every run (issue 17: the web process grew
about 10 MB per 100 jobs).

When a streaming handler's yield leaves an output out (a skip: the run events send only the status
at most scales) and a later yield of the same event gives that output a value, Gradio (6.x) builds
the component anew and also files the new object in the session's BlocksConfig under its own new id,
with its config in the session's config values. Nothing refers to those entries again: every event
adds one per such output (the Live preview, Result, Selected and History components: four a job),
each holding its value's file records, for as long as the session lives. `forget_orphans` drops the
entries of ids the page does not have; the session's own copies of the page's components (under the
page's ids) stay as they are.

Plain Python over Gradio's objects (no torch).
"""
from __future__ import annotations

from typing import Optional


def forget_orphans(session_hash: Optional[str]) -> int:
    """Call inside an event's handler (Gradio's context names the page and the session's config): drop
    the session's components and config values whose ids are not the page's. Returns how many."""
    try:
        from gradio.context import LocalContext
    except ImportError:  # pragma: no cover - another Gradio
        return 0
    blocks = LocalContext.blocks.get(None)
    config = LocalContext.blocks_config.get(None)
    if blocks is None or config is None or config is getattr(blocks, "default_config", None):
        return 0
    page = blocks.blocks
    orphans = [k for k in list(config.blocks) if k not in page]
    for k in orphans:
        config.blocks.pop(k, None)
    holder = getattr(blocks, "state_holder", None)
    state = getattr(holder, "session_data", {}).get(session_hash) if session_hash and holder is not None else None
    values = getattr(state, "config_values", None)
    if isinstance(values, dict):
        for k in [k for k in list(values) if k not in page]:
            values.pop(k, None)
    return len(orphans)
