"""DiT and VAE construction and offline loading, DiffFit, EMA.

Models are diffusers' ``DiTTransformer2DModel`` (learned variance: 2C output channels) and
``AutoencoderKL``, loaded only from local folders. diffusers gives every DiT block its own copy of
the timestep and class embedders (the original DiT has one of each); ddfast ties them back into
one shared module whenever the copies are equal (always for converted DiT checkpoints and for the
models ddfast builds), so DiffFit trains one class table, as the method counts it (~1.7 M of 675 M
parameters for DiT-XL/2). Saved models are untied again, in plain diffusers format.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from ddfast.errors import ModelError, OutputError

# DiT paper sizes (depth, hidden, heads) plus small ones trained from scratch on a CPU.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "XL/2": dict(depth=28, hidden=1152, heads=16, patch=2),
    "XL/4": dict(depth=28, hidden=1152, heads=16, patch=4),
    "L/2": dict(depth=24, hidden=1024, heads=16, patch=2),
    "B/2": dict(depth=12, hidden=768, heads=12, patch=2),
    "S/2": dict(depth=12, hidden=384, heads=6, patch=2),
    "tiny": dict(depth=6, hidden=256, heads=4, patch=2),
    "micro": dict(depth=4, hidden=128, heads=4, patch=2),
}

# "sd": the sd-vae-ft-ema / -mse architecture (factor 8, 4 latent channels, scale 0.18215).
VAE_PRESETS: dict[str, dict] = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, scaling_factor=0.18215),
    "small": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=16, scaling_factor=1.0),
}


def build_dit(preset: str, *, in_channels: int, sample_size: int, num_classes: int,
              patch_size: int | None = None) -> DiTTransformer2DModel:
    """A randomly initialised DiT of a named size, with learned variance, tied embedders."""
    if preset not in DIT_PRESETS:
        raise ModelError(f"unknown DiT preset {preset!r}; presets are {', '.join(DIT_PRESETS)}")
    p = DIT_PRESETS[preset]
    patch = patch_size or p["patch"]
    if sample_size % patch:
        raise ModelError(f"latent size {sample_size} is not divisible by the patch size "
                         f"{patch}; choose a resolution that is a multiple of {patch} (times the "
                         f"VAE factor)")
    dit = DiTTransformer2DModel(
        num_attention_heads=p["heads"], attention_head_dim=p["hidden"] // p["heads"],
        in_channels=in_channels, out_channels=2 * in_channels, num_layers=p["depth"],
        sample_size=sample_size, patch_size=patch, num_embeds_ada_norm=num_classes)
    tie_embedders(dit, force=True)  # a new model: one embedder, as the original DiT
    return dit


def build_vae(preset: str, *, in_channels: int = 3, sample_size: int = 256) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of a named architecture (benchmarks, tests)."""
    if preset not in VAE_PRESETS:
        raise ModelError(f"unknown VAE preset {preset!r}; presets are {', '.join(VAE_PRESETS)}")
    p = dict(VAE_PRESETS[preset])
    n = len(p["block_out_channels"])
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, sample_size=sample_size, **p)


def tie_embedders(dit: DiTTransformer2DModel, force: bool = False) -> bool:
    """Share block 0's timestep/class embedder with every block when all copies are equal
    (or always, with ``force``). Returns whether the embedders are now shared."""
    blocks = dit.transformer_blocks
    first = blocks[0].norm1.emb
    ref = first.state_dict()
    for block in ([] if force else blocks[1:]):
        emb = block.norm1.emb
        if emb is first:
            continue
        other = emb.state_dict()
        if other.keys() != ref.keys() or any(not torch.equal(other[k], ref[k]) for k in ref):
            return False
    for block in blocks[1:]:
        block.norm1.emb = first
    return True


