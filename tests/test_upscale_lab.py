"""lab.upscale: the 2x upscale candidates' table (issue 15: a 2x button only if it beats bicubic)."""
import numpy as np

from lab import upscale


def test_every_candidate_doubles_the_picture_and_the_table_is_against_bicubic():
    x = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    for name, fn in upscale.candidates().items():
        assert fn(x).shape == (32, 48, 3), name
    rows = upscale.measure(2, size=64)
    assert rows[0]["name"].startswith("bicubic") and len(rows) == len(upscale.candidates())
    lin = next(r for r in rows if r["name"].startswith("linear"))
    assert lin["psnr"] < rows[0]["psnr"] and lin["hf"] < rows[0]["hf"]  # bilinear: blurrier than bicubic
    text = upscale.table(rows)
    assert "+0.00" in text.splitlines()[1] and "lanczos4 (OpenCV)" in text
