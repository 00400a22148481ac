"""The fine-tuning step on a GPU: no host synchronisation, and a fused attention kernel."""

import pytest
import torch

from ddfast import perf
from ddfast.diffusion import Diffusion
from ddfast.memory import MemoryBank
from ddfast.models import EMA, build_dit
from ddfast.perf import attention_backends
from ddfast.trainer import model_autocast, objective, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _setup(policy):
    dit = build_dit("micro", in_channels=4, sample_size=16, num_classes=10).cuda()
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    bank = MemoryBank(10, 4 * 16 * 16, real_capacity=8, gen_capacity=8, policy=policy,
                      device="cuda")
    return dit, opt, EMA(params, decay=0.999), bank


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", ["adaptive", "fifo"])
def test_step_never_waits_for_the_device(policy, compiled):
    dit, opt, ema, bank = _setup(policy)
    loss_fn = perf.compile(objective) if compiled else objective
    diffusion = Diffusion(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        labels = torch.randint(0, 10, (16,), device="cuda", generator=gen)
        return (torch.randn(16, 4, 16, 16, device="cuda", generator=gen),
                torch.randint(0, 1000, (16,), device="cuda", generator=gen),
                torch.randn(16, 4, 16, 16, device="cuda", generator=gen), labels, labels)

    for _ in range(3):  # warm-up: compilation and the memories filling
        train_step(dit, opt, ema, diffusion, *batch(), bank=bank, lambda_r=0.5,
                   lambda_g=0.5, precision="bf16", loss_fn=loss_fn)
    torch.cuda.synchronize()
    sums = torch.zeros(5, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            sums += train_step(dit, opt, ema, diffusion, *batch(), bank=bank, lambda_r=0.5,
                               lambda_g=0.5, precision="bf16", loss_fn=loss_fn)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sums).all() and sums[3] > 0 and sums[4] > 0


def test_dit_runs_a_fused_attention_kernel_in_bf16():
    dit = build_dit("S/2", in_channels=4, sample_size=32, num_classes=10).cuda().eval()
    x = torch.randn(8, 4, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    with model_autocast(torch.device("cuda"), "bf16"):
        found = attention_backends(lambda: dit(x, timestep=t, class_labels=t % 10,
                                               return_dict=False))
    assert found and "math" not in found, found
