"""Sampling and evaluation with a base model and an optional LoRA (``diffrl sample`` / ``diffrl eval``)."""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, ModelLoadError
from diffrl.distributed import gather_rows
from diffrl.rollout import tree_rollout
from diffrl.seeding import mix_seed
from diffrl.tree import TreeSchedule


@torch.no_grad()
def sample(adapter, prompts: Sequence[str], seed: int, steps: int, guidance: float, max_batch: int = 64,
           reference: bool = False, first: int = 0) -> Tensor:
    """Deterministic (ODE) samples ``[n, 3, H, W]`` in [0, 1], one per prompt; sample ``i`` starts from the noise
    of ``mix_seed(seed, first + i)`` (``first``: where these prompts start in a longer list split between
    processes). ``reference=True`` samples with the LoRA adapters switched off."""
    seeds = [mix_seed(seed, first + i) for i in range(len(prompts))]
    velocity = lambda x, sigma, cond: adapter.velocity(x, sigma, cond, guidance)  # noqa: E731
    with adapter.reference() if reference else contextlib.nullcontext():
        ro = tree_rollout(velocity, TreeSchedule(steps), adapter.sigmas(steps), seeds, adapter.latent_shape,
                          kind="ode", cond=adapter.encode(list(prompts)), max_batch=max_batch, device=adapter.device)
    return adapter.decode(ro.leaves.flatten(0, 1))


def sample_shared(adapter, prompts: Sequence[str], seed: int, steps: int, guidance: float, max_batch: int = 64,
                  reference: bool = False, rank: int = 0, world: int = 1) -> Union[Tensor, dict[str, Tensor]]:
    """``sample`` split between ``world`` processes (this one is ``rank``): each samples a contiguous share of the
    prompts (padded to equal shares with the last prompt: under FSDP each forward is a collective) and the media
    are gathered in prompt order, so every process gets exactly what one process would have sampled alone, about
    ``world`` times sooner. Media ``[n, ...]``, or a dict of them for joint audio-video."""
    if world == 1:
        return sample(adapter, prompts, seed, steps, guidance, max_batch, reference)
    n, share = len(prompts), math.ceil(len(prompts) / world)
    first = rank * share
    mine = list(prompts[first : first + share])
    mine += [prompts[-1]] * (share - len(mine))
    media = sample(adapter, mine, seed, steps, guidance, max_batch, reference, first=first)
    if isinstance(media, dict):
        return {k: gather_rows(v)[:n] for k, v in media.items()}
    return gather_rows(media)[:n]


EVAL_SEED, EVAL_STEPS, EVAL_GUIDANCE = 999, 20, 4.5
"""``diffrl eval``'s defaults: the seed, Euler steps and guidance scale of its deterministic sampler."""


def eval_accuracy(adapter, prompts: Sequence[str], seed: int = EVAL_SEED, steps: int = EVAL_STEPS,
                  guidance: float = EVAL_GUIDANCE, evaluator=None) -> dict[str, float]:
    """What ``diffrl eval`` prints: ``evaluator``'s metrics (``diffrl.evaluation``; default the shapes verifier's
    strict accuracy, overall and per kind) of one deterministic sample per prompt."""
    from diffrl.evaluation import ShapesEvaluator

    return (evaluator or ShapesEvaluator())(sample(adapter, prompts, seed, steps, guidance), prompts)


