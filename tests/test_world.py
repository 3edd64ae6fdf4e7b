"""The procedural landscape world (studio/world) and its shards (lab/worlddata.py): determinism,
shapes, and geometric consistency of image, depth and labels. Small sizes keep the whole file to a
few seconds."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from studio.world import (
    CLASS_NAMES,
    FAR_DEPTH,
    SEG_CLASSES,
    SEG_PALETTE,
    WorldSample,
    colorize_labels,
    render,
    render_batch,
)
from lab.worlddata import ShardShuffleSampler, WorldShards
from lab.worlddata import main as cli_main
from studio.world.classes import SEG_PALETTE_JSON, WORLD_CLASSES_JSON

N = len(CLASS_NAMES)
SIZE = 48
SEG = {n: i for i, n in enumerate(SEG_CLASSES)}


@pytest.fixture(scope="module")
def sweep() -> list[WorldSample]:
    """Three worlds of every class (seeds 0 .. 3N-1)."""
    return [render(seed, SIZE) for seed in range(3 * N)]


def _tol(s: WorldSample) -> np.ndarray:
    """Height error allowed per pixel: a sample may sit up to ~half a pixel off the pixel centre."""
    xn, sl = s.pixel_rays()
    z = s.depth / np.sqrt(1 + xn**2 + sl**2)
    pixel = 2.0 * s.info["tan_half_fov"] / s.depth.shape[0]
    return 0.75 * pixel * z + 0.5


def test_constants_come_from_the_json_files():
    world = json.loads(WORLD_CLASSES_JSON.read_text())["classes"]
    seg = json.loads(SEG_PALETTE_JSON.read_text())["classes"]
    assert CLASS_NAMES == [c["name"] for c in world]
    assert SEG_CLASSES == [c["name"] for c in seg]
    assert SEG_PALETTE == [tuple(c["rgb"]) for c in seg]
    assert len(CLASS_NAMES) >= 8 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert len(SEG_CLASSES) >= 8 and len(set(SEG_PALETTE)) == len(SEG_PALETTE)
    for name in ("sky", "cloud", "water", "sand", "grass", "forest", "rock", "snow"):
        assert name in SEG_CLASSES
    rgb = colorize_labels(np.array([[0, len(SEG_CLASSES) - 1]]))
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 1]) == SEG_PALETTE[-1]


def test_shapes_dtypes_and_class_ids():
    s = render(12, 40)
    assert s.image.mode == "RGB" and s.image.size == (40, 40)
    assert s.depth.shape == (40, 40) and s.depth.dtype == np.float32
    assert s.labels.shape == (40, 40) and s.labels.dtype == np.uint8
    assert s.class_id == 12 % N and s.class_name == CLASS_NAMES[12 % N]
    by_id = render(12, 40, class_id=3)
    by_name = render(12, 40, class_id=CLASS_NAMES[3])
    assert by_id.class_id == by_name.class_id == 3
    assert np.array_equal(np.asarray(by_id.image), np.asarray(by_name.image))
    with pytest.raises(ValueError):
        render(1, 40, class_id=N)
    with pytest.raises(ValueError):
        render(1, 40, class_id="no such world")
    with pytest.raises(ValueError):
        render(-1, 40)


def test_deterministic_and_seed_dependent():
    a, b, c = render(7, SIZE), render(7, SIZE), render(7 + N, SIZE)  # c: same class, other world
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.depth, b.depth) and np.array_equal(a.labels, b.labels)
    assert a.info == b.info
    assert c.class_id == a.class_id
    assert np.abs(np.asarray(a.image, float) - np.asarray(c.image, float)).mean() > 5.0
    assert not np.array_equal(a.depth, c.depth)


def test_images_are_not_degenerate(sweep):
    for s in sweep:
        img = np.asarray(s.image, float)
        assert img.std() > 5.0, s.seed  # not a flat fill
        assert np.isfinite(s.depth).all()
    present = set(np.unique(np.concatenate([s.labels.ravel() for s in sweep])).tolist())
    assert present == set(range(len(SEG_CLASSES))), [SEG_CLASSES[i] for i in present]
    # every world has sky, and most show ground within the frame too
    assert all((s.depth == FAR_DEPTH).any() for s in sweep)
    assert np.mean([(s.depth < FAR_DEPTH).mean() > 0.3 for s in sweep]) > 0.9


def test_sky_label_iff_far_depth(sweep):
    for s in sweep:
        assert s.labels.max() < len(SEG_CLASSES)
        skyish = (s.labels == SEG["sky"]) | (s.labels == SEG["cloud"])
        assert np.array_equal(skyish, s.depth == FAR_DEPTH), s.seed
        surf = s.depth[~skyish]
        assert (surf > 0.5).all() and (surf < 0.8 * FAR_DEPTH).all()


def test_water_lies_at_the_water_level_and_land_above_it(sweep):
    seen = 0
    for s in sweep:
        wl = s.info["water_level"]
        water = s.labels == SEG["water"]
        if wl is None:
            assert not water.any(), s.seed
            continue
        h, tol = s.world_heights(), _tol(s)
        if water.any():
            seen += 1
            assert (np.abs(h[water] - wl) <= tol[water]).all(), (s.seed, np.abs(h[water] - wl).max())
        land = ~water & (s.depth < FAR_DEPTH)
        assert (h[land] >= wl - tol[land]).all(), s.seed
    assert seen >= N // 2


def _water_range(s: WorldSample, xn, sl):
    """Exact ray range to the (curved) water surface for rays (xn, sl); NaN where none."""
    dh = s.info["camera_height"] - s.info["water_level"]
    a = (1 + xn**2) / (2 * s.info["curvature_radius"])
    disc = sl**2 - 4 * a * dh
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where((sl < 0) & (disc >= 0), 2 * dh / (-sl + np.sqrt(np.maximum(disc, 0))), np.nan)
    return z * np.sqrt(1 + xn**2 + sl**2)


def test_water_depth_is_the_exact_distance_to_the_water_surface():
    """Water depth is the analytic ray/water-surface distance of one of the pixel's 2x2 sub-samples."""
    checked = 0
    for seed in range(4, 200, N):  # tropical coast: lots of sea
        s = render(seed, SIZE)
        water = s.labels == SEG["water"]
        if water.sum() < 50:
            continue
        xn, sl = s.pixel_rays()
        quarter = 0.5 * s.info["tan_half_fov"] / SIZE  # a quarter pixel, in slope units
        cands = np.stack([_water_range(s, xn + dx, sl + dy) for dx in (-quarter, quarter)
                          for dy in (-quarter, quarter)])
        rel = np.min(np.where(np.isnan(cands), np.inf, np.abs(cands - s.depth) / s.depth), axis=0)
        assert (rel[water] < 1e-3).all(), rel[water].max()
        checked += 1
        if checked == 2:
            break
    assert checked


