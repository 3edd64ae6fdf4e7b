"""Official-format checkpoints: strict loading of d16/d20/d24/d30/d36-s, clear refusals, bundles.

The official files are written here from the key listing in shared/notes/var-official.md (not from
our model code). Tensors are stride-0 views of one value, so even a d30 file is a few kB."""
import math
import shutil

import pytest
import torch

from models.vqvae import VQVAE, VQVAEConfig
from studio import checkpoints
from studio.checkpoints import CheckpointError
from studio.pipeline import VARPipeline

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _t(*shape, value=0.01, dtype=torch.float32):
    return torch.full((1,), value, dtype=dtype).expand(*shape)


def official_var_state_dict(depth: int, shared: bool = False) -> dict:
    """The published key names and shapes of var_dNN.pth (notes, section 2)."""
    C, H = 64 * depth, depth
    pns = PN_512 if shared else PN_256
    L = sum(p * p for p in pns)
    lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)]).view(1, L)
    mask = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -math.inf).view(1, 1, L, L)
    sd = {"pos_start": _t(1, 1, C), "pos_1LC": _t(1, L, C), "lvl_1L": lvl, "attn_bias_for_masking": mask,
          "word_embed.weight": _t(C, 32), "word_embed.bias": _t(C), "class_emb.weight": _t(1001, C),
          "lvl_embed.weight": _t(10, C)}
    if shared:
        sd["shared_ada_lin.1.weight"], sd["shared_ada_lin.1.bias"] = _t(6 * C, C), _t(6 * C)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.scale_mul_1H11": _t(1, H, 1, 1, value=math.log(4)), b + "attn.q_bias": _t(C),
                   b + "attn.v_bias": _t(C), b + "attn.zero_k_bias": _t(C, value=0.0),
                   b + "attn.mat_qkv.weight": _t(3 * C, C), b + "attn.proj.weight": _t(C, C),
                   b + "attn.proj.bias": _t(C), b + "ffn.fc1.weight": _t(4 * C, C), b + "ffn.fc1.bias": _t(4 * C),
                   b + "ffn.fc2.weight": _t(C, 4 * C), b + "ffn.fc2.bias": _t(C)})
        if shared:
            sd[b + "ada_gss"] = _t(1, 1, 6, C)
        else:
            sd[b + "ada_lin.1.weight"], sd[b + "ada_lin.1.bias"] = _t(6 * C, C), _t(6 * C)
    sd.update({"head_nm.ada_lin.1.weight": _t(2 * C, C), "head_nm.ada_lin.1.bias": _t(2 * C),
               "head.weight": _t(4096, C), "head.bias": _t(4096)})
    return sd


@pytest.fixture(scope="module")
def official_vae_sd():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VQVAE(VQVAEConfig()).state_dict().items()}
    sd = {k: _t(*s) for k, s in shapes.items()}
    sd["quantize.ema_vocab_hit_SV"] = _t(10, 4096)
    return sd


def write_official(folder, depth, shared, vae_sd, edit=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vae_sd, folder / "vae_ch160v4096z32.pth")
    sd = official_var_state_dict(depth, shared)
    if edit:
        edit(sd)
    torch.save(sd, folder / f"var_d{depth}.pth")
    return folder


def test_official_state_dict_sizes_match_published_counts(official_vae_sd):
    assert len(official_vae_sd) == 324
    counts = {16: 220, 20: 272, 24: 324, 30: 402}
    for d, n in counts.items():
        assert len(official_var_state_dict(d)) == n
    assert len(official_var_state_dict(36, shared=True)) == 446


