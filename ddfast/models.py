"""DiT and VAE construction, offline loading and saving, DiffFit, EMA.

Models are diffusers' ``DiTTransformer2DModel`` (learned variance: 2C output channels) and
``AutoencoderKL``, read only from local folders. Three facts of diffusers' DiT shape this file:
- Every block owns a copy of the timestep/class embedder (the original DiT has one; the conversion
  copies it 28 times). ddfast ties equal copies back into one module, so DiffFit trains one class
  table, as the method counts it (1.74 M of 675 M for DiT-XL/2). Saved folders are untied.
- The class table has ``num_classes + 1`` rows; the last, index ``num_classes`` (1000 for
  DiT-XL/2), is the null label of classifier-free guidance.
- In train mode diffusers drops labels (rate 0.1, global RNG) anew at each of the 29 embedder
  calls of one forward, so a sample could be conditional in one block and null in the next.
  ddfast switches that off on every model it builds or loads and drops labels itself (trainer).
- Its numerics differ from the original DiT's (facebookresearch/DiT), which trained every
  released weight, in two defaults: the sinusoidal timestep frequencies divide the exponent by
  half - 1 (``downscale_freq_shift=1``) where the original divides by half, and the LayerNorm
  before each MLP uses eps 1e-5 where the original uses 1e-6. ``original_numerics`` sets both as
  the original has them, on every DiT ddfast builds or loads; then the two forwards agree to
  rounding on the same weights. Saved folders record eps 1e-6 in their config; the timestep
  divisor has no config field, so plain diffusers loads them with its own (``load_dit`` does not).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
)
from torch import nn

from ddfast.errors import ModelError, OutputError

# DiT paper sizes plus three trained from scratch on a CPU. Parameters (tied embedders, 4 latent
# channels, 1000 classes, 32x32 latents): XL/2 674.8 M (the paper's 675.1 M also counts the fixed
# sin-cos position table, a buffer here), L/2 457.8 M, B/2 130.3 M, S/2 32.9 M. The small ones at
# 10 classes, 1 channel: tiny 7.37 M (28x28 inputs), micro 1.27 M (8x8), mini 5.01 M (28x28,
# 4x4 patches): micro's depth at tiny's width.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "XL/2": dict(depth=28, hidden=1152, heads=16, patch=2),
    "XL/4": dict(depth=28, hidden=1152, heads=16, patch=4),
    "L/2": dict(depth=24, hidden=1024, heads=16, patch=2),
    "B/2": dict(depth=12, hidden=768, heads=12, patch=2),
    "S/2": dict(depth=12, hidden=384, heads=6, patch=2),
    "tiny": dict(depth=6, hidden=256, heads=4, patch=2),
    "micro": dict(depth=4, hidden=128, heads=4, patch=2),
    "mini": dict(depth=4, hidden=256, heads=4, patch=2),
}

# "sd": the sd-vae-ft-ema / -mse architecture (83.65 M parameters, factor 8, 4 latent channels,
# latents scaled by 0.18215). "small": factor 2, for CPU demos (scale it by the latents' own std).
# "small-f4": factor 4 (28 px to 7x7x4, a quarter of the pixels), trained here with the DiT
# (``ddfast.autoencoder``) for small images such as Fashion-MNIST's; "small-f4-c8" the same with
# 8 latent channels (half the pixels).
VAE_PRESETS: dict[str, dict] = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, scaling_factor=0.18215),
    "small": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=16, scaling_factor=1.0),
    "small-f4": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                     norm_num_groups=8, scaling_factor=1.0),
    "small-f4-c8": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8,
                        norm_num_groups=8, scaling_factor=1.0),
}

_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub release says the latter
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin.index.json")
ORIGINAL_NORM_EPS = 1e-6  # every LayerNorm of the original DiT
_SCALE = "difffit_scale"  # name of a DiffFit scale, registered on the module whose output it scales
_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type="epsilon", clip_sample=False)


def _embedder(dit: DiTTransformer2DModel) -> nn.Module:
    return dit.transformer_blocks[0].norm1.emb  # the one the final layer uses too


def _no_internal_label_dropout(dit: DiTTransformer2DModel) -> None:
    # The table keeps its null row (its size is fixed at construction); only the dropping stops.
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def original_numerics(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Give a diffusers DiT the original DiT's numerics, in place (see the module doc): timestep
    frequencies ``exp(-ln(10000) * i / half)`` and LayerNorm eps 1e-6 before every MLP."""
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # tied embedders: the same module
        block.norm3.eps = ORIGINAL_NORM_EPS
    dit.register_to_config(norm_eps=ORIGINAL_NORM_EPS)  # saved folders carry the eps
    return dit


