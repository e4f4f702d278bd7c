"""CLIP-family rewards on tiny random backbones built offline: shapes, determinism, preprocessing against
torchvision, scores against independent computations, and one-sentence errors for missing weights."""
import json

import pytest
import torch
import torchvision.transforms.v2 as T

import rewards
from rewards.aesthetic import AestheticHead
from rewards.clip_common import OPENAI_MEAN, OPENAI_STD, RewardModelError, preprocess

TINY = "diffrl-tiny-clip"
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("oc") / f"{TINY}.json"
    path.write_text(json.dumps({"embed_dim": 32,
                                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4,
                                             "layers": 2}}))
    open_clip.add_model_config(path)


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(seed))


def test_preprocess_matches_torchvision():
    x = images()
    resized = T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x).clamp(0, 1)  # as uint8 PIL
    ref = T.Normalize(OPENAI_MEAN, OPENAI_STD)(T.CenterCrop(32)(resized))
    ours = preprocess(x, 32, OPENAI_MEAN, OPENAI_STD)
    assert ours.shape == (3, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-5)
    padded = preprocess(x, 32, OPENAI_MEAN, OPENAI_STD, pad_square=True)
    assert padded.shape == (3, 3, 32, 32)
    black = -torch.tensor(OPENAI_MEAN)[None, :, None] / torch.tensor(OPENAI_STD)[None, :, None]
    assert torch.allclose(padded[..., :, 0], black)


def test_clip_score_is_the_cosine_and_depends_on_the_pairing():
    import open_clip

    torch.manual_seed(0)
    reward = rewards.load("clip_score", model=TINY, pretrained=None)
    x = images()
    s = reward(x, PROMPTS)["clip_score"]
    assert s.shape == (3,) and s.dtype == torch.float32 and s.abs().max() <= 1
    assert torch.equal(s, reward(x, PROMPTS)["clip_score"])
    model, tok, cfg = rewards.clip_common.open_clip_model(TINY, None, "cpu")
    with torch.no_grad():
        i = model.encode_image(preprocess(x, 32, cfg["mean"], cfg["std"]))
        t = model.encode_text(open_clip.get_tokenizer(TINY)(PROMPTS))
    assert torch.allclose(s, torch.nn.functional.cosine_similarity(i, t), atol=1e-5)
    assert not torch.allclose(s, reward(x.flip(0), PROMPTS)["clip_score"])
    pil = [T.functional.to_pil_image(im) for im in x]
    assert torch.allclose(reward(pil, PROMPTS)["clip_score"], s, atol=0.02)


def test_aesthetic_head_layout_and_score(tmp_path):
    keys = {k: tuple(v.shape) for k, v in AestheticHead(768).state_dict().items()}
    assert keys == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                    "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                    "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                    "layers.7.bias": (1,)}
    head = AestheticHead(32)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    reward = rewards.load("aesthetic", weights=str(tmp_path / "head.pth"), model=TINY, pretrained=None)
    x = images(1)
    s = reward(x, PROMPTS)["aesthetic"]
    model, _, cfg = rewards.clip_common.open_clip_model(TINY, None, "cpu")
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_image(preprocess(x, 32, cfg["mean"], cfg["std"])), dim=-1)
        linear = e
        for i in (0, 2, 4, 6, 7):
            layer = head.layers[i]
            linear = linear @ layer.weight.T + layer.bias
    assert torch.allclose(s, linear.squeeze(-1), atol=1e-5)


def test_missing_and_wrong_weights_are_one_sentence(tmp_path):
    with pytest.raises(RewardModelError, match="no head weights given; download sac"):
        rewards.load("aesthetic", model=TINY, pretrained=None)
    with pytest.raises(RewardModelError, match=r"weight file '/nowhere/head.pth' not found \(looked in"):
        rewards.load("aesthetic", weights="/nowhere/head.pth", model=TINY, pretrained=None)
    torch.save({"w": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(RewardModelError, match="not the LAION predictor's state dict"):
        rewards.load("aesthetic", weights=str(tmp_path / "bad.pth"), model=TINY, pretrained=None)
    with pytest.raises(RewardModelError, match="hpsv2: no checkpoint given; download HPS_v2.1"):
        rewards.load("hpsv2")
    with pytest.raises(RewardModelError, match="checkpoint '/nowhere/hps.pt' not found"):
        rewards.load("hpsv2", checkpoint="/nowhere/hps.pt", model=TINY)


def test_hpsv2_loads_its_checkpoint_over_the_backbone(tmp_path):
    import open_clip

    torch.manual_seed(5)
    tuned = open_clip.create_model(TINY, pretrained=None)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "hps.pt")
    s = rewards.load("hpsv2", checkpoint=str(tmp_path / "hps.pt"), model=TINY)(images(2), PROMPTS)["hpsv2"]
    x = preprocess(images(2), 32, OPENAI_MEAN, OPENAI_STD, pad_square=True)
    with torch.no_grad():
        ref = torch.nn.functional.cosine_similarity(tuned.encode_image(x), tuned.encode_text(
            open_clip.get_tokenizer(TINY)(PROMPTS)))
    assert torch.allclose(s, ref, atol=1e-5)


def test_pickscore_equals_clipmodel_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffrl.tiny_pipeline import clip_tokenizer

    tok = clip_tokenizer()
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "model")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(tmp_path / "proc")
    reward = rewards.load("pickscore", model=str(tmp_path / "model"), processor=str(tmp_path / "proc"))
    x = images(3)[..., :32, :32]
    s = reward(x, PROMPTS)["pickscore"]
    model = CLIPModel.from_pretrained(tmp_path / "model")
    pixels = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok(PROMPTS, padding=True, return_tensors="pt").input_ids, pixel_values=pixels)
    assert torch.allclose(s, out.logits_per_image.diagonal(), atol=1e-4)
    with pytest.raises(RewardModelError, match="pickscore: cannot load"):
        rewards.load("pickscore", model=str(tmp_path / "nothing"), processor=str(tmp_path / "proc"))


def test_clip_rewards_are_differentiable_in_the_pixels():
    reward = rewards.load("clip_score", model=TINY, pretrained=None)
    assert rewards.is_differentiable(reward)
    x = images(4).requires_grad_(True)
    reward(x, PROMPTS)["clip_score"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