def test_snow_only_above_the_snow_line(sweep):
    snowy = 0
    for s in sweep:
        snow = s.labels == SEG["snow"]
        line = s.info["snow_line"]
        if math.isinf(line) and line > 0:
            assert not snow.any(), (s.class_name, s.seed)
            continue
        if snow.any() and math.isfinite(line):
            snowy += 1
            h, tol = s.world_heights(), _tol(s)
            assert (h[snow] >= line - s.info["snow_jitter"] - tol[snow]).all(), s.seed
    assert snowy >= 3


def test_depth_grows_towards_the_horizon(sweep):
    corrs = []
    for s in sweep:
        surf = s.depth < FAR_DEPTH
        rows = [r for r in range(SIZE) if surf[r].mean() > 0.25]
        if len(rows) < 8:
            continue
        med = np.array([np.median(s.depth[r][surf[r]]) for r in rows])
        rank_r = np.argsort(np.argsort(rows))
        rank_d = np.argsort(np.argsort(med))
        corrs.append(np.corrcoef(rank_r, rank_d)[0, 1])
    corrs = np.array(corrs)
    assert len(corrs) >= 2 * N
    assert corrs.mean() < -0.6 and (corrs < 0).mean() > 0.85, corrs


def test_classes_look_different(sweep):
    means = np.zeros((N, 3))
    for s in sweep:
        means[s.class_id] += np.asarray(s.image, float).reshape(-1, 3).mean(0) / 3
    d = np.linalg.norm(means[:, None] - means[None, :], axis=-1)
    d[np.arange(N), np.arange(N)] = np.inf
    assert d.min() > 8.0, (d.min(), np.unravel_index(d.argmin(), d.shape))
    night = [i for i, n in enumerate(CLASS_NAMES) if "night" in n]
    day = [i for i, n in enumerate(CLASS_NAMES) if "day" in n or "noon" in n]
    assert means[night].mean() < means[day].mean() - 50


