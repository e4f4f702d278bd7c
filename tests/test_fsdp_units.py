"""The pieces of sharded loading, checked against independent computations: which rows a process holds (FSDP2
shards dim 0 as ``torch.chunk`` does), reading exactly those rows from a safetensors file, and the LoRA a meta model
is given (what peft draws on a real one)."""
import pytest
import torch
from safetensors.torch import save_file

from diffrl.fsdp import SafetensorsWeights, local_rows, lora_init
from tests_helpers import MODEL, ROOT


@pytest.mark.parametrize("d0", [0, 1, 7, 10, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_local_rows_are_torch_chunk_padded_with_empty_shards(d0, world):
    chunks = list(torch.arange(d0).chunk(world)) if d0 else []
    chunks += [torch.arange(0)] * (world - len(chunks))
    for rank, chunk in enumerate(chunks):
        start, stop = local_rows(d0, rank, world)
        assert torch.equal(torch.arange(d0)[start:stop], chunk)


def test_rows_read_exactly_the_stored_rows_in_their_dtype(tmp_path):
    stored = {"w": torch.randn(7, 3, 2), "b": torch.randn(5).to(torch.bfloat16), "scale": torch.tensor(3.0),
              "empty": torch.zeros(0, 4), "i": torch.arange(6, dtype=torch.int64).reshape(3, 2)}
    save_file(dict(list(stored.items())[:3]), str(tmp_path / "part-1.safetensors"))
    save_file(dict(list(stored.items())[3:]), str(tmp_path / "part-2.safetensors"))
    weights = SafetensorsWeights(tmp_path)
    try:
        assert set(weights.keys()) == set(stored)
        for key, value in stored.items():
            assert torch.equal(weights.rows(key, 0, 0 if value.dim() == 0 else len(value)), value)
            if value.dim() and len(value) > 2:
                got = weights.rows(key, 1, 3)
                assert got.dtype == value.dtype and torch.equal(got, value[1:3])
    finally:
        weights.close()


def test_a_meta_models_lora_is_the_lora_peft_draws_on_the_real_model():
    from diffrl.adapters.base import meta_denoisers
    from diffrl.adapters.sd3 import SD3Adapter

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
    real = SD3Adapter.from_pretrained(MODEL)
    torch.manual_seed(5)
    real.add_lora(4, 4.0, targets)
    after_real = torch.get_rng_state()
    with meta_denoisers():
        meta = SD3Adapter.from_pretrained(MODEL)
    assert meta.on_meta and all(p.is_meta for p in meta.transformer.parameters())
    torch.manual_seed(5)
    meta.add_lora(4, 4.0, targets)  # draws nothing real, and leaves the generator where it found it
    drawn = lora_init(meta.transformer, 4)
    expected = {n: p for n, p in real.transformer.named_parameters() if "lora_" in n}
    assert drawn.keys() == expected.keys() and len(drawn) == 2 * 6 * 4 + 2
    for name, value in expected.items():
        assert torch.equal(drawn[name], value.detach()), name
    assert torch.equal(torch.get_rng_state(), after_real)  # the run's later draws are the unsharded run's too


def test_fsdp_settings_that_cannot_work_are_one_sentence(tmp_path):
    from diffrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'model.fsdp_cpu_offload' offloads FSDP shards: it needs 'model.fsdp' true"):
        load_config(str(ROOT / "configs") + "/tiny_shapes.yaml", ["model.fsdp_cpu_offload=true"])
    with pytest.raises(ConfigError, match="'model.fsdp' and 'explore' do not combine yet"):
        load_config(str(ROOT / "configs") + "/tiny_shapes_explore.yaml", ["model.fsdp=true"])
    for extra in ([], ["model.lora_rank=0"], ["train.objective=ppo", "train.ema_decay=0.9"]):  # all allowed now
        assert load_config(str(ROOT / "configs") + "/tiny_shapes.yaml", ["model.fsdp=true", *extra]).model.fsdp


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_full_export_in_several_files_loads_in_diffusers_and_reloads_shard_by_shard(tmp_path, one_process_group):
    """``save_full`` past its file size writes the sharded ``save_pretrained`` layout (files + index), which
    diffusers loads, and which ``materialize`` reads back into a meta-built sharded model: the same tensors."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from diffrl.fsdp import materialize, save_full, shard_module

    original = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    expected = {k: v.clone() for k, v in original.state_dict().items()}
    shard_module(original)
    original.save_config(str(tmp_path))
    save_full(original, tmp_path, "diffusion_pytorch_model", max_bytes=2**20)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 5 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path)).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    with init_empty_weights(include_buffers=False):
        meta = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(tmp_path)))
    buffers = {k: b.clone() for k, b in meta.named_buffers()}
    shard_module(meta)
    weights = SafetensorsWeights(tmp_path)
    try:
        materialize(meta, torch.device("cpu"), weights, buffers, None)
    finally:
        weights.close()
    for key, value in meta.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.equal(full, expected[key]), key


def test_a_full_disk_during_a_sharded_checkpoint_is_one_sentence(tmp_path, one_process_group, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    from diffrl import checkpoint

    checkpoint.save_sharded(tmp_path, 1, {"w": torch.ones(2)}, {}, rank=0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot write checkpoint-000002 .*No space left.*"
                                                         r"checkpoint-000001 is intact"):
        checkpoint.save_sharded(tmp_path, 2, {"w": torch.ones(2)}, {}, rank=0)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000001"]
