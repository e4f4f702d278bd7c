"""The shapes verifier: scores an image against a shapes-world prompt with no learned model (GenEval-style).

1. Segment: each pixel takes the nearest palette colour when it is within ``COLOR_TOL`` of it (else background).
2. Objects: 4-connected components per colour, at least ``MIN_AREA`` pixels.
3. Shape of each object from its bounding box: fill ratio, filled corners, and top/bottom row widths
   (square: full box and corners; triangle: narrow top, wide bottom; circle: otherwise).
4. Criteria against the prompt (``diffrl.shapes.parse_prompt``): ``count`` (the number of objects equals the prompt's,
   nothing extra), ``color`` (each colour present in the right number), ``shape`` (every object of a prompt colour
   has the prompt's shape), ``size`` and ``relation`` where the prompt has them. ``strict`` is 1 when all pass;
   ``partial`` is their mean.
5. ``shapes_dense`` (a training reward): the same criteria graded, so near misses (five objects for four) score
   between a hit and a far miss; 1 exactly where ``strict`` is 1.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from diffrl.shapes import COLORS, Scene, parse_prompt

COLOR_TOL = 110.0
MIN_AREA = 6
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


def segment(img: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` int: palette index per pixel, -1 for background."""
    d = np.linalg.norm(img[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1)
    idx = d.argmin(-1)
    return np.where(d.min(-1) < COLOR_TOL, idx, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool ``[H, W]`` mask, as bool masks (min-label propagation, vectorised)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neigh = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                                   padded[1:-1, 2:]])
        new = np.where(mask, neigh, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[mask])]