def tie_embedders(dit: DiTTransformer2DModel, force: bool = False) -> bool:
    """Share block 0's timestep/class embedder with every block when all copies are equal (or
    always, with ``force``). Returns whether the embedders are shared now."""
    first = _embedder(dit)
    ref = first.state_dict()
    for block in [] if force else dit.transformer_blocks[1:]:
        other = block.norm1.emb.state_dict()
        if other.keys() != ref.keys() or any(not torch.equal(other[k], ref[k]) for k in ref):
            return False
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb = first
    return True


@torch.no_grad()
def _init_like_dit(dit: DiTTransformer2DModel) -> None:
    """The DiT paper's initialisation (diffusers keeps torch defaults): xavier Linears, zero biases,
    adaLN-Zero (zero modulation: every block starts as the identity) and a zero output layer."""
    for module in dit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    w = dit.pos_embed.proj.weight  # the patch conv initialised like the Linear it is
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(dit.pos_embed.proj.bias)
    emb = _embedder(dit)
    nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
    for layer in [b.norm1.linear for b in dit.transformer_blocks] + [dit.proj_out_1,
                                                                     dit.proj_out_2]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_dit(preset: str, *, in_channels: int, sample_size: int, num_classes: int,
              patch_size: int | None = None) -> DiTTransformer2DModel:
    """A DiT of a named size, initialised as the DiT paper does, with learned variance
    (out_channels = 2 * in_channels), one shared embedder and ``num_classes`` + 1 table rows."""
    if preset not in DIT_PRESETS:
        raise ModelError(f"unknown DiT preset {preset!r}; presets are {', '.join(DIT_PRESETS)}")
    if min(in_channels, sample_size, num_classes) < 1:
        raise ModelError(f"in_channels, sample_size and num_classes must be positive, got "
                         f"{in_channels}, {sample_size}, {num_classes}")
    p = DIT_PRESETS[preset]
    patch = patch_size or p["patch"]
    if sample_size % patch:
        raise ModelError(f"latent size {sample_size} is not divisible by the patch size {patch}; "
                         f"use a latent size that is a multiple of {patch} or another patch size")
    dit = make_dit(depth=p["depth"], hidden=p["hidden"], heads=p["heads"], patch=patch,
                   in_channels=in_channels, out_channels=2 * in_channels,
                   sample_size=sample_size, num_classes=num_classes)
    _init_like_dit(dit)
    return dit


def make_dit(*, depth: int, hidden: int, heads: int, patch: int, in_channels: int,
             out_channels: int, sample_size: int, num_classes: int) -> DiTTransformer2DModel:
    """A DiT of any shape with torch's default initialisation, the original numerics, one shared
    embedder and no label dropout inside the model (``build_dit`` adds DiT's initialisation)."""
    if hidden % heads:
        raise ModelError(f"hidden size {hidden} is not divisible by {heads} heads")
    dit = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_channels,
        out_channels=out_channels, num_layers=depth, sample_size=sample_size, patch_size=patch,
        num_embeds_ada_norm=num_classes, norm_eps=ORIGINAL_NORM_EPS)
    original_numerics(dit)
    tie_embedders(dit, force=True)  # one embedder, as in the original DiT
    _no_internal_label_dropout(dit)
    return dit


