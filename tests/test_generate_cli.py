"""The generation CLI on a tiny bundle: files, parameters in the PNG, per-scale images, errors."""
from PIL import Image

from studio.generate import main, read_png_parameters


def test_cli_writes_pngs_with_parameters_and_scales(tmp_path, tiny_pipe, capsys):
    tiny_pipe.save_pretrained(tmp_path / "bundle")
    out = tmp_path / "img.png"
    rc = main(["--model", str(tmp_path / "bundle"), "--class", "class 3", "--class", "5", "--seed", "4",
               "--out", str(out), "--scales-dir", str(tmp_path / "scales")])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("img_*.png"))
    assert files == ["img_0.png", "img_1.png"]
    params = read_png_parameters(tmp_path / "img_1.png")
    assert params["class_id"] == 5 and params["seed"] == 4 and params["guidance_scale"] == 4.0
    assert Image.open(tmp_path / "img_0.png").size == (tiny_pipe.resolution,) * 2
    assert len(list((tmp_path / "scales").glob("img0_*.png"))) == tiny_pipe.num_scales


def test_cli_reports_bad_input_without_a_traceback(tmp_path, tiny_pipe, capsys):
    tiny_pipe.save_pretrained(tmp_path / "bundle")
    assert main(["--model", str(tmp_path / "bundle"), "--class", "nonsense", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown class name" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
