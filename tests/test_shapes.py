"""The shapes world and its verifier: right on rendered ground truth, not fooled by noise, blanks or blobs."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffrl.shapes import COLORS, KINDS, Obj, Scene, ShapesDataset, parse_prompt, prompt_of, random_scene, render
from rewards import load
from rewards.shapes import detect, score


def test_prompts_round_trip_through_the_grammar():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        assert parse_prompt(prompt_of(scene)) == scene
    assert prompt_of(Scene("single", (Obj("orange", "circle"),))) == "an orange circle"
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        parse_prompt("a photo of a cat")


def test_dataset_is_reproducible():
    a, b = ShapesDataset(5, seed=3), ShapesDataset(5, seed=3)
    assert [a[i][0] for i in range(5)] == [b[i][0] for i in range(5)]
    assert np.array_equal(np.asarray(a[4][1]), np.asarray(b[4][1]))


@pytest.mark.parametrize("kind", KINDS)
def test_verifier_is_right_on_held_out_renders(kind):
    ds = ShapesDataset(250, seed=987, kinds=[kind])
    correct = sum(score(img, parse_prompt(p))["strict"] for p, img in (ds[i] for i in range(len(ds))))
    assert correct / len(ds) >= 0.99


def test_verifier_rejects_wrong_images():
    rng = random.Random(1)
    scene = Scene("relation", (Obj("red", "circle"), Obj("blue", "square")), "left of")
    img = render(scene, rng)
    assert score(img, scene)["strict"] == 1
    flipped = Scene("relation", scene.objects, "right of")
    assert score(img, flipped)["strict"] == 0 and score(img, flipped)["count"] == 1
    assert score(img, Scene("count", (Obj("red", "circle", 2),)))["strict"] == 0


def test_noise_blank_and_rainbow_blob_score_zero():
    scenes = [random_scene(random.Random(i)) for i in range(30)]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    blank = Image.new("RGB", (32, 32))
    blob = Image.new("RGB", (32, 32))
    d = ImageDraw.Draw(blob)
    for i, c in enumerate(COLORS.values()):  # one disc striped in every colour
        d.pieslice([4, 4, 28, 28], 60 * i, 60 * (i + 1), fill=c)
    for img in (noise, blank, blob):
        assert all(score(img, s)["strict"] == 0 for s in scenes)
    assert detect(blank) == []


def test_registered_reward_takes_tensors_and_pil():
    rng = random.Random(2)
    scene = random_scene(rng, "count")
    img = render(scene, rng)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    reward = load("shapes")
    out = reward(t, [prompt_of(scene)])
    assert out["strict"].tolist() == [1.0] and out["strict"].dtype == torch.float32
    assert reward([img], [prompt_of(scene)])["partial"].tolist() == [1.0]


def test_dense_reward_is_one_exactly_on_hits_and_grades_near_misses():
    from rewards.shapes import dense_score

    for kind in KINDS:  # 1 on ground truth, like strict
        ds = ShapesDataset(40, seed=55, kinds=[kind])
        assert all(dense_score(img, parse_prompt(p)) == 1.0 for p, img in (ds[i] for i in range(len(ds))))
    asked = Scene("count", (Obj("red", "square", 4),))
    scores = []
    for n in (4, 5, 7):  # four, five and seven red squares drawn for "four red squares"
        img = Image.new("RGB", (32, 32))
        d = ImageDraw.Draw(img)
        for i in range(n):
            x, y = 1 + 8 * (i % 4), 1 + 10 * (i // 4)
            d.rectangle([x, y, x + 5, y + 5], fill=COLORS["red"])
        scores.append(dense_score(img, asked))
        assert score(img, asked)["strict"] == float(n == 4)
    assert scores[0] == 1.0 > scores[1] > scores[2] > 0
    assert dense_score(Image.new("RGB", (32, 32)), asked) == 0.0  # blank
    out = load("shapes_dense")([img], ["four red squares"])
    assert list(out) == ["dense", "strict"] and out["dense"].tolist() == [scores[2]]