def test_render_batch_equals_render():
    seeds = [3, 11, 25]
    batch = render_batch(seeds, size=32)
    images, depth, labels, class_ids = batch
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert depth.shape == (3, 32, 32) and labels.shape == (3, 32, 32) and class_ids.shape == (3,)
    for i, seed in enumerate(seeds):
        s = render(seed, 32)
        assert np.array_equal(images[i], np.asarray(s.image))
        assert np.array_equal(depth[i], s.depth) and np.array_equal(labels[i], s.labels)
        assert class_ids[i] == s.class_id and batch.seeds[i] == seed


def test_without_supersampling_the_invariants_hold():
    s = render(9, 32, supersample=1)
    skyish = (s.labels == SEG["sky"]) | (s.labels == SEG["cloud"])
    assert np.array_equal(skyish, s.depth == FAR_DEPTH)
    water = s.labels == SEG["water"]
    assert water.any()
    xn, sl = s.pixel_rays()
    rel = np.abs(_water_range(s, xn, sl) - s.depth) / s.depth
    assert (rel[water] < 1e-3).all()  # at the pixel centre exactly


def test_cli_writes_shards_that_the_dataset_reads_back(tmp_path, capsys):
    out = tmp_path / "world"
    assert cli_main(["--out", str(out), "--count", "5", "--size", "24", "--shard-size", "2",
                     "--start-seed", "40"]) == 0
    assert "done" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 5 and meta["size"] == 24 and len(meta["shards"]) == 3
    assert meta["classes"] == CLASS_NAMES and meta["seg_classes"] == SEG_CLASSES
    with np.load(out / "shard_00001.npz") as z:
        assert z["images"].dtype == np.uint8 and z["depth"].dtype == np.float16
        assert z["labels"].dtype == np.uint8 and z["class_ids"].dtype == np.int16
        assert z["seeds"].tolist() == [42, 43]
    ds = WorldShards(out)
    assert len(ds) == 5
    ref = render_batch(range(40, 45), size=24)
    for i in range(5):
        item = ds[i]
        assert item["seed"] == 40 + i
        assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        back = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(back, ref.images[i])
        assert np.array_equal(item["depth"].numpy(), ref.depth[i].astype(np.float16).astype(np.float32))
        assert np.array_equal(item["labels"].numpy(), ref.labels[i].astype(np.int64))
        assert int(item["class_id"]) == ref.class_ids[i]
    assert (ds[-1]["seed"], ds[4]["seed"]) == (44, 44)
    with pytest.raises(IndexError):
        ds[5]
    order = list(ShardShuffleSampler(ds, seed=1))
    assert sorted(order) == list(range(5))
    # resume keeps finished shards; a different dataset in the same folder is refused
    assert cli_main(["--out", str(out), "--count", "5", "--size", "24", "--shard-size", "2",
                     "--start-seed", "40", "--resume"]) == 0
    assert cli_main(["--out", str(out), "--count", "5", "--size", "32", "--resume"]) == 2


def _render_digest(seeds, size: int, supersample: int) -> str:
    h = hashlib.sha256()
    for seed in seeds:
        s = render(seed, size, supersample=supersample)
        for a in (np.asarray(s.image), s.depth, s.labels):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps(s.info, sort_keys=True).encode())
    return h.hexdigest()[:16]


# Pinned on x86-64 / numpy's float32 kernels when the renderer was split into modules: any change to
# a pixel, a depth, a label or the camera info of these views shows here (a deliberate change of the
# world's looks updates the pins and WORLD_VERSION together).
RENDER_PINS = {(32, 2): "83acd919863f2877", (40, 1): "2d8d55581cdf5889"}


@pytest.mark.parametrize("size,supersample", list(RENDER_PINS))
def test_renders_are_pinned(size, supersample):
    assert _render_digest(range(N), size, supersample) == RENDER_PINS[size, supersample]


def test_a_dune_crest_that_rounds_past_one_renders():
    """Seed 9,885,622 (a training seed the decoder fine-tune drew at step 1546) put a dune's phase a
    float32 rounding below 1, its lee-side term (1 - q) ** 1.5 went NaN and the ray caster's bincount
    raised; the whole training run died in its DataLoader worker."""
    s = render(9885622, 128)
    assert np.isfinite(s.depth).all() and np.asarray(s.image).std() > 1.0
