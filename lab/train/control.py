"""`control` trainer: a control adapter (canny, depth or segmentation) for a frozen VAR bundle."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lab.train.data as data
from lab.train.artifacts import image_grid
from lab.train.config import add_config_flags, config_from_args, note_ignored_config
from lab.train.data import to_resolution
from lab.train.task import Task, TrainError, register
from lab.train.var import teacher_forcing
from models.var import VAR, VARConfig, token_weights
from models.vqvae import VQVAE, VQVAEConfig

DEFAULT_CONTROL = dict(widths=(32, 64, 128, 256), hidden=256, inject_blocks=None)
CONTROL_DERIVED = ("control_type", "in_channels", "label_map", "embed_dim", "depth", "patch_nums", "map_size")


@register
class ControlTask(Task):
    """A control adapter (models/control.py) on a frozen VAR bundle, from the world's ground truth:
    canny edges of the renders, their exact depth (normalised log-depth) or their labels."""

    name = "control"
    help = "train a control adapter (canny, depth or segmentation) for a frozen VAR bundle"
    defaults = dict(lr=5e-4, batch_size=16, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                    warmup_steps=50, num_samples=8)
    find_unused_parameters = True
    panels = [("train cross-entropy", "train", ["loss"], False),
              ("held-out cross-entropy", "eval", ["ce", "ce_base"], False),
              ("held-out scale-balanced cross-entropy", "eval", ["wce", "wce_base"], False),
              ("held-out token accuracy", "eval", ["acc", "acc_base"], False)]

    @classmethod
    def add_arguments(cls, p):
        from models.control import CONTROL_TYPES, ControlConfig

        p.add_argument("--base", help="the frozen model: a bundle folder (e.g. a `var --export`); needed for a fresh "
                                      "run, a resumed run uses the copy in its checkpoint")
        p.add_argument("--control-type", choices=CONTROL_TYPES, default="canny")
        p.add_argument("--init", help="start the adapter from this bundle's control_<type> adapter (e.g. to fine-tune "
                                      "adapters trained on an earlier transformer for a new --base); its architecture "
                                      "is kept, so the adapter config flags are ignored")
        add_config_flags(p, ControlConfig, DEFAULT_CONTROL, skip=CONTROL_DERIVED)
        g = p.add_argument_group("control maps, loss and samples")
        g.add_argument("--canny-low", type=float, default=100.0, help="canny maps: low threshold")
        g.add_argument("--canny-high", type=float, default=200.0, help="canny maps: high threshold")
        g.add_argument("--class-drop-rate", type=float, default=0.1,
                       help="replace the class by the null class (the control stays) this often")
        g.add_argument("--scale-weighting", choices=["token", "equal"], default="equal",
                       help="equal: every scale counts the same in the loss (the coarse scales fix the layout, "
                            "where a depth or segmentation map says most); token: every token the same")
        g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the sample grid")

    @property
    def data_fields(self):
        extra = {"depth": ("depth",), "segmentation": ("labels",)}.get(self.control_type, ())
        return ("image", "class_id") + extra

    def build(self, ckpt):
        from models.control import ControlAdapter, ControlConfig

        if ckpt is not None:
            self.vae = VQVAE(VQVAEConfig(**ckpt["vae_config"]))
            self.vae.load_state_dict(ckpt["vae"])
            self.var = VAR(VARConfig(**ckpt["var_config"]))
            self.var.load_state_dict(ckpt["var"])
            self.names = list(ckpt["class_names"])
            self.base = ckpt.get("base")
            cfg = ControlConfig.from_dict(ckpt["config"])
            if self.args.control_type != cfg.control_type:
                print(f"[train] resuming a {cfg.control_type} adapter; --control-type is ignored", file=sys.stderr)
        else:
            if not self.args.base:
                raise TrainError("control: --base is required (the bundle to steer) for a fresh run")
            from studio import checkpoints

            try:
                loaded = checkpoints.resolve_and_load(self.args.base)
            except checkpoints.CheckpointError as e:
                raise TrainError(f"--base {self.args.base}: {e}") from e
            self.vae, self.var, self.names = loaded.vae.float(), loaded.var.float(), list(loaded.class_names)
            self.base = str(loaded.source)
            init = self._init_adapter() if self.args.init else None
            if init is not None:
                cfg = init.cfg
            else:
                over = config_from_args(ControlConfig, self.args, DEFAULT_CONTROL, skip=CONTROL_DERIVED)
                n_seg = len(data.load_world().SEG_CLASSES) if self.args.control_type == "segmentation" else None
                cfg = ControlConfig.for_var(self.var.cfg, self.args.control_type, num_classes=n_seg,
                                            map_size=self.vae.cfg.resolution, **over)
        self.control_type = cfg.control_type
        for m in (self.vae, self.var):
            m.eval().requires_grad_(False).to(self.device)
        self.adapter = ControlAdapter(cfg)
        if ckpt is not None:
            self.adapter.load_state_dict(ckpt["model"])
        elif init is not None:
            self.adapter.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
            print(f"[train] {cfg.control_type} adapter initialised from {self.args.init}", file=sys.stderr)
        self.module = self.Module(self.adapter, self.var)
        return self.module

    def _init_adapter(self):
        """The --init bundle's adapter of --control-type, checked against the --base transformer's shape."""
        from studio import checkpoints
        from studio.pipeline import VARPipeline

        try:
            other = VARPipeline.from_pretrained(self.args.init)
        except (checkpoints.CheckpointError, OSError, ValueError) as e:
            raise TrainError(f"--init {self.args.init}: {e}") from e
        ctype = self.args.control_type
        if ctype not in other.controls:
            have = ", ".join(sorted(other.controls)) or "none"
            raise TrainError(f"--init {self.args.init} has no {ctype} adapter (it has: {have})")
        adapter = other.controls[ctype]
        c, v = adapter.cfg, self.var.cfg
        if (c.embed_dim, c.depth, tuple(c.patch_nums)) != (v.embed_dim, v.depth, tuple(v.patch_nums)):
            raise TrainError(f"--init {self.args.init}: its {ctype} adapter is for a transformer of width {c.embed_dim}, "
                             f"depth {c.depth}; --base has width {v.embed_dim}, depth {v.depth}")
        from models.control import ControlConfig

        note_ignored_config(ControlConfig, self.args, c.to_dict(), skip=CONTROL_DERIVED,
                            source=f"--init {self.args.init}")
        return adapter

    class Module(nn.Module):
        """adapter + frozen VAR: the teacher-forced loss as one forward (under autocast and DDP)."""

        def __init__(self, adapter, var):
            super().__init__()
            self.adapter, self.var = adapter, var

        def train(self, mode: bool = True):
            self.adapter.train(mode)
            self.var.eval()  # frozen: no dropout / drop-path
            return self

        def forward(self, labels, x_in, maps, targets, class_drop_rate, scale_weighting="token"):
            from models.control import control_loss

            return control_loss(self.var, self.adapter, labels, x_in, maps, targets, class_drop_rate,
                                scale_weighting=scale_weighting)

    def resolution(self):
        return self.vae.cfg.resolution

    def state(self):
        return {"config": self.adapter.cfg.to_dict(), "model": self.adapter.state_dict(),
                "var_config": self.var.cfg.to_dict(), "var": self.var.state_dict(),
                "vae_config": self.vae.cfg.to_dict(), "vae": self.vae.state_dict(),
                "class_names": list(self.names), "base": self.base}

    def maps(self, batch) -> torch.Tensor:
        from studio.preprocess import ground_truth_maps

        a = self.args
        m = ground_truth_maps(self.control_type, images=batch["image"], depth_m=batch.get("depth"),
                              labels=batch.get("labels"), low=a.canny_low, high=a.canny_high)
        return m.to(self.device)

    def tokens(self, x):
        return teacher_forcing(self.vae, x)

    def training_step(self, model, batch, step):
        target, x_in = self.tokens(batch["image"])
        loss = model(batch["class_id"], x_in, self.maps(batch), target, self.args.class_drop_rate,
                     self.args.scale_weighting)
        return loss, {}

    def set_eval_batch(self, batch):
        self.eval_batch = None
        if batch is not None:
            x = to_resolution(batch["image"], self.resolution()).to(self.device)
            target, x_in = self.tokens(x)
            self.eval_batch = (batch["class_id"].to(self.device), target, x_in, self.maps(batch), x)

    @torch.no_grad()
    def evaluate(self):
        """Held-out teacher-forced cross-entropy and token accuracy with the adapter, beside the
        frozen base model's (the gain is what the control map tells the model); wce: the same with
        every scale weighing the same (token_weights "equal"), where the layout scales show."""
        from models.control import Control, ControlHook

        if self.eval_batch is None:
            return {}
        labels, target, x_in, maps, _ = self.eval_batch
        self.adapter.eval()
        try:
            hook = ControlHook([Control(self.adapter, maps)], labels.shape[0], self.var.begin_ends)
            out = {}
            for suffix, h in (("", hook), ("_base", None)):
                logits = self.var(labels, x_in, cond_drop_rate=0.0, block_hook=h)
                ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, L)
                out["ce" + suffix] = float(ce.mean())
                out["wce" + suffix] = float((ce * token_weights(self.var.cfg.patch_nums, "equal")).sum(1).mean())
                out["acc" + suffix] = float((logits.argmax(-1) == target).float().mean())
        finally:
            self.adapter.train()
        return out

    def pipeline(self):
        from models.control import ControlAdapter
        from studio.pipeline import VARPipeline

        pipe = VARPipeline(self.vae, self.var, self.names, device=self.device)
        adapter = ControlAdapter(self.adapter.cfg)
        adapter.load_state_dict(self.adapter.state_dict())
        pipe.add_control(adapter)
        return pipe

    def write_samples(self, path):
        """Rows: held-out renders, their control maps, images generated under those maps (same classes)."""
        if self.eval_batch is None:
            return
        from studio import preprocess as pp

        labels, _, _, maps, x = self.eval_batch
        n = min(self.args.num_samples, x.shape[0])
        pipe = self.pipeline()
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        out = pipe(class_labels=labels[:n].tolist(), guidance_scale=self.args.guidance, generator=gen,
                   control_image=maps[:n], control_type=self.control_type, output_type="pt")
        shown = [torch.from_numpy(np.asarray(pp.map_preview(self.control_type, m, self.adapter.cfg.in_channels),
                                             np.float32)).permute(2, 0, 1) / 127.5 - 1 for m in maps[:n].cpu()]
        image_grid([x[:n].cpu(), torch.stack(shown), out.images.float().cpu() * 2 - 1], path)

    def final_files(self, out, info):
        from safetensors.torch import save_file

        name = f"control_{self.control_type}"
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.adapter.state_dict().items()},
                  str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps({"control": self.adapter.cfg.to_dict(), "training": info},
                                                     indent=2))

    def export(self, folder, info):
        """Add the adapter to a bundle: `folder` becomes a copy of the base bundle (unless it is the
        base) with control_<type>.safetensors (fp16) and its config under config.json["control"]."""
        import shutil

        from safetensors.torch import save_file

        from studio import checkpoints

        folder.mkdir(parents=True, exist_ok=True)
        base = Path(self.base) if self.base else None
        if base is not None and base.is_dir() and base.resolve() != folder.resolve():
            for f in base.iterdir():
                if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name == "MODEL_CARD.md"):
                    shutil.copy2(f, folder / f.name)
        if not (folder / "config.json").exists():
            checkpoints.save_bundle(folder, self.vae, self.var, self.names, dtype=torch.float16)
        cfg = checkpoints.read_bundle_config(folder)
        cfg.setdefault("control", {})[self.control_type] = self.adapter.cfg.to_dict()
        cfg.setdefault("control_training", {})[self.control_type] = info
        save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.adapter.state_dict().items()},
                  str(folder / f"control_{self.control_type}.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"[train] {self.control_type} adapter added to {folder} ({size / 2**20:.1f} MiB of weights)")

