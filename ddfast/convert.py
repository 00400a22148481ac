"""``python -m ddfast.convert``: DiT weights between ddfast's (diffusers) folders and the original
DiT's ``.pt`` layout.

    # a ddfast model (a run's model/ or pretrained/, any diffusers DiT folder) -> original .pt
    python -m ddfast.convert to-original runs/woof/model woof-dit.pt [--checkpoint]
    # an original / Minimax / paper .pt -> a diffusers folder that DiTPipeline loads
    python -m ddfast.convert to-diffusers DiT-XL-2-256x256.pt dit-xl2/ [--weights ema|model]

``--checkpoint`` writes DiT's training-checkpoint dict (``model``, ``ema``, ``args``) instead of
a plain state dict; its ``args`` records the attention heads, so any width converts back. The
original DiT's ``sample.py`` reads either form. DiffFit scales are folded into the weights on the
way to the original layout (the original DiT has no scales).
"""

from __future__ import annotations

import argparse
import sys

from ddfast.errors import DdfastError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-original", help="a diffusers DiT folder -> an original-layout .pt")
    a.add_argument("model", help="a DiT pipeline folder (transformer/) or model folder")
    a.add_argument("out", help="the .pt file to write")
    a.add_argument("--checkpoint", action="store_true",
                   help="write {model, ema, args} (a training checkpoint) instead of a state dict")
    a.add_argument("--overwrite", action="store_true", help="replace an existing file")
    b = sub.add_parser("to-diffusers", help="an original-layout .pt -> a diffusers folder")
    b.add_argument("checkpoint", help="a DiT state dict or a DiT / Minimax / paper checkpoint")
    b.add_argument("out", help="the folder to write (transformer/, scheduler/, model_index.json)")
    b.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which weights of a training checkpoint (default: ema)")
    b.add_argument("--heads", type=int, default=0,
                   help="attention heads, for sizes outside the DiT paper's (0: inferred)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    from ddfast.dit_original import load_original, save_original
    from ddfast.models import load_dit, save_pipeline

    try:
        if args.command == "to-original":
            path = save_original(load_dit(args.model), args.out, checkpoint=args.checkpoint,
                                 overwrite=args.overwrite)
        else:
            dit = load_original(args.checkpoint, weights=args.weights, heads=args.heads or None)
            path = save_pipeline(args.out, dit, overwrite=args.overwrite)
    except DdfastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
