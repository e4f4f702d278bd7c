"""GenEval's object-focused scoring with a pluggable object detector, and the shapes world in GenEval's format.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval, ``evaluation/evaluate_images.py``) describes each prompt
by metadata: ``{"tag", "prompt", "include": [clause, ...], "exclude": [clause, ...]}``. A clause is ``{"class",
"count"}`` with an optional ``"color"`` and, in ``include`` only, ``"position": [relation, j]`` (relative to the
objects that include clause ``j`` matched). An image is correct iff every clause holds (``check``):

- include: the ``count`` most confident detections of the class exist; with ``color``, all of them have that
  colour; with ``position``, each of them stands in the relation to each object that clause ``j`` matched, and
  clause ``j`` must itself have held;
- exclude: fewer than ``count`` detections of the class.

Detections at or below a confidence threshold (0.3; 0.9 for ``counting`` prompts) are dropped, and at most 16 per
class are kept, most confident first (``kept_detections``). The benchmark's score is the mean over tags of each
tag's accuracy. GenEval detects with Mask2Former and names colours with CLIP on each object's crop; here a
``Detector`` is any callable from an image to detections that carry their colour, so the scoring runs with
whatever detector is available. ``shapes_detector`` is the stand-in for the shapes world (``diffrl.shapes``), whose
vocabulary is GenEval's: shapes are the classes, with colours, counts and left/right/above/below;
``shapes_metadata`` writes GenEval-format metadata for shapes prompts of all six tags.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Protocol, Sequence, TypedDict

from PIL import Image

from diffrl.shapes import COLORS, RELATIONS, SHAPES, Obj, Scene, prompt_of

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in its order."""
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
"""GenEval's defaults: detection confidence cut-offs (``counting`` prompts use the second), detections kept per
class, and the share of the two boxes' extents an offset must exceed before it counts as a relation."""


Detection = TypedDict("Detection", {"class": str, "box": tuple, "score": float, "color": str}, total=False)
"""One detected object: ``class``, ``box`` ``(x0, y0, x1, y1)`` in pixels with y pointing down, ``score``
(confidence in [0, 1]) and ``color`` (needed by colour clauses)."""


class Detector(Protocol):
    """``detector(image) -> detections``: every object found in one RGB image."""

    def __call__(self, image: Image.Image) -> list[Detection]: ...


def shapes_detector(image: Image.Image) -> list[Detection]:
    """The shapes world's detector: the shapes verifier's objects (``rewards.shapes.detect``: palette colour,
    connected component, shape from the box geometry) as detections of confidence 1."""
    from rewards.shapes import detect

    return [{"class": o["shape"], "box": o["box"], "score": 1.0, "color": o["color"]} for o in detect(image)]