def build_vae(preset: str, *, in_channels: int = 3, sample_size: int) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of a named architecture."""
    if preset not in VAE_PRESETS:
        raise ModelError(f"unknown VAE preset {preset!r}; presets are {', '.join(VAE_PRESETS)}")
    p = dict(VAE_PRESETS[preset])
    n = len(p["block_out_channels"])
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, sample_size=sample_size, **p)


def _model_folder(path: str | Path, sub: str, classes: tuple[str, ...]) -> tuple[Path, str | None]:
    """(model folder, weights variant) of a pipeline folder (``sub``/) or a model folder."""
    expected = (f"a diffusers pipeline folder holding {sub}/config.json and "
                f"{sub}/diffusion_pytorch_model.safetensors (or .bin), or a model folder holding "
                f"config.json and diffusion_pytorch_model.safetensors (or .bin)")
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ModelError(f"model folder {root} {what}; pass {expected}")
    folder = root / sub if (root / sub / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir())[:8]
        raise ModelError(f"{root} has no config.json (it holds {found or 'nothing'}); pass "
                         f"{expected}")
    try:
        cls = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'config.json'} is unreadable ({exc}); restore it") from exc
    if cls not in classes:
        raise ModelError(f"{folder} holds a {cls}, not a {classes[0]}; pass {expected}")
    for variant in (None, "fp16"):  # the hub release also ships fp16 variants
        names = [n.replace("model.", f"model.{variant}.") if variant else n for n in _WEIGHT_FILES]
        if any((folder / n).is_file() for n in names):
            return folder, variant
    raise ModelError(f"{folder} has a config.json but no weights; expected one of "
                     f"{', '.join(_WEIGHT_FILES)}")


def _from_pretrained(cls, folder: Path, variant: str | None):
    # Without accelerate, diffusers warns and falls back from low_cpu_mem_usage: ask for it only
    # when it can be had. A local folder never touches the hub; local_files_only makes it certain.
    fast = importlib.util.find_spec("accelerate") is not None
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, variant=variant,
                                   low_cpu_mem_usage=fast)
    except Exception as exc:  # diffusers raises OSError, ValueError, RuntimeError, ...
        raise ModelError(f"cannot load a {cls.__name__} from {folder}: {exc}") from exc


def load_dit(path: str | Path) -> DiTTransformer2DModel:
    """A DiT from a local pipeline folder (transformer/) or model folder; safetensors first."""
    dit = _from_pretrained(DiTTransformer2DModel, *_model_folder(path, "transformer",
                                                                 _DIT_CLASSES))
    tie_embedders(dit)  # equal copies (every converted checkpoint) become one again
    _no_internal_label_dropout(dit)
    return original_numerics(dit).eval()


def load_vae(path: str | Path) -> AutoencoderKL:
    """An AutoencoderKL from a local pipeline folder (vae/) or model folder."""
    return _from_pretrained(AutoencoderKL, *_model_folder(path, "vae", ("AutoencoderKL",))).eval()


def num_label_classes(dit: DiTTransformer2DModel) -> int:
    """Classes in the DiT's label table, not counting the null row."""
    return int(_embedder(dit).class_embedder.num_classes)


def null_label(dit: DiTTransformer2DModel) -> int:
    """The unconditional label: the table's last row, index num_classes (1000 for DiT-XL/2)."""
    emb = _embedder(dit).class_embedder
    if emb.embedding_table.num_embeddings != emb.num_classes + 1:
        raise ModelError("this DiT's class table has no null row, so it cannot guide; pass a DiT "
                         "built with class dropout (every diffusers DiT has one)")
    return int(emb.num_classes)


