"""The ``diffrl`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _toy(args: argparse.Namespace) -> int:
    from diffrl.toy import ToyConfig, run

    cfg = ToyConfig(iterations=args.iterations, flat=args.flat, out=args.out, seed=args.seed)
    run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffrl import __version__

    parser = argparse.ArgumentParser(prog="diffrl", description="RL alignment of diffusion and flow models.")
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="RL fine-tuning of a toy 2-D flow model (the math end to end, seconds on CPU)")
    toy.add_argument("--iterations", type=int, default=60, help="RL iterations (default 60)")
    toy.add_argument("--flat", action="store_true", help="flat GRPO instead of tree rollouts")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--out", default="runs/toy", help="run directory (default runs/toy)")
    toy.set_defaults(func=_toy)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "iterations", 1) < 1:
        print("diffrl: --iterations must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
