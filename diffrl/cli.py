"""The ``diffrl`` command line."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
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
    summary = train(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change, command=args.command_line)
    if not summary:  # not the first of several processes: the first one reports
        return 0
    print(f"held-out strict accuracy: base {summary['base_accuracy']:.3f} -> final {summary['final_accuracy']:.3f} "
          f"({summary['steps']} steps, {summary['wall_s']:.0f} s); run directory: {args.out or cfg.log.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffrl.inference import load_for_inference, sample
    from diffrl.viz import image_grid, stills

    adapter = load_for_inference(args.model, args.lora, **_model_options(args))
    prompts = [p for p in args.prompt for _ in range(args.num)]
    images = stills(sample(adapter, prompts, args.seed, args.steps, args.guidance))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, Path(args.out), ncol=args.num, captions=prompts)
    print(f"wrote {args.out} ({len(prompts)} images)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    import rewards
    from diffrl.evaluation import evaluator_for
    from diffrl.inference import eval_accuracy, load_for_inference
    from diffrl.prompts import eval_prompts

    if args.suite:
        return _eval_suite(args)
    needs_suite = [flag for flag, given in (("--compare", args.compare), ("--no-base", args.no_base),
                                            ("--detector", args.detector), ("--out", args.out),
                                            ("--per-prompt", args.per_prompt != 1),
                                            ("a second --reward", len(args.reward) > 1)) if given]
    if needs_suite:
        print(f"diffrl: {', '.join(needs_suite)} needs --suite (e.g. --suite shapes or --suite reward)",
              file=sys.stderr)
        return 2
    reward = args.reward[0] if args.reward else None
    prompts = eval_prompts(args.prompts or "shapes:count,relation", args.n or 64)
    try:
        options = _reward_options(args.reward_option, args.reward)
        scorers = {reward: rewards.load(reward, **options.get(reward, {}))} if reward else {}
        evaluator = evaluator_for(prompts, scorers, f"reward:{reward}" if reward else "shapes")
    except (ValueError, TypeError, ImportError, OSError) as e:
        print(f"diffrl: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    adapter = load_for_inference(args.model, args.lora, **_model_options(args))
    result = {"evaluator": evaluator.name, **eval_accuracy(adapter, prompts, args.seed, args.steps, args.guidance,
                                                           evaluator)}
    print(json.dumps(result))
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    """``diffrl eval --suite NAME``: the suite's report on the base model and the LoRAs, written to ``--out``; ends
    with one line of JSON, each column's headline score."""
    import json
    from pathlib import Path

    from diffrl.distributed import setup, shutdown
    from diffrl.eval_report import evaluate, plan_columns, report_of, write_report
    from diffrl.inference import check_lora_path, load_for_inference
    from diffrl.suites import SUITES, SuiteOptions

    if args.per_prompt < 1:
        print(f"diffrl: --per-prompt must be >= 1, got {args.per_prompt}", file=sys.stderr)
        return 2
    try:
        names = [*args.reward, *(["ocr"] if args.suite == "ocr" else [])]
        options = SuiteOptions(args.prompts, args.n, args.reward, _reward_options(args.reward_option, names),
                               args.detector)
        suite = SUITES[args.suite](options)
        columns = plan_columns(args.lora, args.compare, base=not args.no_base)
    except (ValueError, TypeError, ImportError, OSError) as e:
        print(f"diffrl: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    items = [item for item in suite.items() for _ in range(args.per_prompt)]
    for lora in {c.lora for c in columns if c.lora}:  # before any model loads
        check_lora_path(lora)
    try:  # under torchrun / accelerate launch: this process's device, the process group joined
        place = setup(args.device)
    except ValueError as e:
        print(f"diffrl: --device {args.device}: {e}", file=sys.stderr)
        return 2
    options = {**_model_options(args), "device": str(place.device)}
    try:
        results, grids = evaluate(suite, items, columns, lambda lora: load_for_inference(args.model, lora, **options),
                                  args.seed, args.steps, args.guidance, rank=place.rank, world=place.world)
    finally:
        shutdown()
    if place.rank != 0:  # it sampled its share; the first process scores and writes
        return 0
    settings = {key: getattr(args, key) for key in ("suite", "model", "lora", "compare", "prompts", "n", "per_prompt",
                                                    "steps", "guidance", "seed", "family", "device", "dtype",
                                                    "reward", "reward_option", "detector")}
    report = report_of(suite, getattr(args, "command_line", "diffrl eval"), settings, results)
    out = Path(args.out or f"runs/eval-{args.suite}")
    written = write_report(out, report, grids)
    print(f"wrote {out}: report.json, report.md and {len(written) - 2} sample grids")
    print(json.dumps({"suite": suite.name, "metric": suite.metric,
                      **{label: r["overall"][suite.metric] for label, r in results.items()}}))
    return 0


def _guide(args: argparse.Namespace) -> int:
    from pathlib import Path

    import rewards
    from diffrl.adapters import shape_options
    from diffrl.guided_sampling import load_reference, sweep
    from diffrl.inference import check_lora_path, load_for_inference
    from diffrl.prompts import eval_prompts

    if not args.lora and not args.reference_model:
        print("diffrl: RL guidance needs a fine-tuned model and a reference: give --lora (the reference is the model "
              "without it) or --reference-model", file=sys.stderr)
        return 2
    if args.rl_only_steps < 0:
        print("diffrl: --rl-only-steps must be >= 0", file=sys.stderr)
        return 2
    if args.lora:  # before the reward models load; load_for_inference checks it again for sample and eval
        check_lora_path(args.lora)
    try:
        options = _reward_options(args.reward_option, args.reward)
        scorers = {name: rewards.load(name, **options.get(name, {})) for name in args.reward}
    except (ValueError, TypeError, ImportError, OSError) as e:
        print(f"diffrl: --reward: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    prompts = args.prompt or eval_prompts(args.prompts, args.n)
    adapter = load_for_inference(args.model, args.lora, **_model_options(args))
    reference = load_reference(args.reference_model, args.family, args.device, args.dtype,
                               **shape_options(args.resolution, args.num_frames))
    result = sweep(adapter, prompts, args.w, scorers, Path(args.out), seed=args.seed, steps=args.steps,
                   guidance=args.guidance, schedule=args.schedule, rl_only_steps=args.rl_only_steps, kind=args.kind,
                   ref_guidance=args.ref_guidance, reference=reference, progress=print)
    print(f"wrote {args.out}/sweep.png (rows: {len(result['prompts'])} prompts, columns: w = "
          f"{', '.join(f'{w:g}' for w in args.w)}), sweep_rewards.png and sweep.json")
    return 0


def _push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffrl.hub import PushError, push

    try:
        url = push(Path(args.run_dir), args.repo_id, private=args.private, kind=args.kind)
    except (PushError, OSError, ValueError) as e:  # OSError, ValueError: no token, no network, a bad repo id
        print(f"diffrl: push {args.run_dir} to {args.repo_id}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"pushed the export of {args.run_dir} with its model card to {url}")
    return 0


def _reward_options(texts: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """``--reward-option NAME.KEY=VALUE`` (VALUE read as YAML) -> ``{NAME: {KEY: VALUE}}``; ValueError in one
    sentence for a malformed one or a NAME not given with ``--reward``."""
    import yaml

    options: dict[str, dict] = {}
    for text in texts:
        left, sep, value = text.partition("=")
        name, dot, key = left.rpartition(".")
        if not (sep and dot and name and key):
            raise ValueError(f"--reward-option {text!r} must look like NAME.KEY=VALUE "
                             "(e.g. aesthetic.weights=head.pth)")
        if name not in names:
            raise ValueError(f"--reward-option {text!r} names {name!r}, which is not a --reward ({list(names)})")
        options.setdefault(name, {})[key] = yaml.safe_load(value)
    return options


def _model_options(args: argparse.Namespace) -> dict:
    """``load_for_inference``'s keyword arguments from the inference flags."""
    family_guidance = {k: v for k, v in (("guidance_scale_2", args.guidance_2),
                                         ("audio_guidance_scale", args.audio_guidance)) if v is not None}
    return dict(device=args.device, dtype=args.dtype, family=args.family, resolution=args.resolution,
                num_frames=args.num_frames, family_guidance=family_guidance)


def _serve_reward(args: argparse.Namespace) -> int:
    import yaml

    import rewards
    from rewards.remote import make_server

    options = {}
    for text in args.option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            print(f"diffrl: --option {text!r} must be key=value", file=sys.stderr)
            return 2
        options[key] = yaml.safe_load(value)
    try:
        reward = rewards.load(args.reward, **options)
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"diffrl: cannot load reward {args.reward!r}: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(reward, args.reward, args.host, args.port)
    except (OSError, OverflowError) as e:
        print(f"diffrl: cannot listen on {args.host}:{args.port} ({e}); choose another --port (0: any free one)",
              file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward} on http://{host}:{port} (POST /score, GET /health); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _inference_args(p: argparse.ArgumentParser) -> None:
    from diffrl.inference import EVAL_GUIDANCE, EVAL_SEED, EVAL_STEPS

    p.add_argument("--model", default="assets/tiny-sd3-shapes", help="diffusers folder or hub id")
    p.add_argument("--lora", help="LoRA folder written by diffrl train (run_dir/lora)")
    p.add_argument("--family", default="sd3", help="model family adapter: sd3, flux, sana, wan (default sd3)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--num-frames", type=int, help="video families: frames per clip (grids show the middle frame)")
    p.add_argument("--steps", type=int, default=EVAL_STEPS)
    p.add_argument("--guidance", type=float, default=EVAL_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--guidance-2", type=float,
                   help="Wan 2.2: the low-noise expert's guidance scale (default --guidance)")
    p.add_argument("--audio-guidance", type=float, help="LTX-2: the audio stream's guidance scale (default --guidance)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32; bfloat16 halves the memory on GPUs)")


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
    tr.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue with a config that differs from the run's (the changes are logged)")
    tr.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start a new one")
    tr.set_defaults(func=_train)
    sp = sub.add_parser("sample", help="images from a base model plus an optional LoRA (deterministic sampler)")
    _inference_args(sp)
    sp.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sp.add_argument("--num", type=int, default=4, help="images per prompt")
    sp.add_argument("--out", default="samples.png")
    sp.set_defaults(func=_sample)
    ev = sub.add_parser("eval", help="score a base model and fine-tuned LoRAs side by side with an evaluation suite "
                                     "(--suite shapes|ocr|geneval|reward: a report folder), or print one line of "
                                     "JSON: the shapes verifier's strict accuracy or a reward's mean")
    _inference_args(ev)
    ev.add_argument("--suite", choices=["shapes", "ocr", "geneval", "reward"],
                    help="evaluation suite; writes report.json, report.md and per-category sample grids to --out: "
                         "shapes (the shapes verifier's strict accuracy per prompt kind), ocr (the OCR reward on "
                         "prompts/ocr_suite.jsonl, 300 held-out text-rendering prompts, per target length), geneval "
                         "(GenEval's per-tag accuracy on GenEval-format metadata, with a pluggable --detector; "
                         "default: the shapes world's), reward (the mean of each --reward on any --prompts)")
    ev.add_argument("--prompts", help="shapes[:<kinds>] or a prompt file; with --suite a .jsonl line may carry a "
                                      "'category' (reward), a 'text' target (ocr), or be GenEval metadata (geneval) "
                                      "(default: the suite's own; without --suite shapes:count,relation)")
    ev.add_argument("--n", "--num-prompts", dest="n", type=int,
                    help="the first N prompts (default 64; geneval 96; ocr all 300); under torchrun write "
                         "--num-prompts, since the launchers' own parsers take --n for one of their options")
    ev.add_argument("--per-prompt", type=int, default=1, help="--suite: samples per prompt, each from its own seed")
    ev.add_argument("--reward", action="append", default=[],
                    help="score with this reward's mean instead of the shapes verifier (repeatable with --suite "
                         "reward; the first is the headline)")
    ev.add_argument("--reward-option", action="append", default=[], help="NAME.KEY=VALUE passed to the reward")
    ev.add_argument("--compare", action="append", default=[], metavar="LORA",
                    help="--suite: another LoRA folder, one more column beside the base model and --lora (repeatable)")
    ev.add_argument("--no-base", action="store_true",
                    help="--suite: leave out the base model's column (by default it is evaluated beside --lora)")
    ev.add_argument("--detector", help="--suite geneval: the object detector, shapes (default) or pkg.module:attr "
                                       "(a callable image -> [{class, box, score, color}], or a class of one)")
    ev.add_argument("--out", help="--suite: the report folder (default runs/eval-SUITE)")
    ev.set_defaults(func=_eval)
    gd = sub.add_parser("guide", help="RL guidance: sample at strengths w of a LoRA (or a second model) against the "
                                      "reference, with a grid and reward-vs-w plot")
    _inference_args(gd)
    gd.add_argument("--reference-model", help="a second full model as the reference (default: --model without --lora)")
    gd.add_argument("--w", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                    help="RL-guidance scales: 0 reference, 1 fine-tuned, >1 extrapolates (default 0 0.5 1 1.5 2)")
    gd.add_argument("--schedule", default="constant", choices=["constant", "ramp"],
                    help="w over the steps: constant, or a ramp from 1 at the first step to w at the last")
    gd.add_argument("--rl-only-steps", type=int, default=0, help="the first N steps use the fine-tuned model alone")
    gd.add_argument("--ref-guidance", type=float, help="the reference's CFG scale (default: --guidance)")
    gd.add_argument("--kind", default="ode", choices=["ode", "flow", "dance", "cps"], help="sampler (default ode)")
    gd.add_argument("--prompt", action="append", help="a prompt (repeatable); default: --prompts")
    gd.add_argument("--prompts", default="shapes:count,relation", help="shapes:<kinds> or a prompt file")
    gd.add_argument("--n", type=int, default=8, help="prompts taken from --prompts")
    gd.add_argument("--reward", action="append", default=[], help="a reward to score every w with (repeatable)")
    gd.add_argument("--reward-option", action="append", default=[],
                    help="NAME.KEY=VALUE passed to reward NAME, e.g. aesthetic.weights=head.pth (repeatable)")
    gd.add_argument("--out", default="runs/guide", help="output folder (default runs/guide)")
    gd.set_defaults(func=_guide)
    sr = sub.add_parser("serve-reward", help="serve a reward function over HTTP (JSON + PNG, never pickle)")
    sr.add_argument("reward", help="a reward name or pkg.module:function")
    sr.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sr.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    sr.add_argument("--option", action="append", default=[], help="key=value passed to the reward (repeatable)")
    sr.set_defaults(func=_serve_reward)
    pu = sub.add_parser("push", help="upload a finished run's LoRA (or fully fine-tuned weights) with its model card "
                                     "to a Hugging Face Hub repository")
    pu.add_argument("run_dir", help="run directory of a finished diffrl train")
    pu.add_argument("repo_id", help="Hub repository, e.g. your-name/sd35-ocr-lora (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    which = pu.add_mutually_exclusive_group()
    which.add_argument("--lora", dest="kind", action="store_const", const="lora", help="push RUN_DIR/lora")
    which.add_argument("--full", dest="kind", action="store_const", const="full",
                       help="push RUN_DIR/transformer (a full fine-tune; default: whichever the run exported)")
    pu.set_defaults(func=_push, kind=None)
    return parser


EXIT_CODES = {0: "finished", 1: "a bug in diffrl or a reward (a traceback; please report it)",
              2: "bad input or environment, in one sentence: config, paths, prompts, rewards that fail or hang on "
                 "every sample, a run directory in use, a checkpoint that cannot be written",
              3: "a run stopped because a value went non-finite (summary.json says where; nothing exported)",
              130: "interrupted (Ctrl-C); a run resumes from its last checkpoint with --resume"}
"""What ``diffrl``'s exit status means."""
COUNTS = ("iterations", "num", "n", "steps", "num_frames", "resolution")
"""Integer arguments that must be >= 1 wherever a command has them."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input (config, prompts, model path, rewards) ends in one sentence on stderr, exit code 2;
    ``EXIT_CODES`` lists every status."""
    from diffrl.adapters.base import ModelLoadError
    from diffrl.checkpoint import CheckpointError
    from diffrl.config import ConfigError
    from diffrl.distributed import FirstProcessError
    from diffrl.finite import NonFiniteError
    from diffrl.prompts import PromptError
    from diffrl.scoring import RewardError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.command_line = shlex.join(["diffrl", *(sys.argv[1:] if argv is None else argv)])
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after --out or --resume: argparse stops collecting positionals there
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if os.getcwd() not in sys.path:  # "my_module:reward" paths resolve from the current directory, as with python -m
        sys.path.insert(0, os.getcwd())
    bad = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}" for name in COUNTS
           if isinstance(getattr(args, name, None), int) and getattr(args, name) < 1]
    if bad:
        print(f"diffrl: {'; '.join(bad)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, PromptError, RewardError, FileNotFoundError, ModelLoadError, CheckpointError,
            FirstProcessError) as e:
        print(f"diffrl: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"diffrl: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("diffrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