def vae_factor(vae: AutoencoderKL | None) -> int:
    """Image size / latent size: 2 ** (number of blocks - 1); 1 in pixel space (no VAE)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def check_compatible(dit: DiTTransformer2DModel, vae: AutoencoderKL | None, *, resolution: int,
                     data_channels: int, num_classes: int, cond_labels: list[int]) -> None:
    """Reject a DiT/VAE/data combination that cannot train, naming values that would work.

    cond_labels: the DiT label of each of the ``num_classes`` dataset classes."""
    factor, patch = vae_factor(vae), int(dit.config.patch_size)
    step = factor * patch
    if resolution < 1 or resolution % step:
        low, high = max(step, resolution // step * step), (resolution // step + 1) * step
        raise ModelError(f"resolution {resolution} is not divisible by VAE factor {factor} x "
                         f"patch size {patch}; use a multiple of {step} (e.g. {low} or {high})")
    if vae is not None and int(vae.config.in_channels) != data_channels:
        raise ModelError(f"the VAE takes {vae.config.in_channels}-channel images but the data has "
                         f"{data_channels}; pass a VAE for {data_channels} channels or convert "
                         f"the data to {vae.config.in_channels}")
    channels = int(vae.config.latent_channels) if vae is not None else data_channels
    what = "the VAE's latent channels" if vae is not None else "the image channels (pixel space)"
    if int(dit.config.in_channels) != channels:
        raise ModelError(f"the DiT takes {dit.config.in_channels} input channels but {what} are "
                         f"{channels}; pass a DiT with in_channels={channels} or a matching VAE")
    if int(dit.config.out_channels or 0) != 2 * channels:
        raise ModelError(f"the DiT outputs {dit.config.out_channels} channels; ddfast needs "
                         f"learned variance (2 x {channels}); pass a DiT with learned sigma")
    latent = resolution // factor
    if int(dit.config.sample_size) != latent:
        raise ModelError(f"the DiT expects {dit.config.sample_size}x{dit.config.sample_size} "
                         f"inputs but resolution {resolution} gives {latent}x{latent}; use "
                         f"resolution {int(dit.config.sample_size) * factor} or another DiT")
    if len(cond_labels) != num_classes:
        raise ModelError(f"{len(cond_labels)} conditioning labels for {num_classes} classes; "
                         f"give one DiT label per dataset class")
    table = num_label_classes(dit)
    bad = [c for c in cond_labels if not 0 <= c < table]
    if bad:
        raise ModelError(f"conditioning labels {bad[:5]} lie outside the DiT's class table of "
                         f"{table} (0..{table - 1}); pass a model with more classes or use fewer "
                         f"classes")


def _scale_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # Read through the module, not a closure: a deepcopy of the model then scales by its own copy.
    return output * getattr(module, _SCALE)


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def _difffit_sites(block: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """(module whose output is scaled, Linear that absorbs the scale when folding) of a block."""
    attn = block.attn1
    # The gate, the dropout (p = 0) and the residual add after these outputs are elementwise or
    # linear, so a per-channel scale folds into the last Linear of its branch exactly.
    return [(attn.to_q, attn.to_q), (attn.to_k, attn.to_k), (attn.to_v, attn.to_v),
            (attn.to_out[0], attn.to_out[0]),   # attention output projection
            (attn, attn.to_out[0]),             # attention residual branch
            (block.ff, _last_linear(block.ff))]  # MLP residual branch


def difffit_scales(dit: nn.Module) -> dict[str, nn.Parameter]:
    """The DiffFit scales of a model by parameter name (empty when DiffFit is not applied)."""
    return {n: p for n, p in dit.named_parameters() if n.rsplit(".", 1)[-1] == _SCALE}


def apply_difffit(dit: DiTTransformer2DModel, *,
                  scale_blocks: int | None = None) -> list[nn.Parameter]:
    """DiffFit: freeze everything but the biases, the class table and new per-channel scales.

    Scales (ones, one per output channel) go into the first ``scale_blocks`` blocks (default half)
    on the q, k, v outputs, the attention output projection, the attention residual branch and the
    MLP residual branch, as ``<module>.difffit_scale``. Returns the trainable parameters."""
    if difffit_scales(dit):
        raise ModelError("DiffFit is already applied to this model; apply it to a fresh model "
                         "(or fold_difffit first)")
    depth = len(dit.transformer_blocks)
    n = depth // 2 if scale_blocks is None else scale_blocks
    if not 0 <= n <= depth:
        raise ModelError(f"scale_blocks={n} but the DiT has {depth} blocks; use 0..{depth}")
    for block in dit.transformer_blocks[:n]:
        attn = block.attn1
        if (getattr(attn, "fused_projections", False) or attn.residual_connection
                or attn.rescale_output_factor != 1.0):
            raise ModelError("DiffFit needs the plain attention layout (separate q/k/v, no "
                             "residual inside the attention); unfuse the projections first")
        for hooked, linear in _difffit_sites(block):
            w = linear.weight
            hooked.register_parameter(_SCALE, nn.Parameter(
                torch.ones(w.shape[0], device=w.device, dtype=w.dtype)))
            hooked.register_forward_hook(_scale_output)
    return _difffit_trainable(dit)


def _difffit_trainable(dit: DiTTransformer2DModel) -> list[nn.Parameter]:
    trainable = []
    for name, p in dit.named_parameters():  # shared (tied) tensors appear once
        keep = (name.endswith(".bias") or ".class_embedder." in name
                or name.rsplit(".", 1)[-1] == _SCALE)
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    return trainable


def set_trainable(dit: DiTTransformer2DModel, mode: str, *,
                  scale_blocks: int | None = None) -> list[nn.Parameter]:
    """``difffit`` (the method's parameter set) or ``all`` (from-scratch training). A model that
    already carries DiffFit scales keeps them (and trains them) under ``difffit``."""
    if mode == "difffit":
        if difffit_scales(dit):  # a DiffFit checkpoint (Minimax, the paper) goes on training
            return _difffit_trainable(dit)
        return apply_difffit(dit, scale_blocks=scale_blocks)
    if mode == "all":
        for p in dit.parameters():
            p.requires_grad_(True)
        return list(dit.parameters())
    raise ModelError(f"trainable mode must be 'difffit' or 'all', got {mode!r}")


def _remove_scale_hooks(module: nn.Module) -> None:
    for hook_id, fn in list(module._forward_hooks.items()):
        if fn is _scale_output:
            del module._forward_hooks[hook_id]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(hook_id, None)


def fold_difffit(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A plain DiT (a copy, all parameters trainable) whose Linear weights and biases absorb the
    DiffFit scales: scale * (W x + b) = (scale W) x + scale b. A model without scales is copied."""
    plain = copy.deepcopy(dit)
    with torch.no_grad():
        for block in plain.transformer_blocks:
            for hooked, linear in _difffit_sites(block):
                scale = hooked._parameters.get(_SCALE)
                if scale is None:
                    continue
                linear.weight.mul_(scale[:, None])
                linear.bias.mul_(scale)
                delattr(hooked, _SCALE)
                _remove_scale_hooks(hooked)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


@contextlib.contextmanager
def _untied(dit: DiTTransformer2DModel):
    # safetensors refuses tensors stored under several names: give each block its own copy
    # for the duration of a save, then share again.
    shared = _embedder(dit)
    tied = [b for b in dit.transformer_blocks[1:] if b.norm1.emb is shared]
    for block in tied:
        block.norm1.emb = copy.deepcopy(shared)
    try:
        yield dit
    finally:
        for block in tied:
            block.norm1.emb = shared


def make_scheduler(config: dict | None = None) -> DDIMScheduler | DDPMScheduler:
    """DiT's training schedule (1000 linear betas 1e-4..0.02, epsilon) as a DDIM scheduler, or as
    ``config['_class_name']`` (DDIMScheduler / DDPMScheduler) with ``config`` overriding."""
    cfg = {**_SCHEDULER, **(config or {})}
    name = cfg.pop("_class_name", "DDIMScheduler")
    classes = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDPMScheduler}
    if name not in classes:
        raise ModelError(f"scheduler {name!r} is not supported; use DDIMScheduler or "
                         f"DDPMScheduler")
    return classes[name].from_config(cfg)


