"""The training step run eagerly and through torch.compile, and the attention-kernel probe."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddfast import perf
from ddfast.diffusion import Diffusion
from ddfast.memory import MemoryBank
from ddfast.models import EMA
from ddfast.perf import SDPA_KERNELS, attention_backends
from ddfast.trainer import objective, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10, norm_num_groups=1)
    with torch.no_grad():  # diffusers zero-initialises the output layers
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.eval()


def test_attention_backends_name_the_kernel_that_ran():
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    found = attention_backends(lambda: F.scaled_dot_product_attention(q, k, v))
    assert found and set(found) <= set(SDPA_KERNELS.values())
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_backends(lambda: F.scaled_dot_product_attention(q, k, v)) == ["math"]
    assert attention_backends(lambda: q @ k.transpose(-1, -2)) == []
    # diffusers' DiT reaches SDPA (not a hand-written attention) with the default processor.
    dit = tiny_dit()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    got = attention_backends(lambda: dit(x, timestep=t, class_labels=t % 10, return_dict=False))
    assert got == found


def test_the_attention_probe_prints_nothing():
    """torch.profiler's native library writes USDT profiler_start / profiler_stop lines to the
    process's stderr; the probe runs on every job, so it silences them (and only them)."""
    code = ("import sys, torch, torch.nn.functional as F\n"
            "from ddfast.perf import attention_backends\n"
            "q = torch.randn(1, 2, 4, 8)\n"
            "print(attention_backends(lambda: F.scaled_dot_product_attention(q, q, q)))\n"
            "print('after', file=sys.stderr)\n"
            "with torch.profiler.profile():\n"
            "    pass\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    probe_err, plain_err = done.stderr.split("after", 1)
    assert "USDT" not in probe_err and "profiler_start" not in probe_err
    assert "flash-cpu" in done.stdout or "math" in done.stdout
    # the lines are real without the silencing (torch's CPU builds print them), so the check bites
    if torch.version.cuda is None:
        assert "profiler_start" in plain_err


def _steps(loss_fn, model, bank, batches, diffusion):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    ema = EMA(params, decay=0.9)
    out = [train_step(model, opt, ema, diffusion, *batch, bank=bank, lambda_r=0.5,
                      lambda_g=0.25, loss_fn=loss_fn) for batch in batches]
    return torch.stack(out), ema


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """Three steps with the loss compiled, memory terms included: losses, parameters, EMA and
    memories agree with the eager steps."""
    diffusion = Diffusion()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        labels = torch.randint(0, 3, (6,), generator=gen)
        batches.append((torch.randn(6, 4, 8, 8, generator=gen),
                        torch.randint(0, 1000, (6,), generator=gen),
                        torch.randn(6, 4, 8, 8, generator=gen), labels, labels))
    eager_model = tiny_dit()
    compiled_model = copy.deepcopy(eager_model)
    eager_bank = MemoryBank(3, 256, real_capacity=4, gen_capacity=4)
    compiled_bank = MemoryBank(3, 256, real_capacity=4, gen_capacity=4)
    want, want_ema = _steps(objective, eager_model, eager_bank, batches, diffusion)
    got, got_ema = _steps(perf.compile(objective), compiled_model, compiled_bank, batches,
                          diffusion)
    assert torch.all(want[1:, 3:] > 0)  # rep and div are live once the memories fill
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Adam divides by sqrt(v): where a gradient is rounding noise, its sign and so that
    # element's update (up to lr = 1e-3 a step) can differ between the two runs. That bounds
    # every element by 2 * lr * steps; nearly all of them must agree far more closely.
    bound = 2 * 1e-3 * len(batches)
    pairs = [*zip(compiled_model.parameters(), eager_model.parameters(), strict=True),
             *zip(got_ema.shadow, want_ema.shadow, strict=True)]
    diff = torch.cat([(a.detach() - b.detach()).abs().flatten() for a, b in pairs])
    assert diff.max() <= bound, diff.max()
    assert (diff <= 2e-4).float().mean() >= 0.99, (diff > 2e-4).sum()
    for name in ("real", "gen"):
        g, w = getattr(compiled_bank, name), getattr(eager_bank, name)
        assert torch.equal(g.counts, w.counts)
        torch.testing.assert_close(g.items, w.items, rtol=1e-3, atol=1e-4)


def test_compile_keeps_one_kernel_cache_per_cpu_capability(monkeypatch, tmp_path):
    """Inductor's cache does not key CPU kernels by the vector width ATEN_CPU_CAPABILITY picks,
    and a kernel of the wrong width summed wrongly; perf.compile gives each capability its own
    cache, inside the folder the user chose if any."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # what torch itself writes there
    perf.compile(lambda x: x + 1)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(default, "isa-avx2")
    perf.compile(lambda x: x + 1)  # once chosen, it stays
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(default, "isa-avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    perf.compile(lambda x: x + 1)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "isa-avx2")
