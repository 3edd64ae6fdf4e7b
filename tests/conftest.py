import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from refweights import fill_reference_weights  # noqa: E402

from models.var import VAR, VARConfig  # noqa: E402
from models.vqvae import VQVAE, VQVAEConfig  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "official_tiny.pt"

# the browser tests (tests/test_browser*.py): Debian's Chromium driven by Playwright, screenshots in ARTIFACTS
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def official():
    """Outputs of the published reference implementation on tiny random weights
    (made by tools/make_official_fixture.py)."""
    return torch.load(FIXTURE, weights_only=True)


def tiny_models(official, shared=False):
    """Our models with the fixture's configuration and the same deterministic weights."""
    c = official["config"]
    vae = VQVAE(VQVAEConfig(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                            share_quant_resi=c["share_quant_resi"], patch_nums=c["patch_nums"]))
    var = VAR(VARConfig(vocab_size=c["vocab_size"], z_channels=c["z_channels"], num_classes=c["num_classes"],
                        depth=c["depth"], embed_dim=c["embed_dim"], num_heads=c["num_heads"], shared_aln=shared,
                        cond_drop_rate=0.0, patch_nums=c["patch_nums"]))
    vae.load_state_dict(fill_reference_weights(vae.state_dict(), seed=c["vae_seed"]))
    var.load_state_dict(fill_reference_weights(var.state_dict(), seed=c["var_shared_seed" if shared else "var_seed"]))
    return vae.eval(), var.eval()


@pytest.fixture(scope="session")
def tiny_pair(official):
    return tiny_models(official, shared=False)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pair):
    from studio.pipeline import VARPipeline

    vae, var = tiny_pair
    return VARPipeline(vae, var, [f"class {i}" for i in range(var.cfg.num_classes)])


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium; installed with apt-get when missing (skips only if that fails)."""
    if not os.path.exists(CHROMIUM):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            if shutil.which("apt-get") is None:
                raise RuntimeError("apt-get is not available")
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                           timeout=900, env=env)
        except Exception as e:  # no root, no network to the package mirror ...
            pytest.skip(f"Chromium is not installed at {CHROMIUM} and `apt-get install chromium` failed: {e}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium):
    """One Playwright and one Chromium for the whole pytest run (a launch costs seconds). Tests take pages
    from `open_page`; Playwright's sync API cannot be started a second time while this one runs."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1400, height=1000, timeout_ms=60_000): a fresh page in its own browser context
    (no cookies or storage from other tests) with the studio at `url` loaded; closed after the test."""
    pages = []

    def open_(url: str, width: int = 1400, height: int = 1000, timeout_ms: int = 60_000):
        page = browser.new_page(viewport={"width": width, "height": height})
        pages.append(page)
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        page.wait_for_selector("#generate-btn")
        return page

    yield open_
    for page in pages:
        page.close()
