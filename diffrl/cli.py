"""The ``diffrl`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _toy(args: argparse.Namespace) -> int:
    from diffrl.toy import ToyConfig, run

    cfg = ToyConfig(iterations=args.iterations, flat=args.flat, out=args.out, seed=args.seed)
    run(cfg)
    return 0


def _train(args: argparse.Namespace) -> int:
    from diffrl.config import load_config
    from diffrl.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, out=args.out, resume=args.resume)
    print(f"held-out strict accuracy: base {summary['base_accuracy']:.3f} -> final {summary['final_accuracy']:.3f} "
          f"({summary['steps']} steps, {summary['wall_s']:.0f} s); run directory: {args.out or cfg.log.out}")
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
    tr = sub.add_parser("train", help="RL fine-tuning from a YAML config")
    tr.add_argument("config", help="YAML config (see configs/)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 train.steps=10")
    tr.add_argument("--out", help="run directory (default: log.out of the config)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    tr.set_defaults(func=_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input (config, prompts, model path, rewards) ends in one sentence on stderr, exit code 2."""
    from diffrl.config import ConfigError
    from diffrl.prompts import PromptError
    from diffrl.scoring import RewardError

    args = build_parser().parse_args(argv)
    if getattr(args, "iterations", 1) < 1:
        print("diffrl: --iterations must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, PromptError, RewardError, FileNotFoundError) as e:
        print(f"diffrl: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "ModelLoadError":
            raise
        print(f"diffrl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
