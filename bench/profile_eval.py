"""Where the time of one DC/DSA evaluation goes: the study's cell shape (ConvNet-3, 28 px,
IPC 10, 10,000 test images) for a few epochs under torch.profiler, split into its training
steps and its test passes, and the operations that take the most time on the host and on the
device.

    python bench/profile_eval.py [--device cuda] [--epochs 20] [--json OUT.json]
"""

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ddfast.eval.protocol import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=gen)
    test_x = torch.randint(0, 256, (10_000, 1, 28, 28), dtype=torch.uint8, generator=gen)
    train_y, test_y = torch.arange(10).repeat(10), torch.arange(10).repeat(1000)
    cuda = args.device.startswith("cuda")

    def run(epochs):
        t0 = time.perf_counter()
        evaluate(train_x, train_y, test_x, test_y, networks=("convnet3",), repeats=1,
                 epochs=epochs, protocol="dc", device=args.device, seed=0,
                 dataset="fashion-mnist")
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(min(2, args.epochs))  # kernels, allocator and cuDNN's choices warm
    # With epochs < 100 the DC protocol tests after every epoch: one test per training step.
    whole = run(args.epochs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run(args.epochs)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.top)
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(f"{args.epochs} epochs (a step and a test each) on {args.device}: {whole:.2f} s, "
          f"{whole / args.epochs * 1000:.1f} ms per epoch")
    print(table)
    if cuda:
        print(host)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "epochs": args.epochs, "seconds": whole,
                       "ms_per_epoch": whole / args.epochs * 1000,
                       "by_device_time": table, "by_host_time": host}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
