"""What every diffusers-backed adapter shares: loading with one-sentence errors, LoRA via peft (the reference model
is the adapters switched off), and the diffusers-format LoRA export. Family adapters subclass ``DiffusersAdapter``
and add what is theirs: prompt encoding, the velocity call, the sigma schedule, latent layout and decoding.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from diffrl.backends import check_attention_backend
from diffrl.guidance import classifier_free_guidance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "connectors")
DECODERS = ("vae", "audio_vae", "vocoder")


class ModelLoadError(RuntimeError):
    """The model path or hub id cannot be loaded; the message says which and why."""


log = logging.getLogger("diffrl")
DENOISERS = ("transformer", "transformer_2")
_META_DENOISERS = contextvars.ContextVar("meta_denoisers", default=False)


@contextlib.contextmanager
def meta_denoisers() -> Iterator[None]:
    """Inside the block, ``load_pipeline`` builds the denoisers on the ``meta`` device (no weights read, no memory):
    ``DiffusersAdapter.shard`` then gives each process memory for its own shard only and reads just those rows."""
    token = _META_DENOISERS.set(True)
    try:
        yield
    finally:
        _META_DENOISERS.reset(token)


def _meta_denoisers(pipeline_cls: Any, path: str, dtype: str) -> dict[str, torch.nn.Module]:
    """The pipeline's denoisers built from their configs with parameters on ``meta`` (buffers stay real: they are
    computed, not all stored), in ``dtype``."""
    import diffusers
    from accelerate import init_empty_weights

    index = pipeline_cls.load_config(path)
    out = {}
    for name in DENOISERS:
        entry = index.get(name)
        if not entry or entry[1] is None:
            continue
        cls = getattr(diffusers, entry[1])
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(cls.load_config(path, subfolder=name))
        if model.dtype != DTYPES[dtype]:
            model = model.to(DTYPES[dtype])
        out[name] = model.requires_grad_(False).eval()
    return out


def weights_folder(path: str, name: str) -> Path:
    """The local folder of component ``name`` of the pipeline at ``path`` (a folder, or a hub id resolved in the
    local cache; ``HF_HUB_OFFLINE=1`` is respected)."""
    local = Path(path).expanduser() / name
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=[f"{name}/*"])) / name


def load_pipeline(pipeline_cls: Any, path: str, dtype: str, attention: str, device: str) -> Any:
    """``pipeline_cls.from_pretrained(path)`` from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected),
    with a missing folder or an unloadable checkpoint reported in one sentence. Inside ``meta_denoisers()`` the
    denoisers are built on the meta device instead of loaded."""
    check_attention_backend(attention, device)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not _is_hub_id(path)
    if looks_local and not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model path {path!r} does not exist (build the tiny model with "
                             "`python scripts/pretrain_tiny.py`, or give a diffusers folder or hub id)")
    try:
        meta = _meta_denoisers(pipeline_cls, path, dtype) if _META_DENOISERS.get() else {}
        pipe = pipeline_cls.from_pretrained(path, **meta, **{_dtype_keyword(): DTYPES[dtype]})
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a {pipeline_cls.__name__} from {path!r}: {str(e).splitlines()[0]}") from None
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    return pipe


def _dtype_keyword() -> str:
    """diffusers 0.40 renamed ``from_pretrained``'s ``torch_dtype`` to ``dtype`` (the old name warns); older
    releases know only ``torch_dtype``."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def _is_hub_id(path: str) -> bool:
    """``org/name`` with no local folder of that name."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not Path(path).exists()


def attach_lora(module: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """peft LoRA adapters (gaussian init) on ``module``'s ``targets``, in fp32, with only the adapters trainable."""
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The entries of ``module``'s ``ModuleList`` children: a diffusion transformer's blocks (SD3's and LTX's
    ``transformer_blocks``, FLUX's two lists, Wan's ``blocks``)."""
    return [b for child in module.children() if isinstance(child, torch.nn.ModuleList) for b in child]


def compile_blocks(module: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional compilation of a denoiser: ``torch.compile`` (``backend``) of each of its ``repeated_blocks``, in
    place, so parameter names, LoRA and checkpoints are unchanged. Blocks of one class share a compiled graph, so
    compile time is that of one or two blocks, not of the whole model. Each grad mode, adapter state and batch size
    is a graph of its own, more than dynamo's default limit of 8 per function, so the limit is raised to 64."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in repeated_blocks(module):
        block.compile(backend=backend)


class DiffusersAdapter:
    """A diffusers pipeline with a trainable LoRA on its denoiser (``self.transformer``); subclasses implement the
    family's model calls (``_encode`` and ``velocity``; ``latent_shape``, ``sigmas`` and ``decode`` where the
    defaults here do not fit)."""

    lora_rank: int = 0
    """The rank ``add_lora`` attached (0: full fine-tuning or no LoRA)."""
    full_finetune: bool = False
    """True after ``add_lora(0, ...)``: every denoiser parameter trains and the reference is a frozen copy."""
    native_resolution: Optional[int] = None
    """The pixel size the family was trained at (the pipeline's default size); training below it draws a warning
    (rewards read images the model rarely makes, which invites reward hacking)."""
    sharded: bool = False
    """True after ``shard()``: the denoisers (and the reference copy) are FSDP2-sharded over the processes."""
    streams: Optional[dict[str, slice]] = None
    """Joint audio-video families: stream name -> its elements of the flattened latent (``x.flatten(1)[:, slice]``),
    for per-modality log-probs and advantages (``train.reward_routing``); None: one stream."""

    def __init__(self, pipe: Any, device: str = "cpu", dtype: str = "float32"):
        # Every denoiser that takes a LoRA (Wan 2.2 has two experts); "transformer" first.
        self.denoisers = {name: getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None}
        self.on_meta = any(p.is_meta for m in self.denoisers.values() for p in m.parameters())
        """The denoisers were built on the meta device (``meta_denoisers``): ``shard`` must materialise them."""
        if self.on_meta:  # everything else moves now; the denoisers get their shards in ``shard``
            for name, module in pipe.components.items():
                if isinstance(module, torch.nn.Module) and name not in self.denoisers:
                    module.to(device)
            self.pipe = pipe
        else:
            self.pipe = pipe.to(device)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.transformer = pipe.transformer
        self._prompt_cache: dict[str, dict[str, Tensor]] = {}
        for name in (*ENCODERS, *DECODERS, *self.denoisers):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.offload = False

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The family's prompt encoder: ``{name: [len(prompts), ...]}``."""
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas of the pipeline's own scheduler (its shift included), ending at 0."""
        sched = self.pipe.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float().clone()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents; image families: ``(C, h, w)`` with the side their ``__init__`` set."""
        return (self.transformer.config.in_channels, self._side, self._side)

    @property
    def sequence_length(self) -> int:
        """Transformer tokens per sample: the latent's trailing dims over the patch size (``patch_size`` of the
        transformer config; an int patches the last two dims, a tuple the last ``len`` dims)."""
        dims = self.latent_shape[1:]
        p = self.transformer.config.get("patch_size", 1) or 1
        p = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
        p = (1,) * (len(dims) - len(p)) + p
        return math.prod(d // q for d, q in zip(dims, p))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Prompt conditioning ``{name: [n, ...]}`` (the family's ``_encode``), encoding only prompts not seen
        before."""
        if not prompts:
            raise ValueError("no prompts to encode")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with self._resident(ENCODERS):
                out = self._encode(missing)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = {k: v[i] for k, v in out.items()}
        return {k: torch.stack([self._prompt_cache[p][k] for p in prompts]) for k in self._prompt_cache[prompts[0]]}

    def unconditional(self) -> dict[str, Tensor]:
        """The unconditional (empty prompt) conditioning, ``[1, ...]`` tensors, as the family's pipeline builds it."""
        return self.encode([""])

    def guided(self, forward: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x: Tensor, sigma: Tensor,
               cond: dict[str, Tensor], guidance_scale: float) -> Tensor:
        """Classifier-free guidance against the empty prompt: ``forward(x, sigma, cond)`` on the unconditional and
        conditional inputs as one batch, combined as v_u + g (v_c - v_u); at g = 1 the conditional pass alone.
        ``cond`` holds ``[n, ...]`` tensors."""
        if guidance_scale == 1.0:
            return forward(x, sigma, cond)
        v_u, v_c = forward(*self.with_unconditional(x, sigma, cond)).chunk(2)
        return classifier_free_guidance(v_u, v_c, guidance_scale)

    def with_unconditional(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict]:
        """CFG's one batch: ``x``, ``sigma`` and ``cond`` (``[n, ...]``) doubled to ``2n`` rows, the unconditional
        (empty prompt) rows first."""
        u, n = self.unconditional(), x.shape[0]
        both = {k: torch.cat([u[k].expand(n, *v.shape[1:]), v]) for k, v in cond.items()}
        return torch.cat([x, x]), torch.cat([sigma, sigma]), both

    def shifted_sigmas(self, num_steps: int, tokens: int, base_seq: int, max_seq: int, base_shift: float,
                       max_shift: float) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas of the FLUX / LTX-2 pipelines: linspace(1, 1/N, N) through the scheduler
        with the resolution-dependent shift ``mu`` = calculate_shift(tokens) (the scheduler config's own
        ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift`` where it has them, else the
        given defaults), then 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = self.pipe.scheduler
        c = sched.config
        mu = calculate_shift(tokens, c.get("base_image_seq_len", base_seq), c.get("max_image_seq_len", max_seq),
                             c.get("base_shift", base_shift), c.get("max_shift", max_shift))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return sched.sigmas.float().clone()

    def add_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> None:
        """Attach trainable LoRA adapters (peft) to every denoiser, in fp32; the reference is the adapters off.
        rank 0: full fine-tuning instead (``enable_full_finetuning``)."""
        self.lora_rank = rank
        if rank == 0:
            self.enable_full_finetuning()
            return
        # On meta the adapters' values are drawn later by ``shard`` (``fsdp.lora_init``), from this RNG state.
        rng = torch.get_rng_state() if self.on_meta else None
        for module in self.denoisers.values():
            attach_lora(module, rank, alpha, targets)
        if rng is not None:
            torch.set_rng_state(rng)

    def enable_full_finetuning(self) -> None:
        """Train every parameter of the denoisers, in their dtype (fp32 on the CPU; bf16 weights train in bf16). The
        reference becomes a frozen copy of the denoisers taken now: twice their memory."""
        self.full_finetune = True
        self._reference = {name: copy.deepcopy(m).requires_grad_(False).eval() for name, m in self.denoisers.items()}
        for module in self.denoisers.values():
            module.requires_grad_(True)

    def shard(self, cpu_offload: bool = False) -> None:
        """FSDP2 (``fully_shard``) over the process group: every transformer block, then each denoiser, is sharded,
        so each process holds 1/N of the weights (and of the gradients and optimizer state of what trains); forwards
        gather one block's weights at a time, and each backward averages the gradients over the processes (as
        ``average_gradients`` does unsharded). LoRA: the frozen base and its adapters are sharded together and the
        reference is still the adapters switched off (no copy); full fine-tuning: the frozen reference copy is
        sharded too. Denoisers built on the meta device (``meta_denoisers``) get memory for their own shard only
        and read only those rows of the checkpoint. ``cpu_offload``: shards, gradients and optimizer state live in
        CPU memory."""
        from diffrl import fsdp

        groups = [self.denoisers] + ([self._reference] if self.full_finetune else [])
        init_device = torch.device("cpu") if cpu_offload else self.device
        for group in groups:
            for name, module in group.items():
                buffers = {k: b.detach().clone() for k, b in module.named_buffers()} if self.on_meta else {}
                fsdp.shard_module(module, cpu_offload, pin_memory=self.device.type == "cuda")
                if self.on_meta:
                    weights = fsdp.SafetensorsWeights(weights_folder(self.pipe.name_or_path, name))
                    try:
                        fsdp.materialize(module, init_device, weights, buffers, self.lora_rank or None)
                    finally:
                        weights.close()
        self.on_meta = False
        self.sharded = True

    def enable_offload(self) -> None:
        """Keep the text encoders and the VAE in CPU memory, moving each to the device only while it encodes or
        decodes (prompt embeddings are cached, so encoders come back only for new prompts); the denoiser has the
        device to itself while it trains."""
        self.offload = True
        for name in (*ENCODERS, *DECODERS):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to("cpu")

    @contextlib.contextmanager
    def _resident(self, names: Sequence[str]) -> Iterator[None]:
        """With offload on, the named pipeline modules sit on the device inside the block and on the CPU after."""
        modules = ([getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]
                   if self.offload else [])
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each denoiser block's activations in the backward pass instead of keeping them (less memory
        for the training forward, about one more forward of compute)."""
        for module in self.denoisers.values():
            module.enable_gradient_checkpointing()

    def compile(self) -> None:
        """Regional compilation of every denoiser (``compile_blocks``): rollouts (no gradients) and updates
        (gradients) run the same compiled blocks; the reference pass (LoRA off) is a graph of its own."""
        for module in self.denoisers.values():
            compile_blocks(module)

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained parameters as ``("denoiser.parameter.name", parameter)``, in ``trainable_parameters``' order."""
        return [(f"{key}.{n}", p) for key, module in self.denoisers.items()
                for n, p in module.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference (pre-RL) model inside the block: LoRA adapters disabled, or (full fine-tuning) the frozen
        copy of the denoisers."""
        if self.full_finetune:
            with self.using_denoisers(self._reference):
                yield
            return
        for module in self.denoisers.values():
            module.disable_adapters()
        try:
            yield
        finally:
            for module in self.denoisers.values():
                module.enable_adapters()

    @contextlib.contextmanager
    def using_denoisers(self, denoisers: dict[str, torch.nn.Module]) -> Iterator[None]:
        """``velocity`` runs through other copies of the denoisers inside the block (the low-precision exploration
        policy); ``denoisers`` has the same names as ``self.denoisers``."""
        saved = self.transformer, self.denoisers
        self.transformer, self.denoisers = denoisers["transformer"], denoisers
        try:
            yield
        finally:
            self.transformer, self.denoisers = saved

    @torch.no_grad()
    def merged_weights(self) -> dict[str, dict[str, Tensor]]:
        """Per denoiser, each LoRA-carrying linear layer's weight with the active LoRA merged in (W + s B A, in W's
        dtype), keyed by the layer's qualified name: the policy as plain weights."""
        from peft.tuners.lora import LoraLayer

        out: dict[str, dict[str, Tensor]] = {}
        for name, module in self.denoisers.items():
            out[name] = {}
            for qual, layer in module.named_modules():
                if isinstance(layer, LoraLayer):
                    w = layer.get_base_layer().weight
                    delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
                    out[name][qual] = (w.float() + delta.float()).to(w.dtype)
        return out

    @torch.no_grad()
    def merged_copies(self) -> dict[str, torch.nn.Module]:
        """Frozen deep copies of the denoisers with the current LoRA merged into plain linear layers (no peft layers
        left): the policy to quantize for low-precision exploration."""
        weights, copies = self.merged_weights(), {}
        for name, module in self.denoisers.items():
            clone = copy.deepcopy(module)
            for qual, w in weights[name].items():
                parent, _, child = qual.rpartition(".")
                owner = clone.get_submodule(parent) if parent else clone
                base = getattr(owner, child).get_base_layer()
                base.weight.data = w.clone()
                setattr(owner, child, base)
            for block in repeated_blocks(clone):
                block._compiled_call_impl = None  # a deep copy's compiled call would run the original's weights
            copies[name] = clone.requires_grad_(False).eval()
        return copies

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The trained weights of every denoiser (its LoRA, or with full fine-tuning all its parameters); keys of
        denoisers other than ``transformer`` carry their name. Sharded: this process's shards (for swapping weights
        in and out, EMA and checkpoints; ``export`` consolidates them)."""
        from peft.utils import get_peft_model_state_dict

        if self.sharded:  # this process's shards, keyed by parameter name: no communication
            from diffrl.fsdp import trained_local

            return trained_local(self.named_trainable_parameters())
        if self.full_finetune:
            return {(k if name == "transformer" else f"{name}.{k}"): v.detach().clone()
                    for name, module in self.denoisers.items() for k, v in module.state_dict().items()}
        return {(k if name == "transformer" else f"{name}.{k}"): v.detach().clone()
                for name, module in self.denoisers.items() for k, v in get_peft_model_state_dict(module).items()}

    def _split(self, state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        parts: dict[str, dict[str, Tensor]] = {name: {} for name in self.denoisers}
        for k, v in state.items():
            name, _, rest = k.partition(".")
            if name in self.denoisers and name != "transformer":
                parts[name][rest] = v
            else:
                parts["transformer"][k] = v
        return parts

    def load_trained_state_dict(self, state: dict[str, Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        if self.sharded:  # ``trained_state_dict``'s shards of this process
            from diffrl.fsdp import load_local

            load_local(self.named_trainable_parameters(), state)
            return
        if self.full_finetune:
            for name, part in self._split(state).items():
                self.denoisers[name].load_state_dict(part)
            return
        for name, part in self._split(state).items():
            set_peft_model_state_dict(self.denoisers[name], part)

    def save_lora(self, directory: str, state: Optional[dict[str, Tensor]] = None) -> None:
        """Write the LoRA in the diffusers format that the family pipeline's ``load_lora_weights`` reads: the
        ``transformer``'s in ``directory``, a second expert's in ``directory/transformer_2`` (load it with
        ``load_lora_weights(directory + "/transformer_2", load_into_transformer_2=True)``)."""
        for name, part in self._split(state or self.trained_state_dict()).items():
            out = directory if name == "transformer" else str(Path(directory) / name)
            type(self.pipe).save_lora_weights(out, transformer_lora_layers=part, safe_serialization=True)

    FAMILY_GUIDANCE: tuple[str, ...] = ()
    """The family's own guidance scales besides ``guidance_scale`` (``sampler.family_guidance``, ``--guidance-2``,
    ``--audio-guidance``): Wan 2.2's ``guidance_scale_2``, LTX-2's ``audio_guidance_scale``."""

    def set_family_guidance(self, scales: dict[str, float]) -> None:
        """Set the family's own guidance scales (names in ``FAMILY_GUIDANCE``); ValueError in one sentence for a
        name this family does not have."""
        unknown = sorted(set(scales) - set(self.FAMILY_GUIDANCE))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no guidance scale {unknown}; its own are "
                             f"{list(self.FAMILY_GUIDANCE) or 'none (only guidance_scale)'}")
        for name, value in scales.items():
            setattr(self, name, float(value))

    def load_lora(self, directory: str) -> None:
        """Load a LoRA folder laid out as ``save_lora`` writes it into every denoiser, adapters left toggleable:
        ``directory`` into ``transformer`` and ``directory/transformer_2`` into a second expert (Wan 2.2; a folder
        without it leaves that expert as the base, with a warning)."""
        self.pipe.load_lora_weights(directory)
        for name in self.denoisers:
            if name == "transformer":
                continue
            folder = Path(directory) / name
            if folder.is_dir():
                self.pipe.load_lora_weights(str(folder), **{f"load_into_{name}": True})
            else:
                log.warning("%s holds no LoRA for %s (%s/): that expert samples as the base model", directory,
                            name, name)

    @contextlib.contextmanager
    def _swapped_in(self, state: Optional[dict[str, Tensor]]) -> Iterator[None]:
        """``state`` (laid out as ``trained_state_dict`` returns it) loaded inside the block, the current trained
        weights restored after; a no-op for None."""
        saved = self.trained_state_dict() if state is not None else None
        if state is not None:
            self.load_trained_state_dict(state)
        try:
            yield
        finally:
            if saved is not None:
                self.load_trained_state_dict(saved)

    def export(self, run_dir: str, state: Optional[dict[str, Tensor]] = None) -> str:
        """Write the trained weights (``state``, e.g. the EMA, or the current ones) for diffusers and return where:
        the LoRA to ``run_dir/lora`` (``save_lora``), fully fine-tuned denoisers with ``save_pretrained`` to
        ``run_dir/transformer`` (and ``run_dir/transformer_2``), which replace the pipeline's own folders."""
        if self.sharded:
            with self._swapped_in(state):
                return self._export_sharded(run_dir)
        if not self.full_finetune:
            self.save_lora(str(Path(run_dir) / "lora"), state)
            return str(Path(run_dir) / "lora")
        with self._swapped_in(state):
            for name, module in self.denoisers.items():
                module.save_pretrained(str(Path(run_dir) / name), safe_serialization=True)
        return str(Path(run_dir) / "transformer")

    def _export_sharded(self, run_dir: str) -> str:
        """``export`` of sharded denoisers (a collective): the trained weights gathered once and written by the first
        process: the LoRA through ``save_lora``, or full weights as ``save_pretrained`` lays a folder out
        (``config.json`` and safetensors files, sharded with an index past ``fsdp.EXPORT_SHARD_BYTES``), gathered one
        tensor at a time so the first process never holds more than one file's worth."""
        import torch.distributed as dist
        from peft.utils import get_peft_model_state_dict

        from diffrl import fsdp

        if self.full_finetune:
            for name, module in self.denoisers.items():
                if dist.get_rank() == 0:
                    module.save_config(str(Path(run_dir) / name))
                fsdp.save_full(module, Path(run_dir) / name, "diffusion_pytorch_model")
            return str(Path(run_dir) / "transformer")
        parts: dict[str, Tensor] = {}
        for name, module in self.denoisers.items():
            lora = dict(fsdp.full_tensors((n, p) for n, p in module.named_parameters() if p.requires_grad))
            part = get_peft_model_state_dict(module, state_dict=lora)
            parts.update({(k if name == "transformer" else f"{name}.{k}"): v for k, v in part.items()})
        if dist.get_rank() == 0:
            self.save_lora(str(Path(run_dir) / "lora"), parts)
        return str(Path(run_dir) / "lora")

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[n, *latent_shape]`` -> media in [0, 1] (images ``[n, 3, H, W]``, videos ``[n, F, 3, H, W]``),
        through the family's ``_decode`` with the VAE on the device."""
        with self._resident(DECODERS):
            return self._decode(latents)

    def _decode(self, latents: Tensor) -> Tensor:
        """``[n, C, h, w]`` latents (scaled and shifted as the image pipelines keep them) -> ``[n, 3, H, W]`` images
        in [0, 1]; video families override it."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
