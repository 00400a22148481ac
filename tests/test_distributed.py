"""Several processes (gloo, 2 and 3) against one process holding the whole batch: the same loss
terms, memories and parameters; the same distilled set; a 2-process checkpoint resumed on 1."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from ddfast.data.cache import LatentSet
from ddfast.diffusion import Diffusion
from ddfast.distributed import Dist
from ddfast.memory import MemoryBank
from ddfast.models import EMA, build_dit
from ddfast.sample import class_specs, write_distilled
from ddfast.trainer import StageSpec, train_stage, train_step

pytestmark = pytest.mark.slow

NUM_CLASSES, BATCH, STEPS = 3, 6, 4


def tiny_dit(channels=4):
    torch.manual_seed(0)
    dit = build_dit("micro", in_channels=channels, sample_size=8, num_classes=NUM_CLASSES)
    with torch.no_grad():  # the output layers start at zero; perturb them to test gradients
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dit


def batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
        out.append((torch.randn(BATCH, 4, 8, 8, generator=gen),
                    torch.randint(0, 1000, (BATCH,), generator=gen),
                    torch.randn(BATCH, 4, 8, 8, generator=gen), labels, labels))
    return out


def run_steps(dist, model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    ema = EMA(params, decay=0.9)
    bank = MemoryBank(NUM_CLASSES, 256, real_capacity=4, gen_capacity=3)
    forward = model
    if dist.active:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    shard = dist.shard(BATCH)
    logged = [train_step(forward, opt, ema, Diffusion(), *(x[shard] for x in batch), bank=bank,
                         lambda_r=0.5, lambda_g=0.25, dist=dist) for batch in batches()]
    return {"logged": torch.stack(logged), "params": [p.detach().clone() for p in params],
            "ema": [s.clone() for s in ema.shadow], "memory": bank.state_dict()}


def _init(rank, world, store):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                  world_size=world)
    return Dist(rank, world, rank)


def _steps_worker(rank, world, store, out):
    dist = _init(rank, world, store)
    torch.save(run_steps(dist, tiny_dit()), Path(out) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def spawn(fn, world, tmp_path, *args):
    mp.start_processes(fn, args=(world, str(tmp_path / "store"), *args), nprocs=world,
                       start_method="spawn")


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return run_steps(Dist.single(), tiny_dit())


def close(a, b, atol):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("world", [2, 3])
def test_steps_equal_one_process_with_the_whole_batch(single, tmp_path, world):
    spawn(_steps_worker, world, tmp_path, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert torch.all(single["logged"][1:, 3:] > 0)  # rep and div are live after step 1
    for got in results:
        close(got["logged"], single["logged"], 1e-5)
        # Adam divides by sqrt(v): near-zero gradients turn rounding into a fraction of lr.
        for a, b in zip(got["params"], single["params"], strict=True):
            close(a, b, 2e-4)
        for a, b in zip(got["ema"], single["ema"], strict=True):
            close(a, b, 2e-4)
        for key, value in single["memory"].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                close(got["memory"][key], value, 1e-4)
            else:
                assert got["memory"][key] == value if not isinstance(value, torch.Tensor) \
                    else torch.equal(got["memory"][key], value), key
    for other in results[1:]:  # every rank holds the same memories, bit for bit
        for key, value in results[0]["memory"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(other["memory"][key], value), key


def _sample_worker(rank, world, store, out):
    dist = _init(rank, world, store)
    distill(Path(out), dist)
    torch_dist.destroy_process_group()


def distill(out, dist):
    classes = class_specs(["a", "b", "c"], [0, 1, 2])
    write_distilled(out, tiny_dit(channels=1).eval(), None, Diffusion(), classes, 3,
                    latent_shape=(1, 8, 8), null_label=NUM_CLASSES, scale=1.0, steps=4,
                    sampler="ddpm", guidance_scale=2.0, guidance_channels="first3", seed=7,
                    batch_size=2, device=torch.device("cpu"), dist=dist)


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_distilled_set_is_identical_on_two_processes(tmp_path):
    torch.set_num_threads(1)
    distill(tmp_path / "one", Dist.single())
    spawn(_sample_worker, 2, tmp_path, str(tmp_path / "two"))
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert len(one) == 10 and one == two  # 9 images and the manifest


def stage_inputs():
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=gen, dtype=torch.uint8)
    latents = LatentSet(torch.arange(24) % NUM_CLASSES, images=images)
    return latents, MemoryBank(NUM_CLASSES, 64, real_capacity=4, gen_capacity=4)


def spec(steps):
    return StageSpec("finetune", steps, BATCH, 1e-3, 0.0, 0, 0.9, 0.1, 0.5, 0.25, log_every=3,
                     ckpt_every=3, seed=3)


def stage(folder, steps, dist):
    latents, bank = stage_inputs()
    model = tiny_dit(channels=1)
    ema = train_stage(model, latents, Diffusion(), torch.arange(NUM_CLASSES), NUM_CLASSES,
                      spec(steps), ckpt_path=folder / "ckpt.safetensors",
                      metrics_path=folder / "metrics.jsonl", bank=bank, dist=dist)
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(ema.shadow), bank


def _stage_worker(rank, world, store, folder, steps):
    dist = _init(rank, world, store)
    stage(Path(folder), steps, dist)
    torch_dist.destroy_process_group()


def test_two_process_checkpoint_resumes_on_one(tmp_path):
    torch.set_num_threads(1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    resumed.mkdir()
    want_params, want_ema, want_bank = stage(whole, 6, Dist.single())
    spawn(_stage_worker, 2, tmp_path, str(resumed), 3)  # 3 steps on 2 processes, checkpointed
    got_params, got_ema, got_bank = stage(resumed, 6, Dist.single())  # 3 more on one
    for a, b in zip(got_params, want_params, strict=True):
        close(a, b, 2e-4)
    for a, b in zip(got_ema, want_ema, strict=True):
        close(a, b, 2e-4)
    assert torch.equal(got_bank.real.counts, want_bank.real.counts)
    close(got_bank.real.items, want_bank.real.items, 0.0)  # real items are data: exact
    close(got_bank.gen.items, want_bank.gen.items, 1e-4)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # steps 3 (written by rank 0 alone) and 6


def _eval_worker(rank, world, store, out):
    dist = _init(rank, world, store)
    result = evaluate_case(dist)
    if rank == 1:
        (Path(out) / "eval.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


def evaluate_case(dist):
    from ddfast.eval import evaluate

    gen = torch.Generator().manual_seed(4)
    train_x = torch.randint(0, 256, (12, 1, 8, 8), generator=gen, dtype=torch.uint8)
    test_x = torch.randint(0, 256, (20, 1, 8, 8), generator=gen, dtype=torch.uint8)
    result = evaluate(train_x, torch.arange(12) % 3, test_x, torch.arange(20) % 3,
                      networks=["convnet3"], repeats=3, epochs=2, protocol="dc", device="cpu",
                      seed=5, dist=dist)
    result.pop("seconds")
    return result


def test_evaluation_runs_spread_over_ranks_give_the_same_result(tmp_path):
    torch.set_num_threads(1)
    want = evaluate_case(Dist.single())
    spawn(_eval_worker, 2, tmp_path, str(tmp_path))
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got == json.loads(json.dumps(want))  # rank 1 holds the gathered result too
    assert len(got["networks"]["convnet3"]["runs"]) == 3


def test_torchrun_job_matches_one_process(tmp_path):
    """The whole job under torchrun on 2 processes: one set of outputs, the same losses and
    (to a rounding flip of one grey level) the same distilled images as one process."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "ddfast.train", "--preset", "smoke", "--run.progress", "off", "--out"]
    subprocess.run([sys.executable, *args, str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", *args, str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("ddfast: done") == 1  # rank 0 alone speaks
    lines = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text()
                    .splitlines()] for name in ("one", "two")}
    assert len(lines["one"]) == len(lines["two"]) > 0
    for a, b in zip(lines["one"], lines["two"], strict=True):
        for key in ("loss", "mse", "vb", "rep", "div"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    images = sorted((tmp_path / "one" / "distilled").rglob("*.png"))
    assert len(images) == 20
    for path in images:
        other = tmp_path / "two" / path.relative_to(tmp_path / "one")
        diff = np.abs(np.asarray(Image.open(path), np.int16)
                      - np.asarray(Image.open(other), np.int16))
        assert diff.max() <= 1, path
    assert not list((tmp_path / "two").rglob("*.tmp"))


def _sigterm_worker(rank, world, store, folder):
    import os
    import signal

    import ddfast.trainer as trainer_mod

    dist = _init(rank, world, store)
    real_step, calls = trainer_mod.train_step, []

    def step(*args, **kwargs):  # rank 1 alone is told to stop, during its second step
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    trainer_mod.train_step = step
    try:
        stage(Path(folder), 6, dist)
        outcome = "finished"
    except trainer_mod.StopRequested as exc:
        outcome = str(exc)
    (Path(folder) / f"rank{rank}.txt").write_text(outcome)
    torch_dist.destroy_process_group()


def test_sigterm_to_one_rank_stops_all_at_the_same_step(tmp_path):
    """Under torchrun a signal reaches the ranks at different steps. They agree at the next log
    interval (step 3 here), checkpoint together and exit, instead of one waiting forever."""
    from ddfast.checkpoint import load_checkpoint

    folder = tmp_path / "run"
    folder.mkdir()
    ctx = mp.start_processes(_sigterm_worker, args=(2, str(tmp_path / "store"), str(folder)),
                             nprocs=2, start_method="spawn", join=False)
    for _ in range(240):  # two minutes at most; a hang fails instead of blocking the suite
        if ctx.join(timeout=0.5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the ranks did not stop together: one waits on the other")
    for rank in (0, 1):
        assert "stopped by SIGTERM after step 3/6" in (folder / f"rank{rank}.txt").read_text()
    assert load_checkpoint(folder / "ckpt.safetensors")["step"] == 3


def test_ddp_on_one_process_needs_torchrun(monkeypatch):
    """DDFAST_DDP=1 forces the process-group path for one process (ddfast.check runs the job
    that way); outside torchrun it says how to start the job instead of failing on a KeyError."""
    from ddfast.errors import ConfigError

    monkeypatch.setenv("DDFAST_DDP", "1")
    for var in ("RANK", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        Dist.from_env()
    monkeypatch.delenv("DDFAST_DDP")
    assert not Dist.from_env().active
