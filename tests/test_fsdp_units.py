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