def classify_shape(comp: np.ndarray) -> str:
    """circle, square or triangle from a component's bounding box geometry."""
    ys, xs = np.nonzero(comp)
    box = comp[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    rows = box.sum(1)
    top, bottom = rows[: max(1, h // 4)].mean(), rows[-max(1, h // 4) :].mean()
    if top < 0.6 * bottom:
        return "triangle"
    corners = int(box[0, 0]) + int(box[0, -1]) + int(box[-1, 0]) + int(box[-1, -1])
    fill = box.mean()
    return "square" if corners >= 3 and fill > 0.85 else "circle"


def detect(image: Union[Image.Image, np.ndarray]) -> list[dict]:
    """Objects in an image: ``{"color", "shape", "center": (x, y), "side": max bbox side, "box": (x0, y0, x1, y1)}``
    each; ``box`` is the bounding box's pixel edges (``x1 - x0`` is its width in pixels, as a detector's box)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    seg = segment(arr)
    objects = []
    for ci, name in enumerate(_NAMES):
        for comp in components(seg == ci):
            if comp.sum() < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            objects.append({"color": name, "shape": classify_shape(comp),
                            "center": ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2),
                            "side": int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1),
                            "box": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)})
    return objects


def _relation_holds(a: dict, b: dict, relation: str) -> bool:
    dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > 0 and along > abs(across)


def _small_side(image_size: int) -> float:
    """Objects with a bounding-box side below this (px) are "small"."""
    return 10.5 * image_size / 32


def _by_color(found: list[dict], scene: Scene) -> dict[str, list[dict]]:
    """The detected objects of each prompt colour."""
    return {o.color: [f for f in found if f["color"] == o.color] for o in scene.objects}


def score(image: Union[Image.Image, np.ndarray], scene: Scene, image_size: int = 32,
          found: Optional[list[dict]] = None) -> dict[str, float]:
    """Per-criterion scores (0/1), ``partial`` (their mean) and ``strict`` (all pass) of one image; ``found``:
    its ``detect`` output when already computed."""
    found = detect(image) if found is None else found
    crit = {"count": float(len(found) == scene.num_objects)}
    by_color = _by_color(found, scene)
    crit["color"] = float(all(len(by_color[o.color]) == o.count for o in scene.objects))
    shapes_ok = [f["shape"] == o.shape for o in scene.objects for f in by_color[o.color]]
    crit["shape"] = float(bool(shapes_ok) and all(shapes_ok))
    sized = [o for o in scene.objects if o.size]
    if sized:
        small = _small_side(image_size)
        crit["size"] = float(all(all((f["side"] < small) == (o.size == "small") for f in by_color[o.color])
                                 for o in sized) and all(by_color[o.color] for o in sized))
    if scene.relation:
        a, b = (by_color[o.color] for o in scene.objects)
        crit["relation"] = float(len(a) == 1 and len(b) == 1 and _relation_holds(a[0], b[0], scene.relation))
    values = list(crit.values())
    return {**crit, "partial": sum(values) / len(values), "strict": float(all(v == 1.0 for v in values))}


def _closeness(found: int, asked: int) -> float:
    """1 when ``found == asked``, falling linearly to 0 at ``|found - asked| >= asked``."""
    return max(0.0, 1.0 - abs(found - asked) / asked)


def dense_score(image: Union[Image.Image, np.ndarray], scene: Scene, image_size: int = 32,
                found: Optional[list[dict]] = None) -> float:
    """A graded version of ``partial`` in [0, 1], 1 exactly where ``strict`` is 1 (for training, not evaluation).

    Each criterion gives partial credit instead of 0/1: ``count`` and ``color`` by how close the object counts are
    (``1 - |found - asked| / asked``, floored at 0), ``shape`` and ``size`` by the share of the prompt-colour objects
    that pass; ``relation`` stays 0/1. So a four-object prompt drawn as five scores more than one drawn as seven,
    and a group of samples that all miss the strict count still carries a signal. ``found``: as in ``score``."""
    found = detect(image) if found is None else found
    by_color = _by_color(found, scene)
    crit = [_closeness(len(found), scene.num_objects),
            float(np.mean([_closeness(len(by_color[o.color]), o.count) for o in scene.objects]))]
    shapes = [f["shape"] == o.shape for o in scene.objects for f in by_color[o.color]]
    crit.append(float(np.mean(shapes)) if shapes else 0.0)
    sized = [(f["side"] < _small_side(image_size)) == (o.size == "small") for o in scene.objects if o.size
             for f in by_color[o.color]]
    if any(o.size for o in scene.objects):
        crit.append(float(np.mean(sized)) if sized else 0.0)
    if scene.relation:
        a, b = (by_color[o.color] for o in scene.objects)
        crit.append(float(len(a) == 1 and len(b) == 1 and _relation_holds(a[0], b[0], scene.relation)))
    return float(np.mean(crit))


def to_pil(media) -> list[Image.Image]:
    """PIL images from a list of PIL images or a float tensor ``[B, 3, H, W]`` in [0, 1]."""
    if isinstance(media, torch.Tensor):
        arr = (media.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    return list(media)


def _images_for(media, prompts: Sequence[str], reward: str) -> list[Image.Image]:
    """``to_pil(media)``, one image per prompt or a one-sentence error naming ``reward``."""
    images = to_pil(media)
    if len(images) != len(prompts):
        raise ValueError(f"{reward} reward got {len(images)} images for {len(prompts)} prompts")
    return images


def shapes_reward(media, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Reward: ``strict`` and ``partial`` scores, ``(batch,)`` float tensors."""
    images = _images_for(media, prompts, "shapes")
    rows = [score(img, parse_prompt(p), img.size[0]) for img, p in zip(images, prompts)]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in ("strict", "partial")}


def build(**options) -> "callable":
    """Registry factory: the shapes reward takes no options (its first score, ``strict``, is the training one)."""
    if options:
        raise ValueError(f"the shapes reward takes no options, got {sorted(options)}")
    return shapes_reward


def partial_reward(media, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The same scores with ``partial`` first: a denser training signal than the 0/1 ``strict`` one."""
    out = shapes_reward(media, prompts)
    return {"partial": out["partial"], "strict": out["strict"]}


def build_partial(**options) -> "callable":
    """Registry factory of ``partial_reward``."""
    build(**options)
    return partial_reward


def dense_reward(media, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Reward: ``dense`` (graded criteria, ``dense_score``) first, then ``strict``; ``(batch,)`` float tensors."""
    images = _images_for(media, prompts, "shapes_dense")
    dense, strict = [], []
    for img, p in zip(images, prompts):
        scene, found = parse_prompt(p), detect(img)  # one detection serves both scores
        dense.append(dense_score(img, scene, img.size[0], found))
        strict.append(score(img, scene, img.size[0], found)["strict"])
    return {"dense": torch.tensor(dense, dtype=torch.float32), "strict": torch.tensor(strict, dtype=torch.float32)}


def build_dense(**options) -> "callable":
    """Registry factory of ``dense_reward``."""
    build(**options)
    return dense_reward