@pytest.mark.parametrize("depth,shared", [(20, False), (24, False), (30, False), (36, True)])
def test_strict_check_of_large_official_checkpoints(tmp_path, official_vae_sd, depth, shared):
    folder = write_official(tmp_path / f"d{depth}", depth, shared, official_vae_sd)
    loaded = checkpoints.load_official(folder, materialize=False)
    cfg = loaded.var.cfg
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.shared_aln) == (depth, 64 * depth, depth, shared)
    assert cfg.patch_nums == (PN_512 if shared else PN_256)
    assert loaded.vae.cfg.resolution == (512 if shared else 256)
    assert len(loaded.class_names) == 1000 and loaded.class_names[980] == "volcano"


def test_d16_loads_into_a_working_pipeline(tmp_path, official_vae_sd):
    folder = write_official(tmp_path / "w", 16, False, official_vae_sd)
    pipe = VARPipeline.from_pretrained(folder)
    assert pipe.var.cfg.depth == 16 and pipe.resolution == 256
    assert torch.all(pipe.var.blocks[3].attn.mat_qkv.weight == 0.01)
    assert pipe.class_names[22] == "bald eagle"


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("blocks.3.ffn.fc1.bias"), "missing keys (1): blocks.3.ffn.fc1.bias"),
    (lambda sd: sd.__setitem__("blocks.2.attn.proj.weight", _t(1024, 1000)), "blocks.2.attn.proj.weight: checkpoint (1024, 1000)"),
    (lambda sd: sd.__setitem__("blocks.0.extra", _t(3)), "unexpected keys (1): blocks.0.extra"),
])
def test_broken_official_checkpoints_are_refused_clearly(tmp_path, official_vae_sd, edit, needle):
    folder = write_official(tmp_path / "bad", 16, False, official_vae_sd, edit)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_official(folder, materialize=False)
    assert needle in str(e.value) and "var_d16.pth" in str(e.value)


def test_vae_with_a_missing_key_is_refused(tmp_path, official_vae_sd):
    sd = dict(official_vae_sd)
    del sd["decoder.conv_out.bias"]
    folder = write_official(tmp_path / "v", 16, False, sd)
    with pytest.raises(CheckpointError, match=r"vae_ch160v4096z32.pth .*missing keys \(1\): decoder.conv_out.bias"):
        checkpoints.load_official(folder, materialize=False)


def test_corrupt_and_unsafe_files_are_refused(tmp_path, official_vae_sd):
    folder = write_official(tmp_path / "c", 16, False, official_vae_sd)
    (folder / "var_d16.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read var_d16.pth"):
        checkpoints.load_official(folder, materialize=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "var_d16.pth")
    with pytest.raises(CheckpointError, match="cannot read var_d16.pth"):  # weights_only refuses pickled code
        checkpoints.load_official(folder, materialize=False)


def test_folder_problems_have_clear_messages(tmp_path, official_vae_sd):
    with pytest.raises(CheckpointError, match="no such folder"):
        VARPipeline.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="vae_ch160v4096z32.pth"):
        VARPipeline.from_pretrained(empty)
    two = write_official(tmp_path / "two", 16, False, official_vae_sd)
    shutil.copy(two / "var_d16.pth", two / "var_d20.pth")
    with pytest.raises(CheckpointError, match="variant='d16'"):
        checkpoints.load_official(two, materialize=False)
    assert checkpoints.load_official(two, variant="d16", materialize=False).var.cfg.depth == 16


def test_hub_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="Offline"):
        VARPipeline.from_pretrained("FoundationVision/var", variant="d16")


def test_bundle_round_trip_is_fp16_and_exact(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["config.json", "vae.safetensors", "var.safetensors"]
    again = VARPipeline.from_pretrained(tmp_path / "b")
    assert again.class_names == tiny_pipe.class_names and again.patch_nums == tiny_pipe.patch_nums
    for a, b in zip(tiny_pipe.var.state_dict().values(), again.var.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a.half().float(), b)  # stored in fp16, loaded exactly
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "b" / "var.safetensors"))
    sd.pop("head.bias")
    save_file(sd, str(tmp_path / "b" / "var.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): head.bias"):
        VARPipeline.from_pretrained(tmp_path / "b")