def _model_folder(path: str, sub: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelError(f"model folder {root} does not exist; pass the folder that holds "
                         f"{sub}/ (a diffusers pipeline) or config.json (a model)")
    if (root / sub / "config.json").is_file():
        return root / sub
    if (root / "config.json").is_file():
        return root
    raise ModelError(f"{root} is neither a diffusers pipeline folder (with {sub}/config.json) nor "
                     f"a model folder (with config.json)")


def load_dit(path: str) -> DiTTransformer2DModel:
    """A DiT from a local pipeline folder (transformer/) or model folder, never the hub."""
    folder = _model_folder(path, "transformer")
    try:
        dit = DiTTransformer2DModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load a DiT from {folder}: {exc}") from exc
    tie_embedders(dit)
    return dit.eval()


def load_vae(path: str) -> AutoencoderKL:
    """An AutoencoderKL from a local pipeline folder (vae/) or model folder."""
    folder = _model_folder(path, "vae")
    try:
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:
        raise ModelError(f"cannot load a VAE from {folder}: {exc}") from exc


def num_label_classes(dit: DiTTransformer2DModel) -> int:
    """Classes in the DiT's label table, not counting the null class."""
    return int(dit.config.num_embeds_ada_norm)


def null_label(dit: DiTTransformer2DModel) -> int:
    """The unconditional label: diffusers appends it after the classes (1000 for DiT-XL/2)."""
    return num_label_classes(dit)


def vae_factor(vae: AutoencoderKL | None) -> int:
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def check_compatible(dit, vae, *, resolution: int, data_channels: int, num_classes: int,
                     cond_labels: list[int]) -> None:
    """Reject a DiT/VAE/data combination that cannot train, naming values that would work."""
    factor, patch = vae_factor(vae), int(dit.config.patch_size)
    if resolution % (factor * patch):
        raise ModelError(f"resolution {resolution} is not divisible by VAE factor {factor} x "
                         f"patch size {patch}; use a multiple of {factor * patch}")
    latent = resolution // factor
    if int(dit.config.sample_size) != latent:
        raise ModelError(f"the DiT expects {dit.config.sample_size}x{dit.config.sample_size} "
                         f"latents but resolution {resolution} gives {latent}; pass --resolution "
                         f"{int(dit.config.sample_size) * factor}")
    channels = int(vae.config.latent_channels) if vae is not None else data_channels
    what = "the VAE's latent channels" if vae is not None else "the image channels (pixel space)"
    if int(dit.config.in_channels) != channels:
        raise ModelError(f"the DiT takes {dit.config.in_channels} input channels but "
                         f"{what} are {channels}; pass a matching DiT or VAE")
    if int(dit.config.out_channels or 0) != 2 * channels:
        raise ModelError(f"the DiT outputs {dit.config.out_channels} channels; ddfast needs "
                         f"learned variance (2 x {channels}); pass a DiT with learn_sigma")
    if vae is not None and int(vae.config.in_channels) != data_channels:
        raise ModelError(f"the VAE takes {vae.config.in_channels}-channel images but the data "
                         f"has {data_channels}; pass --data.channels {vae.config.in_channels}")
    table = num_label_classes(dit)
    if num_classes > table or (cond_labels and max(cond_labels) >= table):
        raise ModelError(f"{num_classes} classes (labels up to {max(cond_labels)}) do not fit the "
                         f"DiT's label table of {table}; pass a DiT with more classes or use "
                         f"fewer classes (--subset)")


def _scale_hook(scale: torch.Tensor):
    def hook(module, args, output):
        return output * scale
    return hook


def apply_difffit(dit: DiTTransformer2DModel, *, scale_blocks: int | None = None) -> list:
    """DiffFit: freeze everything but biases, the class table(s) and new per-channel scales.

    Scales (initialised to 1) sit in the first ``scale_blocks`` blocks (default half) on the
    q, k, v outputs, the attention output projection, the attention residual branch and the
    MLP residual branch. Returns the trainable parameters.
    """
    if hasattr(dit, "difffit_scales"):
        raise ModelError("DiffFit is already applied to this model")
    blocks = dit.transformer_blocks
    n = len(blocks) // 2 if scale_blocks is None else scale_blocks
    scales = torch.nn.ParameterDict()
    dim = int(dit.config.num_attention_heads * dit.config.attention_head_dim)
    hooks = []
    for i, block in enumerate(blocks[:n]):
        attn = block.attn1
        for name in ("q", "k", "v", "proj", "attn_res", "mlp_res"):
            scales[f"b{i}_{name}"] = torch.nn.Parameter(torch.ones(dim))
        for name, mod in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
            hooks.append(mod.register_forward_hook(_scale_hook(scales[f"b{i}_{name}"])))
        # both scales act on the projection's output: the gate between them is elementwise too
        hooks.append(attn.to_out[0].register_forward_hook(_scale_hook(scales[f"b{i}_proj"])))
        hooks.append(attn.to_out[0].register_forward_hook(_scale_hook(scales[f"b{i}_attn_res"])))
        hooks.append(block.ff.net[-1].register_forward_hook(_scale_hook(scales[f"b{i}_mlp_res"])))
    dit.add_module("difffit_scales", scales)
    dit._difffit_hooks = hooks
    dit._difffit_blocks = n
    for name, p in dit.named_parameters():
        p.requires_grad_(name.endswith(".bias") or "class_embedder" in name
                         or name.startswith("difffit_scales."))
    return [p for p in dit.parameters() if p.requires_grad]


def set_trainable(dit: DiTTransformer2DModel, mode: str) -> list:
    """``difffit`` (the method's parameter set) or ``all`` (from-scratch training)."""
    if mode == "difffit":
        return apply_difffit(dit)
    if mode == "all":
        for p in dit.parameters():
            p.requires_grad_(True)
        return list(dit.parameters())
    raise ModelError(f"trainable must be difffit or all, got {mode!r}")


def fold_difffit(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A plain DiT (a copy) whose Linear weights absorb the DiffFit scales exactly."""
    if not hasattr(dit, "difffit_scales"):
        return copy.deepcopy(dit)
    plain = DiTTransformer2DModel.from_config(dit.config)
    shared = len({id(b.norm1.emb) for b in dit.transformer_blocks}) == 1
    if shared:
        tie_embedders(plain, force=True)
    state = {k: v for k, v in dit.state_dict().items() if not k.startswith("difffit_scales.")}
    plain.load_state_dict(state)
    s = dit.difffit_scales
    with torch.no_grad():
        for i in range(dit._difffit_blocks):
            block = plain.transformer_blocks[i]
            attn = block.attn1
            pairs = [(attn.to_q, s[f"b{i}_q"]), (attn.to_k, s[f"b{i}_k"]),
                     (attn.to_v, s[f"b{i}_v"]),
                     (attn.to_out[0], s[f"b{i}_proj"] * s[f"b{i}_attn_res"]),
                     (block.ff.net[-1], s[f"b{i}_mlp_res"])]
            for linear, scale in pairs:
                linear.weight.mul_(scale.view(-1, 1))
                if linear.bias is not None:
                    linear.bias.mul_(scale)
    return plain.to(next(dit.parameters()).device).eval()


def _untied_copy(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    plain = DiTTransformer2DModel.from_config(dit.config)
    state = {k: v.detach().clone().cpu() for k, v in dit.state_dict().items()
             if not k.startswith("difffit_scales.")}
    plain.load_state_dict(state)
    return plain


def default_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, clip_sample=False, set_alpha_to_one=True)


def save_pipeline(out_dir: str | Path, dit: DiTTransformer2DModel,
                  vae: AutoencoderKL | None = None, *, overwrite: bool = False) -> Path:
    """Write a diffusers folder (transformer/, scheduler/, and vae/ + model_index.json when a
    VAE is given, so ``DiTPipeline.from_pretrained`` loads it), atomically."""
    if hasattr(dit, "difffit_scales"):
        raise ModelError("fold the DiffFit scales first (fold_difffit) so the saved model is "
                         "a plain DiT")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + out.name + ".", dir=out.parent))
    try:
        plain = _untied_copy(dit)
        if vae is not None:
            DiTPipeline(transformer=plain, vae=copy.deepcopy(vae).cpu(),
                        scheduler=default_scheduler()).save_pretrained(str(tmp))
        else:
            plain.save_pretrained(str(tmp / "transformer"))
            default_scheduler().save_pretrained(str(tmp / "scheduler"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class EMA:
    """Exponential moving average of a list of parameters, updated with foreach ops."""

    def __init__(self, params, decay: float = 0.9999):
        self.params = [p for p in params]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # shadow <- decay * shadow + (1 - decay) * param
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params=None) -> None:
        """Write the averages into ``params`` (default: the tracked parameters)."""
        targets = self.params if params is None else list(params)
        torch._foreach_copy_(targets, self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ModelError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}: "
                             f"the checkpoint belongs to another model; use --overwrite")
        with torch.no_grad():
            for i, t in enumerate(self.shadow):
                t.copy_(state[str(i)])


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