def kept_detections(detections: Sequence[Detection], tag: str, threshold: float = THRESHOLD,
                    counting_threshold: float = COUNTING_THRESHOLD,
                    max_objects: int = MAX_OBJECTS) -> dict[str, list[Detection]]:
    """Class -> its detections above the tag's confidence threshold, most confident first, at most
    ``max_objects`` (GenEval's ``evaluate_image`` before scoring)."""
    cut = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d["score"]):
        kept = by_class.setdefault(det["class"], [])
        if det["score"] > cut and len(kept) < max_objects:
            kept.append(det)
    return {name: kept for name, kept in by_class.items() if kept}


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box A lies relative to box B (GenEval's ``relative_position``): the offset ``o`` between their centres
    is shrunk on each axis by ``threshold`` times the two boxes' summed extents (not past 0), then divided by
    ``|o|``; ``left of`` where its x is below -0.5, ``right of`` above 0.5, ``above`` where its y is below -0.5
    and ``below`` above 0.5 (y points down). Empty when the shrunk offset vanishes."""
    offset = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    extent = [abs(box_a[i + 2] - box_a[i]) + abs(box_b[i + 2] - box_b[i]) for i in (0, 1)]
    shrunk = [math.copysign(max(abs(o) - threshold * e, 0.0), o) for o, e in zip(offset, extent)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    dx, dy = (s / math.hypot(*offset) for s in shrunk)
    found = {("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5)}
    return {name for name, holds in found if holds}


def _color(det: Detection) -> str:
    """A detection's colour; ValueError in one sentence when the detector gave it none."""
    if "color" not in det:
        raise ValueError(f"a colour clause needs detections with a 'color', and the detector gave none for a "
                         f"{det['class']!r}")
    return det["color"]


def _include_failure(clause: dict, found: list[Detection], groups: list[Optional[list[Detection]]]) -> str:
    """Why an include clause fails on ``found`` (its class's most confident detections), or ``""``."""
    name, count = clause["class"], clause["count"]
    if len(found) < count:
        return f"expected {count} {name}, found {len(found)}"
    colors = [_color(d) for d in found] if "color" in clause else []
    if "color" in clause and colors.count(clause["color"]) < count:
        return f"expected {count} {clause['color']} {name}, found colours {colors}"
    if "position" not in clause:
        return ""
    relation, target = clause["position"]
    if groups[target] is None:
        return f"no target for {name} to be {relation}"
    for det in found:
        for other in groups[target]:
            seen = relative_position(det["box"], other["box"])
            if relation not in seen:
                return f"expected {name} {relation} its target, found {' and '.join(sorted(seen)) or 'no relation'}"
    return ""


def check(metadata: dict, detected: dict[str, list[Detection]]) -> tuple[bool, list[str]]:
    """Whether an image with ``detected`` objects (``kept_detections``) satisfies every clause of ``metadata``
    (GenEval's ``evaluate``), and why not (one reason per failing clause)."""
    reasons: list[str] = []
    groups: list[Optional[list[Detection]]] = []
    for clause in metadata.get("include", []):
        found = detected.get(clause["class"], [])[: clause["count"]]
        failure = _include_failure(clause, found, groups)
        groups.append(None if failure else found)
        reasons += [failure] if failure else []
    for clause in metadata.get("exclude", []):
        seen = len(detected.get(clause["class"], []))
        if seen >= clause["count"]:
            reasons.append(f"expected fewer than {clause['count']} {clause['class']}, found {seen}")
    return not reasons, reasons


def _metadata_problem(record: object) -> str:
    """What keeps ``record`` from being GenEval metadata this module can score, or ``""``."""
    if not isinstance(record, dict) or not {"tag", "prompt"} <= set(record):
        return "it is not a JSON object with 'tag' and 'prompt'"
    include, exclude = record.get("include", []), record.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        return "'include' and 'exclude' must be lists of clauses"
    if not all(isinstance(c, dict) and isinstance(c.get("class"), str) and isinstance(c.get("count"), int)
               and c["count"] >= 1 for c in include + exclude):
        return "every clause needs a string 'class' and an integer 'count' >= 1"
    for j, pos in ((j, c["position"]) for j, c in enumerate(include) if "position" in c):
        if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
                and 0 <= pos[1] < j):
            return f"include clause {j}'s position must be [relation, index of an earlier include clause], got {pos!r}"
    return ""


def check_metadata(record: object, where: str) -> dict:
    """``record`` unchanged when it is GenEval metadata this module can score; ValueError in one sentence naming
    ``where`` (file and line) otherwise."""
    problem = _metadata_problem(record)
    if problem:
        raise ValueError(f"{where}: not GenEval metadata: {problem}")
    return record


def metadata_for(scene: Scene, tag: str) -> dict:
    """GenEval metadata of a shapes scene under ``tag``, as GenEval's ``create_prompts.py`` writes it: the shape is
    the class; ``single_object`` and ``two_object`` check only the classes, ``colors`` and ``color_attr`` also the
    colours, ``counting`` the count (and no more), ``position`` the relation of the first object to the second.
    ValueError for a scene the tag cannot describe (two objects of one class would match the same detection)."""
    objs = scene.objects
    kinds = {"single_object": "single", "colors": "single", "counting": "count", "two_object": "pair",
             "color_attr": "pair", "position": "relation"}
    if tag not in kinds or scene.kind != kinds[tag] or len({o.shape for o in objs}) < len(objs):
        raise ValueError(f"a {scene.kind} scene with shapes {[o.shape for o in objs]} is not a GenEval {tag!r} prompt")
    include = [{"class": o.shape, "count": o.count, **({"color": o.color} if "color" in tag else {})} for o in objs]
    out = {"tag": tag, "include": include, "prompt": prompt_of(scene)}
    if tag == "counting":
        out["exclude"] = [{"class": objs[0].shape, "count": objs[0].count + 1}]
    if tag == "position":
        out["include"] = [include[1], {**include[0], "position": [scene.relation, 0]}]
    return out


def _scene(rng: random.Random, tag: str) -> Scene:
    """A random shapes scene that ``tag`` can describe (two objects: different shapes and colours)."""
    colors, shapes = rng.sample(list(COLORS), 2), rng.sample(SHAPES, 2)
    if tag in ("single_object", "colors"):
        return Scene("single", (Obj(colors[0], shapes[0]),))
    if tag == "counting":
        return Scene("count", (Obj(colors[0], shapes[0], rng.randint(2, 4)),))
    pair = (Obj(colors[0], shapes[0]), Obj(colors[1], shapes[1]))
    return Scene("relation", pair, rng.choice(RELATIONS)) if tag == "position" else Scene("pair", pair)


def shapes_metadata(n: int, seed: int = 12345) -> list[dict]:
    """``n`` GenEval-format records of shapes prompts, the six tags in turn (record ``i`` has tag
    ``TAGS[i % 6]``), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [metadata_for(_scene(rng, TAGS[i % len(TAGS)]), TAGS[i % len(TAGS)]) for i in range(n)]
