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
