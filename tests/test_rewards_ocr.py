"""The OCR reward: Flow-GRPO's normalisation and distance by hand, and rapidocr for real on rendered text."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import rewards
from rewards.ocr import levenshtein, ocr_score, target_text


def test_target_and_normalisation_by_hand():
    assert target_text('a sign that says "Hello World" on a wall') == "Hello World"
    assert target_text("no quotes here") is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_score("HELLO world!", "Hello World") == 1.0  # substring after lower-casing and removing spaces
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("zzzzzzzzzzzz", "abc") == 0.0  # distance capped at the target's length
    assert math.isnan(ocr_score("anything", " "))


def render_text(text: str) -> Image.Image:
    img = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(img).text((12, 20), text, fill="black", font=ImageFont.load_default(size=40))
    return img


def test_rapidocr_reads_rendered_text():
    pytest.importorskip("rapidocr")
    reward = rewards.load("ocr")
    prompts = ['a poster reading "DIFFRL"', 'a sign saying "open 24h"', 'a card that says "DIFFRL"', "no target"]
    images = [render_text("DIFFRL"), render_text("open 24h"), Image.new("RGB", (320, 96), "white"),
              render_text("DIFFRL")]
    s = reward(images, prompts)["ocr"]
    assert s[0] == 1.0 and s[1] == 1.0
    assert s[2] == 0.0  # blank image: nothing read
    assert math.isnan(s[3])  # no quoted target: the sample is invalid, not zero
    frame = torch.tensor(np.array(render_text("DIFFRL"))).permute(2, 0, 1).float() / 255
    video = torch.stack([frame] * 5)[None]
    assert reward(video, ['"DIFFRL"'])["ocr"].item() == 1.0


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine 'easyocr'"):
        rewards.load("ocr", engine="easyocr")