def shapes_accuracy(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Verifier strict accuracy overall and per prompt kind."""
    from diffrl.shapes import parse_prompt
    from rewards.shapes import shapes_reward

    strict = shapes_reward(images, list(prompts))["strict"]
    kinds = [parse_prompt(p).kind for p in prompts]
    out = {"accuracy": float(strict.mean())}
    for k in sorted(set(kinds)):
        out[f"accuracy_{k}"] = float(strict[[i for i, kk in enumerate(kinds) if kk == k]].mean())
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of ``k`` samples drawn without replacement from ``n`` samples, ``c`` of them
    correct, is correct: ``1 - C(n - c, k) / C(n, k)`` (the unbiased pass@k estimator of Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_lora_path(lora: str) -> None:
    """A LoRA argument must be an existing folder (a run's ``RUN_DIR/lora``), not a hub id."""
    if not Path(lora).is_dir():
        raise ModelLoadError(f"--lora {lora!r} does not exist or is not a folder (a diffrl run writes it to "
                             "RUN_DIR/lora)")


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file ``save_lora_weights`` writes; diffusers reads it, else a folder's only safetensors file."""
_LORA_KEY = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_[A-Za-z]+)\.weight$")
"""A LoRA matrix: diffusers' ``<component>.<module>.lora_A.weight`` / ``lora_B``, or another format's ``lora_down``
/ ``lora_up``."""


def _lora_file(folder: Path) -> Optional[Path]:
    """The safetensors file that ``load_lora_weights`` reads from ``folder`` (None: none, or no single one)."""
    if (folder / LORA_WEIGHTS).is_file():
        return folder / LORA_WEIGHTS
    found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def _lora_layers(folder: Path) -> dict[str, dict[str, list[int]]]:
    """The LoRA layers of ``folder``'s safetensors file, from its header alone: layer key (with its component
    prefix, e.g. ``transformer.``) -> {``lora_A``, ``lora_B``, ...: shape}; empty without a file."""
    from safetensors import SafetensorError, safe_open

    path = _lora_file(folder)
    layers: dict[str, dict[str, list[int]]] = {}
    if path is None:
        return layers
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if match := _LORA_KEY.match(key):
                    layers.setdefault(match["layer"], {})[match["part"]] = list(f.get_slice(key).get_shape())
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read the LoRA file {str(path)!r}: {str(e).splitlines()[0]}") from None
    return layers


def _made_for(lora: str) -> str:
    """``; it was made for PATH (family F)`` from the ``config.yaml`` of the run that wrote ``lora`` (its parent
    folder), or ``""`` when there is none."""
    import yaml

    config = Path(lora).parent / "config.yaml"
    try:
        saved = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        return ""
    made = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(made, dict) or not made.get("path"):
        return ""
    family = f" (family {made['family']})" if made.get("family") else ""
    return f"; it was made for {made['path']!r}{family}, as its run's config.yaml says"


def _not_this_model(folder: Path, n: int, model: str, lora: str) -> ModelLoadError:
    """The error for a LoRA of ``n`` layers none of which ``model`` has."""
    return ModelLoadError(f"the LoRA in {str(folder)!r} is not a LoRA of {model!r}: none of its {n} layers exist "
                          f"in that model{_made_for(lora)}")


def _misfit(parts: dict[str, list[int]], module: torch.nn.Module) -> Optional[tuple[str, list[int], list[int]]]:
    """The first of a layer's ``lora_A`` ([rank, in_features, ...]) and ``lora_B`` ([out_features, rank, ...]) whose
    shape does not fit ``module`` (a linear or conv layer), as (part, its shape, the shape that fits); None if both
    fit or ``module`` has no sizes to check."""
    sizes = {"lora_A": (1, getattr(module, "in_features", getattr(module, "in_channels", None))),
             "lora_B": (0, getattr(module, "out_features", getattr(module, "out_channels", None)))}
    for part, shape in sorted(parts.items()):
        dim, size = sizes[part]
        if size is not None and len(shape) > dim and shape[dim] != size:
            return part, shape, [*shape[:dim], size, *shape[dim + 1:]]
    return None


def _check_denoiser_lora(folder: Path, denoiser: torch.nn.Module, model: str, lora: str) -> None:
    """The diffusers-format layers in ``folder`` (``transformer.<module>.lora_A/B.weight``) must all be modules of
    ``denoiser``, with shapes that fit them."""
    layers = {name.removeprefix("transformer."): parts for name, parts in _lora_layers(folder).items()
              if name.startswith("transformer.") and set(parts) <= {"lora_A", "lora_B"}}
    modules = dict(denoiser.named_modules())
    missing = [name for name in layers if name not in modules]
    if layers and len(missing) == len(layers):
        raise _not_this_model(folder, len(layers), model, lora)
    if missing:
        raise ModelLoadError(f"the LoRA in {str(folder)!r} only partly fits {model!r}: {len(layers) - len(missing)} "
                             f"of its {len(layers)} layers exist in that model (missing, e.g.: "
                             f"{', '.join(missing[:2])})"
                             f"{_made_for(lora)}")
    for name, parts in layers.items():
        if misfit := _misfit(parts, modules[name]):
            part, shape, fits = misfit
            raise ModelLoadError(f"the LoRA in {str(folder)!r} does not fit {model!r}: its layer {name!r} has a "
                                 f"{part} of shape {shape} where that model needs {fits}{_made_for(lora)}")


def check_lora_fits(adapter: DiffusersAdapter, lora: str, model: str) -> None:
    """Before diffusers loads the LoRA folder ``lora`` into ``adapter`` (``model``'s): each denoiser's
    diffusers-format layers (``lora``'s for ``transformer``, ``lora/transformer_2``'s for Wan 2.2's second expert)
    must exist in it with shapes that fit; ``ModelLoadError`` in one sentence otherwise. Read from the safetensors
    headers only; keys of other formats and of the text encoders are left to diffusers."""
    for name, denoiser in adapter.denoisers.items():
        folder = Path(lora) if name == "transformer" else Path(lora) / name
        _check_denoiser_lora(folder, denoiser, model, lora)


def load_for_inference(model: str, lora: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                       family: str = "sd3", resolution: Optional[int] = None, num_frames: Optional[int] = None,
                       family_guidance: Optional[dict[str, float]] = None):
    """An adapter of ``family`` for ``model`` with a diffusers-format LoRA folder loaded (and fused off: adapters
    stay toggleable; every expert's, ``DiffusersAdapter.load_lora``), with the family's own guidance scales
    (``family_guidance``, e.g. Wan 2.2's ``guidance_scale_2``). A LoRA that does not fit the model
    (``check_lora_fits``), or that no part of the pipeline takes (diffusers skips keys it routes nowhere, such as a
    UNet's), is a ``ModelLoadError``."""
    from diffrl.adapters import load_adapter_class, shape_options

    adapter = load_adapter_class(family).from_pretrained(model, device=device, dtype=dtype,
                                                         **shape_options(resolution, num_frames))
    try:
        adapter.set_family_guidance(family_guidance or {})
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if lora:
        from diffusers.utils import logging as diffusers_logging

        check_lora_path(lora)
        check_lora_fits(adapter, lora, model)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # diffrl's LoRAs hold no text-encoder keys: one notice per encoder
        try:
            adapter.load_lora(lora)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the LoRA in {lora!r}: {str(e).splitlines()[0]}") from None
        finally:
            diffusers_logging.set_verbosity(level)
        if not any(adapter.pipe.get_list_adapters().values()):
            raise _not_this_model(Path(lora), len(_lora_layers(Path(lora))), model, lora)
    return adapter
