"""A small random ControlVAR model folder in the released format (the VQVAE file + `d2.pth` as the
trainer saves it: {'model_state_dict': DDP `module.` keys, 'epoch', 'step'}), for the worker, app and
browser tests: ControlVAR's key names and layout, at 64 px (scales 1, 2, 3, 4), a 64-code vocabulary
and depth 2, so that a sample takes a fraction of a second. The shapes are read back from the tensors
(studio.checkpoints), as for the released d12-d30 files; tests/test_controlvar.py checks the
released shapes and the sampler against the official code."""
import torch
from refweights import fill_reference_weights

PATCH_NUMS = (1, 2, 3, 4)


def write_tiny_controlvar(folder, depth: int = 2):
    from models.controlvar import ControlVAR, ControlVARConfig
    from models.vqvae import VQVAE, VQVAEConfig

    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                            using_sa=False, using_mid_sa=False, patch_nums=PATCH_NUMS))
    torch.save(fill_reference_weights(vae.state_dict(), seed=1), folder / "vae_ch160v4096z32.pth")
    model = ControlVAR(ControlVARConfig.official(depth, patch_nums=PATCH_NUMS, vocab_size=64, z_channels=8))
    sd = fill_reference_weights(model.state_dict(), seed=2)
    torch.save({"model_state_dict": {f"module.{k}": t for k, t in sd.items()}, "epoch": 1, "step": 1},
               folder / f"d{depth}.pth")
    return folder


def write_tiny_car(folder, control_type: str = "hed", depth: int = 2):
    """A small random VAR (var_d2.pth, the same 64 px VQVAE) and a CAR file for it in the released format
    (`car_<type>_d2.pth`: the adapter's keys alone, those containing 'car'); returns the CAR file's path
    (what `app.py --model` takes)."""
    from models.car import CAR, CARConfig
    from models.var import VAR, VARConfig

    write_tiny_controlvar(folder)
    (folder / f"d{depth}.pth").unlink()  # the same VQVAE, a plain VAR this time
    cfg = VARConfig.official(depth, patch_nums=PATCH_NUMS, vocab_size=64, z_channels=8)
    torch.save(fill_reference_weights(VAR(cfg).state_dict(), seed=3), folder / f"var_d{depth}.pth")
    car = CAR(CARConfig.for_var(cfg, control_type, stem_widths=(8, 8, 16, 16, 32)))
    sd = {k: t for k, t in fill_reference_weights(car.state_dict(), seed=4).items() if "car" in k}
    path = folder / f"car_{control_type}_d{depth}.pth"
    torch.save(sd, path)
    return path
