"""lab/recipe.py: the whole bundle from nothing with one command (the tiny size, end to end)."""
import json

import pytest

from lab import recipe


def test_dry_run_lists_every_step_in_order(capsys):
    assert recipe.main(["--size", "cpu", "--runs", "/nonexistent/r", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[recipe]")]
    names = [ln.split()[1].rstrip(":") for ln in lines]
    assert names == ["world", "vqvae", "decoder", "var", "control-canny", "control-depth", "control-segmentation",
                     "domain-depth", "domain-seg", "domain-class", "assemble", "eval"]
    assert "--vae /nonexistent/r/decoder_export" in lines[3]  # the transformer reads the fine-tuned decoder's export


def test_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        recipe.main(["--only", "nope", "--dry-run"])


@pytest.mark.slow
def test_tiny_recipe_makes_a_loadable_bundle_and_resumes(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "bundle"
    assert recipe.main(["--size", "tiny", "--runs", str(runs), "--out", str(out)]) == 0
    from studio.pipeline import VARPipeline

    pipe = VARPipeline.from_pretrained(str(out))
    assert pipe.resolution == 32 and set(pipe.controls) == {"canny", "depth", "segmentation"}
    assert pipe.vae.cfg.decoder_fixed_norm == 3  # the bundle's decoder has no per-image norms where the blob grew
    assert sum(p.stat().st_size for p in out.iterdir()) < 64 * 2**20
    rows = json.loads((runs / "eval" / "eval.json").read_text())["rows"]
    assert any(r["section"] == "sharpness" for r in rows)
    capsys.readouterr()
    assert recipe.main(["--size", "tiny", "--runs", str(runs), "--out", str(out)]) == 0  # all done: nothing reruns
    assert capsys.readouterr().out.count(": done (") == 12
