"""Speed of one evaluation run: the protocol's harness against a straightforward reference loop.

    pytest bench/bench_eval.py --benchmark-only --benchmark-json=bench-eval.json

The reference is the loop one writes first: per-image augmentation in a Python loop on the CPU,
fp32, a ``.item()`` sync every step. The harness keeps everything on the device, augments whole
batches there, syncs only when evaluating and (on CUDA) trains with channels_last. Each
harness benchmark's extra_info holds the reference's seconds measured in the same run and the
ratio (reference / harness), plus images/s of training. ConvNet-3 at 28 px runs on the CPU;
ResNetAP-10 at 224 px (IPC 10 and 50) only with CUDA.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from ddfast.data import open_source
from ddfast.eval import evaluate, load_source_set
from ddfast.eval.protocol import LR, LR_GAMMA, MOMENTUM, WEIGHT_DECAY

CPU_EPOCHS = 2  # short on purpose: a run's cost is linear in epochs
GPU_EPOCHS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_run(train_x, train_y, test_x, test_y, *, network, epochs, device, seed,
                  batch_size=64, flip=False):
    """The protocol's recipe written plainly. train_x (N, C, H, W) uint8 on the CPU.

    Per image: random-resized crop (scale 0.5..1, ratio 3/4..4/3), optional flip, normalise;
    then CutMix on the batch; fp32; the loss is read with ``.item()`` every step.
    """
    from ddfast.eval.augment import norm_stats, test_transform
    from ddfast.eval.networks import build_network

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, size = train_x.shape[1], test_x.shape[-1]
    model = build_network(network, num_classes=10, channels=c, resolution=size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2 * epochs // 3, 5 * epochs // 6], LR_GAMMA)
    mean_t, std_t = norm_stats(c)
    mean, std = torch.tensor(mean_t).view(-1, 1, 1), torch.tensor(std_t).view(-1, 1, 1)
    test = test_transform(test_x.float().div(255), out_size=size, mean=mean_t,
                          std=std_t).to(device)  # (M, C, S, S)
    test_y = test_y.to(device)
    h, w = train_x.shape[-2:]
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train_x.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            crops = []
            for i in order[start:start + batch_size].tolist():
                img = train_x[i].float().div(255)  # (C, H, W)
                area = h * w * (0.5 + 0.5 * torch.rand((), generator=gen).item())
                u = torch.rand((), generator=gen).item()
                ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * u)  # log-uniform 3/4..4/3
                ch = min(h, round(math.sqrt(area / ratio)))
                cw = min(w, round(math.sqrt(area * ratio)))
                top = int(torch.randint(0, h - ch + 1, (), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (), generator=gen))
                crop = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size),
                                     mode="bilinear", align_corners=False)[0]  # (C, S, S)
                if flip and torch.rand((), generator=gen).item() < 0.5:
                    crop = crop.flip(-1)
                crops.append((crop - mean) / std)
            x = torch.stack(crops).to(device)  # (b, C, S, S)
            y = train_y[order[start:start + batch_size]].to(device)
            # CutMix: Beta(1, 1) is uniform, so lam is one uniform draw.
            lam = torch.rand((), generator=gen).item()
            perm = torch.randperm(x.shape[0], generator=gen)
            side = int(size * math.sqrt(1 - lam))
            cy = int(torch.randint(size, (), generator=gen))
            cx = int(torch.randint(size, (), generator=gen))
            y0, y1 = max(cy - side // 2, 0), min(cy + side // 2, size)
            x0, x1 = max(cx - side // 2, 0), min(cx + side // 2, size)
            x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (size * size)
            out = model(x)
            loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        if (epoch + 1) % max(1, epochs // 100) == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(test).argmax(1) == test_y).float().mean().item()
    return acc


def _bench(benchmark, data, *, network, protocol, epochs, device, rounds):
    """Time the reference once, then benchmark the harness; extra_info gets the ratio."""
    train_x, train_y, test_x, test_y = data
    dev = torch.device(device)
    t0 = time.perf_counter()
    reference_run(train_x, train_y, test_x, test_y, network=network, epochs=epochs, device=dev,
                  seed=0, flip=train_x.shape[1] == 3)
    _sync(dev)
    ref_s = time.perf_counter() - t0

    def harness():
        evaluate(train_x, train_y, test_x, test_y, networks=[network], repeats=1, epochs=epochs,
                 protocol=protocol, device=device, seed=0)
        _sync(dev)

    # The reference run above already warmed up the kernels and allocator.
    benchmark.pedantic(harness, rounds=rounds, iterations=1)
    info = benchmark.extra_info
    info.update(network=network, epochs=epochs, train_images=int(train_x.shape[0]),
                test_images=int(test_x.shape[0]), reference_s=ref_s)
    if benchmark.stats is not None:  # None under --benchmark-disable
        mean = benchmark.stats.stats.mean
        info["ratio_reference_over_harness"] = ref_s / mean
        info["train_images_per_s"] = epochs * train_x.shape[0] / mean


@pytest.fixture(scope="module")
def digits28():
    """IPC 10 of digits upscaled to 28 px (ConvNet-3's field-standard size), 355 test images."""
    train = open_source("digits", "train", resolution=28)
    test = open_source("digits", "test", resolution=28)
    x, y, _ = load_source_set(train, 10)
    return x, y, test.images(range(len(test))), test.labels


@pytest.mark.benchmark(group="eval_run_cpu")
def test_eval_run_convnet3_28px_ipc10_cpu(benchmark, digits28):
    _bench(benchmark, digits28, network="convnet3", protocol="small", epochs=CPU_EPOCHS,
           device="cpu", rounds=2)


@pytest.mark.benchmark(group="eval_run_cuda")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_run_convnet3_28px_dc_cuda(benchmark, digits28):
    # The study's cell on a GPU: IPC 10 under the DC/DSA recipe, tested on 10,000 images (as
    # Fashion-MNIST's test split). 100 epochs test after each: the 100 tests of a 1,000-epoch
    # run with a tenth of its steps, so the time splits into both parts.
    x, y, _, _ = digits28
    gen = torch.Generator().manual_seed(28)
    test_x = torch.randint(0, 256, (10_000, 1, 28, 28), dtype=torch.uint8, generator=gen)
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    _bench(benchmark, (x, y, test_x, torch.arange(10).repeat(1000)), network="convnet3",
           protocol="dc", epochs=100, device="cuda", rounds=1)


@pytest.mark.benchmark(group="eval_run_cuda")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="224 px runs need a CUDA device")
@pytest.mark.parametrize("ipc", [10, 50])
def test_eval_run_resnetap10_224px_cuda(benchmark, ipc):
    # Random 256 px images: speed does not depend on content; 500 test images as ImageNet val.
    gen = torch.Generator().manual_seed(ipc)
    train_x = torch.randint(0, 256, (10 * ipc, 3, 256, 256), dtype=torch.uint8, generator=gen)
    test_x = torch.randint(0, 256, (500, 3, 224, 224), dtype=torch.uint8, generator=gen)
    data = (train_x, torch.arange(10).repeat_interleave(ipc), test_x,
            torch.arange(10).repeat_interleave(50))
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    _bench(benchmark, data, network="resnetap10", protocol="imagenet-subset", epochs=GPU_EPOCHS,
           device="cuda", rounds=3)
