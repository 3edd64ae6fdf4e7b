"""The embedded default bundle (assets/default): it loads with no argument, generates every class,
and carries working domain nets. These run the real shipped model end to end."""
import numpy as np
import pytest
import torch

from studio.checkpoints import default_bundle_path
from studio.pipeline import VARPipeline


@pytest.fixture(scope="module")
def default_pipe():
    assert (default_bundle_path() / "config.json").exists(), "assets/default is missing"
    return VARPipeline.from_pretrained()


def test_loads_with_no_argument_and_lists_the_world_classes(default_pipe):
    from studio.world import CLASS_NAMES

    assert default_pipe.class_names == list(CLASS_NAMES)
    assert default_pipe.resolution >= 128
    size = sum(p.stat().st_size for p in default_bundle_path().iterdir() if p.is_file())
    assert size <= 64 * 2 ** 20


def test_generates_every_class_and_images_are_not_constant(default_pipe):
    C = default_pipe.num_classes
    out = default_pipe(class_labels=list(range(C)), generator=torch.Generator().manual_seed(0), output_type="np")
    imgs = out.images
    assert imgs.shape == (C, default_pipe.resolution, default_pipe.resolution, 3)
    assert all(im.std() > 0.02 for im in imgs)  # not a flat image
    means = imgs.mean(axis=(1, 2))
    assert np.ptp(means, axis=0).max() > 0.05  # the classes do not all look alike


def test_domain_nets_ship_in_the_bundle_and_run(default_pipe):
    from lab.domain import estimate_depth, load_domain_nets, segment
    from studio.world import render

    nets = load_domain_nets(default_bundle_path(), required=True)
    s = render(10_000_123, size=default_pipe.resolution)
    depth = estimate_depth(nets["depth"], s.image)
    labels = segment(nets["seg"], s.image)
    assert depth.shape == s.depth.shape and labels.shape == s.labels.shape
    assert (labels == s.labels).mean() > 0.5  # a held-out render is mostly segmented right


def test_control_adapters_ship_and_steer(default_pipe):
    """The bundle carries trained canny / depth / segmentation adapters: each, fed the ground-truth
    map of a held-out render, changes the generated image (an untrained adapter would not)."""
    from studio.preprocess import ground_truth_maps
    from studio.world import render

    assert sorted(default_pipe.controls) == ["canny", "depth", "segmentation"]
    s = render(10_000_123, size=default_pipe.resolution)
    gt = dict(images=np.asarray(s.image)[None], depth_m=s.depth[None], labels=s.labels[None])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = default_pipe(class_labels=[s.class_id], generator=g(), output_type="np").images[0]
    for t in ("canny", "depth", "segmentation"):
        m = ground_truth_maps(t, **gt)
        img = default_pipe(class_labels=[s.class_id], generator=g(), control_image=m, control_type=t,
                           output_type="np").images[0]
        assert img.shape == base.shape and np.abs(img - base).mean() > 1e-3, t
