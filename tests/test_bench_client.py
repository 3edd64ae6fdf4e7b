"""`python -m lab.bench_client` end to end on the tiny random bundle: it starts the app, times the three
preview modes through gradio_client, prints the table and stops the app. No wall-clock thresholds."""
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_worker import TINY_PATCH_NUMS, tiny_bundle  # noqa: F401 (the fixture)

pytest.importorskip("gradio_client")

from lab.bench_client import Run, format_table, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NUM_SCALES = len(TINY_PATCH_NUMS)
NUMBER = r"(\d+\.\d+) s"


def test_overhead_is_relative_to_previews_off():
    runs = [Run("full", 0, 0.5, 3.0, 6, 6, 6, [90.0]), Run("full", 1, 0.7, 5.0, 5, 6, 6, [110.0]),
            Run("none", 0, None, 2.0, 0, 6, 6), Run("none", 1, None, 2.0, 0, 6, 6)]
    rows = summarize(runs)
    assert rows["full"]["total"] == 4.0 and rows["full"]["first_preview"] == pytest.approx(0.6)
    assert rows["full"]["overhead_pct"] == pytest.approx(100.0) and rows["none"]["overhead_pct"] == 0.0
    table = format_table(rows)
    assert "+100.0 %" in table and "baseline" in table and "5.5/6" in table


def test_bench_client_prints_three_sane_rows_and_stops_the_app(tiny_bundle):  # noqa: F811
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lab.bench_client", "--model", str(tiny_bundle), "--runs", "1",
                           "--device", "cpu", "--threads", "1", "--class", "class 3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(full|fast|none) \(", line)
        if m:
            rows[m.group(1)] = line
    assert list(rows) == ["full", "fast", "none"], out

    totals = {}
    for mode, line in rows.items():
        m = re.search(rf"(—|{NUMBER})\s+{NUMBER}\s+(\d+(?:\.\d+)?)/(\d+)\s", line)
        assert m, line
        first = None if m.group(1) == "—" else float(m.group(2))
        total, previews, scales = float(m.group(3)), float(m.group(4)), int(m.group(5))
        totals[mode] = total
        assert scales == NUM_SCALES and total > 0
        if mode == "none":
            assert first is None and previews == 0 and line.rstrip().endswith("baseline")
        else:
            assert first is not None and 0 < first <= total
            assert 1 <= previews <= NUM_SCALES
    n, e = totals["none"], 0.0005  # the totals are printed to the millisecond
    for mode in ("full", "fast"):  # the printed overhead is the printed totals' ratio, up to that rounding
        over = float(re.search(r"([+-]\d+\.\d) %$", rows[mode].rstrip()).group(1))
        t = totals[mode]
        assert 100 * (t - n - 2 * e) / (n + e) - 0.05 <= over <= 100 * (t - n + 2 * e) / (n - e) + 0.05, rows

    url = re.search(r"the app serves (http://127\.0\.0\.1:\d+/)", out).group(1)
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(url, timeout=5)  # the app was stopped


def test_preview_error_table_reports_every_scale_and_the_shipped_map_wins():
    from lab.bench_client import preview_error_table

    lines = preview_error_table("default", num_images=2).splitlines()
    fallback, shipped = (ln.split() for ln in lines[2:4])
    fallback, shipped = [float(v) for v in fallback[-10:]], [float(v) for v in shipped[-10:]]
    assert "16x16" in lines[1] and len(shipped) == 10  # one column per scale of the embedded default
    assert sum(shipped) < sum(fallback)  # the map fitted on the model's own samples is the closer one