def save_pipeline(out_dir: str | Path, dit: DiTTransformer2DModel,
                  vae: AutoencoderKL | None = None, *, scheduler_config: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Write a diffusers DiT folder: transformer/ (safetensors), vae/ when given, scheduler/ and
    model_index.json, so that ``DiTPipeline.from_pretrained(out_dir)`` loads it (without a VAE:
    ``DiTPipeline.from_pretrained(out_dir, vae=...)``). DiffFit scales are folded on the way.

    Written to a temporary sibling folder and renamed into place, so ``out_dir`` is either absent,
    the old folder or the complete new one; an existing folder is replaced only with overwrite."""
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        raise OutputError(f"{out} exists; pass overwrite=True to replace it" if out.is_dir()
                          else f"{out} exists and is not a folder; remove it or choose another")
    scheduler = make_scheduler(scheduler_config)
    plain = fold_difffit(dit) if difffit_scales(dit) else dit
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # Component by component (what DiTPipeline.save_pretrained does, minus its warning
        # about a missing VAE); model_index.json records vae as (null, null) then.
        DiTPipeline(transformer=plain, vae=vae, scheduler=scheduler).save_config(str(tmp))
        with _untied(plain):
            plain.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        if vae is not None:
            vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class EMA:
    """Exponential moving average of parameters (the trainable ones), updated with foreach ops.

    ``EMA(model)`` tracks the model's trainable parameters by name; ``EMA(params)`` a list of
    parameters (or of (name, parameter) pairs). The averages are fp32 for lower-precision params,
    where 1 - decay = 1e-4 steps would vanish in rounding."""

    def __init__(self, params, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ModelError(f"EMA decay must lie in [0, 1], got {decay}; 0.9999 is DiT's")
        if isinstance(params, nn.Module):
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        items = list(params)
        named = bool(items) and all(isinstance(x, tuple) for x in items)
        self.names: list[str] | None = [n for n, _ in items] if named else None
        self.params: list[torch.Tensor] = [p for _, p in items] if named else items
        self.decay = decay
        self.shadow = [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
                       for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * param."""
        if self.shadow:
            src = [p.detach().to(s.dtype) for p, s in zip(self.params, self.shadow, strict=True)]
            torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)

    def _targets(self, target) -> list[torch.Tensor]:
        if target is None:
            return self.params
        if isinstance(target, nn.Module):
            if self.names is None:
                raise ModelError("this EMA tracks unnamed parameters; build it as EMA(model) to "
                                 "copy into a model, or call copy_to() without one")
            params = dict(target.named_parameters(remove_duplicate=False))
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ModelError(f"the model lacks EMA parameters {missing[:3]}; copy into a "
                                 f"model of the same architecture (DiffFit applied alike)")
            return [params[n] for n in self.names]
        targets = list(target)
        if len(targets) != len(self.shadow):
            raise ModelError(f"{len(targets)} tensors for {len(self.shadow)} EMA averages; pass "
                             f"the parameters the EMA was built from")
        return targets

    @torch.no_grad()
    def copy_to(self, target=None) -> None:
        """Write the averages into ``target``: the tracked parameters (None), a model (by name)
        or a list of tensors."""
        torch._foreach_copy_(self._targets(target), self.shadow)

    @contextlib.contextmanager
    def swap(self, target=None):
        """Run the body with the averages in place, then put the trained values back."""
        targets = self._targets(target)
        backup = [t.detach().clone() for t in targets]
        self.copy_to(targets)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"0": average of the first parameter, ...}: tensors only, for safetensors."""
        return {str(i): s for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        want = {str(i): s.shape for i, s in enumerate(self.shadow)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got.keys() != want.keys() or any(tuple(want[k]) != got[k] for k in want):
            raise ModelError(f"the EMA state holds {len(state)} tensors that do not match the "
                             f"{len(self.shadow)} tracked parameters: it belongs to another model "
                             f"or trainable set; start a new run or pass the matching model")
        for i, s in enumerate(self.shadow):
            s.copy_(state[str(i)])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module``, each shared tensor once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
