"""The shapes world: a seeded prompt grammar and a Pillow renderer of coloured shapes on a black background.

A prompt is built from a ``Scene`` (the objects and an optional relation) and parsed back into one, so the verifier
(``rewards/shapes.py``) can score any image against any prompt of the grammar. Prompt kinds:
  single    "a small red circle"                     (colour, shape, optional size)
  count     "three blue squares"                     (2-4 objects of one colour and shape)
  pair      "a red circle and a green triangle"      (two objects, colour-shape binding)
  relation  "a red circle to the left of a blue square"  (left of, right of, above, below)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (170, 60, 210), "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
KINDS = ("single", "count", "pair", "relation")
BACKGROUND = (0, 0, 0)
IMAGE_SIZE = 32
SIZE_RANGE = {"small": (7, 9), "large": (12, 14), None: (8, 11), "crowded": (6, 8)}  # object side, px at 32 px


@dataclass(frozen=True)
class Obj:
    """One kind of object in a prompt: ``count`` objects of a colour and a shape (and optionally a size)."""

    color: str
    shape: str
    count: int = 1
    size: Optional[str] = None


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: objects, and for relation prompts ``objects[0] <relation> objects[1]``."""

    kind: str
    objects: tuple[Obj, ...]
    relation: Optional[str] = None

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)


def _noun(o: Obj) -> str:
    words = ([o.size] if o.size else []) + [o.color, o.shape + ("s" if o.count > 1 else "")]
    article = NUMBERS[o.count] if o.count > 1 else "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def prompt_of(scene: Scene) -> str:
    """The prompt text of a scene."""
    if scene.kind == "relation":
        a, b = scene.objects
        rel = "to the left of" if scene.relation == "left of" else "to the right of" if scene.relation == "right of" \
            else scene.relation
        return f"{_noun(a)} {rel} {_noun(b)}"
    return " and ".join(_noun(o) for o in scene.objects)


_NOUN = re.compile(r"(an?|two|three|four) (?:(small|large) )?(\w+) (circle|square|triangle)(s?)")


def parse_prompt(prompt: str) -> Scene:
    """Scene of a prompt of the grammar; raises ``ValueError`` naming the prompt otherwise."""
    text = prompt.strip().lower()
    rel = next((r for r in ("to the left of", "to the right of", "above", "below") if f" {r} " in text), None)
    parts = text.split(f" {rel} ") if rel else text.split(" and ")
    objs = []
    for part in parts:
        m = _NOUN.fullmatch(part.strip())
        if not m or m.group(3) not in COLORS:
            raise ValueError(f"prompt {prompt!r} is not in the shapes grammar (could not read {part.strip()!r})")
        count = {"an": 1, **{v: k for k, v in NUMBERS.items()}}[m.group(1)]
        objs.append(Obj(m.group(3), m.group(4), count, m.group(2)))
    if rel:
        relation = {"to the left of": "left of", "to the right of": "right of"}.get(rel, rel)
        return Scene("relation", tuple(objs), relation)
    kind = "pair" if len(objs) == 2 else "count" if objs[0].count > 1 else "single"
    return Scene(kind, tuple(objs))


def in_grammar(prompts: Sequence[str]) -> bool:
    """Whether every prompt is one of the shapes grammar's (so the verifier can score it)."""
    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return False
    return True


def random_scene(rng: random.Random, kind: Optional[str] = None) -> Scene:
    """A random scene of a kind (uniform over ``KINDS`` when None)."""
    kind = kind or rng.choice(KINDS)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if kind == "single":
        return Scene(kind, (Obj(color, shape, 1, rng.choice((None,) + SIZES)),))
    if kind == "count":
        return Scene(kind, (Obj(color, shape, rng.randint(2, 4)),))
    c2 = rng.choice([c for c in COLORS if c != color])
    second = Obj(c2, rng.choice(SHAPES))
    if kind == "pair":
        return Scene(kind, (Obj(color, shape), second))
    if kind == "relation":
        return Scene(kind, (Obj(color, shape), second), rng.choice(RELATIONS))
    raise ValueError(f"unknown prompt kind {kind!r}; choose one of {KINDS}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw a filled circle, square or upward triangle inside ``box`` (x0, y0, x1, y1), inclusive."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _relation_ok(a: tuple, b: tuple, relation: str) -> bool:
    """Centres separated along the relation's axis by more than along the other axis, and by >= 4 px."""
    dx, dy = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2, (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 4 and along > abs(across)


def _place(rng: random.Random, sides: Sequence[int], size: int, relation: Optional[str]) -> list[tuple]:
    """Non-touching boxes (2 px apart) for objects of the given sides; relation constrains boxes 0 and 1."""
    for _ in range(5000):
        boxes: list[tuple] = []
        for side in sides:
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            box = (x, y, x + side - 1, y + side - 1)
            if all(box[2] + 2 < o[0] or o[2] + 2 < box[0] or box[3] + 2 < o[1] or o[3] + 2 < box[1] for o in boxes):
                boxes.append(box)
            else:
                break
        if len(boxes) == len(sides) and (relation is None or _relation_ok(boxes[0], boxes[1], relation)):
            return boxes
    raise RuntimeError(f"could not place objects of sides {list(sides)} in {size} px")


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB image of the scene: every object drawn, non-touching, the relation satisfied."""
    items = [(o.color, o.shape, o.size) for o in scene.objects for _ in range(o.count)]
    scale = size / IMAGE_SIZE
    default = "crowded" if len(items) > 2 else None
    sides = [round(rng.randint(*SIZE_RANGE[s or default]) * scale) for _, _, s in items]
    boxes = _place(rng, sides, size, scene.relation)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (color, shape, _), box in zip(items, boxes):
        draw_shape(draw, shape, box, COLORS[color])
    return img


@dataclass
class ShapesDataset:
    """A reproducible list of (prompt, image) pairs: item ``i`` depends only on ``(seed, i)``."""

    size: int
    seed: int = 0
    kinds: Sequence[str] = field(default_factory=lambda: KINDS)
    image_size: int = IMAGE_SIZE

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[str, Image.Image]:
        rng = random.Random(self.seed * 1_000_003 + i)
        scene = random_scene(rng, rng.choice(list(self.kinds)))
        return prompt_of(scene), render(scene, rng, self.image_size)


def prompts(n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[str]:
    """``n`` reproducible prompts of the given kinds."""
    rng = random.Random(seed)
    return [prompt_of(random_scene(rng, rng.choice(list(kinds)))) for _ in range(n)]
