"""``python -m ddfast.eval``: the evaluation protocol from the command line.

    # a distilled set against Fashion-MNIST's test split, IPC 10 and 50 from one tree
    python -m ddfast.eval --train runs/fmnist/distilled --source fashion-mnist --ipc 10,50 \\
        --out runs/fmnist/eval --method ours
    # the random-real baseline on an ImageNet subset
    python -m ddfast.eval --source imagefolder --root imagenet/train --test-root imagenet/val \\
        --protocol imagenet-subset --ipc 10 --out runs/woof/random --method random

One IPC writes ``results.json`` and ``results.md`` into --out; several write each into
``--out/ipc<k>/`` and one merged ``--out/results.md``. Bad input exits with code 2 and a message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddfast.data import SOURCE_NAMES, open_source
from ddfast.errors import ConfigError, DdfastError
from ddfast.eval.protocol import (
    PROTOCOLS,
    check_classes,
    evaluate,
    get_protocol,
    load_folder_set,
    load_source_set,
    merge_tables,
    write_results,
)
from ddfast.io import write_text


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected ints >= 0 (0 = all images), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddfast.eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="a distilled class-per-folder tree (else --source's train "
                   "split: the random-real baseline)")
    p.add_argument("--source", choices=SOURCE_NAMES, help="the real dataset: its test split is "
                   "the test set, and without --train its train split is the train set")
    p.add_argument("--root", help="the source's folder (imagefolder: the train split's folder)")
    p.add_argument("--test-root", help="imagefolder: the test split's folder")
    p.add_argument("--subset", help="imagefolder: an ImageNet subset (woof, nette, idc)")
    p.add_argument("--test", help="a class-per-folder test tree (instead of --source)")
    p.add_argument("--ipc", type=_ints, default=None,
                   help="images per class, comma-separated (0 = all; default: all)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="small")
    p.add_argument("--networks", default="", help="comma-separated (default: the protocol's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=0,
                   help="0 = the protocol's (small 1000, dc 1001 passes, imagenet-subset by IPC)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default: the protocol's, 64 or 256 for dc)")
    p.add_argument("--flip", choices=("auto", "on", "off"), default="auto",
                   help="horizontal flips in training (auto: the dataset's rule, Fashion-MNIST "
                   "yes and digits no; other grey sets no, colour sets yes)")
    p.add_argument("--dsa-mode", choices=("S", "M", "idc"), default=None,
                   help="DSA variant (default: the protocol's; dc: S, one group per batch as "
                   "DC; small: idc, IDC's; M: all groups on every batch)")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--method", default=None, help="the table's row label (default: ours with "
                   "--train, random without)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--progress", action="store_true", help="show per-run progress bars")
    return p


def _open(args, split: str, resolution: int | None, channels: int | None):
    root = args.test_root if (split == "test" and args.source == "imagefolder") else args.root
    if args.source == "imagefolder" and root is None:
        flag = "--test-root" if split == "test" else "--root"
        raise ConfigError(f"--source imagefolder needs {flag}: the {split} split's folder")
    return open_source(args.source, split, root=root, subset=args.subset, resolution=resolution,
                       channels=channels)


def _test_set(args, resolution: int | None, channels: int):
    """(images (M, C, R, R) uint8, labels (M,), class names) from --test or --source."""
    if args.test is not None:
        # Real test photos come in many sizes: the loader's resize + centre crop evens them.
        src = open_source("imagefolder", "test", root=args.test, channels=channels,
                          resolution=resolution)
    else:
        # The small protocol keeps the source's native size (resolution None); 224 px sets get
        # the protocol's resize 224 + centre crop 224 from the loader.
        src = _open(args, "test", resolution if args.source == "imagefolder" else None, channels)
    return src.images(range(len(src))), src.labels, list(src.class_names)


def run(args) -> list[dict]:
    proto = get_protocol(args.protocol)
    if args.train is None and args.source is None:
        raise ConfigError("nothing to train on: pass --train DIR (a distilled set) or --source "
                          "NAME (its train split, the random-real baseline)")
    if args.test is None and args.source is None:
        raise ConfigError("no test set: pass --source NAME (its test split) or --test DIR")
    networks = tuple(n for n in args.networks.split(",") if n) or proto.networks
    test_res = proto.resolution
    ipcs = args.ipc or [0]
    records, test = [], None
    train_src = _open(args, "train", None, None) if args.train is None else None
    for ipc in ipcs:
        want = ipc or None
        if train_src is None:
            train_x, train_y, names = load_folder_set(args.train, want)
        else:
            train_x, train_y, names = load_source_set(train_src, want)
        if test is None:  # the same test set serves every IPC
            test = _test_set(args, test_res or min(train_x.shape[-2:]), train_x.shape[1])
        test_x, test_y, test_names = test
        check_classes(names, test_names)
        results = evaluate(train_x, train_y, test_x, test_y, networks=networks,
                           repeats=args.repeats, epochs=args.epochs, protocol=args.protocol,
                           device=args.device, seed=args.seed, batch_size=args.batch_size,
                           progress=args.progress,
                           flip=None if args.flip == "auto" else args.flip == "on",
                           dataset=args.source if args.test is None else None,
                           dsa_mode=args.dsa_mode)
        out = Path(args.out) if len(ipcs) == 1 else Path(args.out) / f"ipc{ipc or 'full'}"
        method = args.method or ("ours" if args.train is not None else "random")
        # IPC 0 means all images: "full" for real data, the per-class count for a distilled tree.
        label = ipc or ("full" if args.train is None else results["ipc"])
        records.append(write_results(out, results, method=method, ipc=label))
        print(f"{method} IPC {label}: {out / 'results.json'}", flush=True)
    table = merge_tables(records)
    if len(records) > 1:
        write_text(Path(args.out) / "results.md", table)
    print(table, end="")
    print(f"wrote {Path(args.out) / 'results.md'}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DdfastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
