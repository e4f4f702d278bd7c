"""GenEval's scoring against hand-worked cases (crafted detections), its metadata for shapes prompts, and the shapes
world's stand-in detector on hand-drawn images."""
import pytest
from PIL import Image, ImageDraw

from diffrl.geneval import (
    TAGS,
    check,
    check_metadata,
    kept_detections,
    metadata_for,
    relative_position,
    shapes_detector,
    shapes_metadata,
)
from diffrl.shapes import COLORS, Obj, Scene, draw_shape
from diffrl.suites import summarize


def det(cls, box, score=1.0, color=None):
    return {"class": cls, "box": box, "score": score, **({"color": color} if color else {})}


def squares(k, score=1.0):
    """``k`` squares side by side, 5 px wide."""
    return [det("square", (10 * i, 0, 10 * i + 5, 5), score, "blue") for i in range(k)]


COUNT_THREE = {"tag": "counting", "include": [{"class": "square", "count": 3}],
               "exclude": [{"class": "square", "count": 4}], "prompt": "three blue squares"}
LEFT_OF = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}],
           "prompt": "a red circle to the left of a blue square"}
RED_CIRCLE = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}


def test_relative_position_by_hand():
    # Centres (2, 2) and (22, 2), extents 4 + 4: the x offset -20 shrinks by 0.1 * 8 to -19.2, over |offset| 20.
    assert relative_position((0, 0, 4, 4), (20, 0, 24, 4)) == {"left of"}
    assert relative_position((20, 0, 24, 4), (0, 0, 4, 4)) == {"right of"}
    assert relative_position((0, 20, 4, 24), (0, 0, 4, 4)) == {"below"}  # y points down
    # Diagonal: offset (-10, -10) shrinks to (-9.2, -9.2); / 14.14 = -0.65 on both axes, past -0.5: two relations.
    assert relative_position((0, 0, 4, 4), (10, 10, 14, 14)) == {"left of", "above"}
    # Offset (-0.5, 0) is less than 0.1 * 8 = 0.8 on x: no relation at all.
    assert relative_position((0, 0, 4, 4), (0.5, 0, 4.5, 4)) == set()


def test_counting_three_found_two_or_four():
    assert check(COUNT_THREE, kept_detections(squares(3), "counting")) == (True, [])
    assert check(COUNT_THREE, kept_detections(squares(2), "counting")) == (False, ["expected 3 square, found 2"])
    assert check(COUNT_THREE, kept_detections(squares(4), "counting")) == (
        False, ["expected fewer than 4 square, found 4"])
    # A square of confidence 0.5 is dropped for counting (threshold 0.9) but kept for other tags (0.3).
    shaky = squares(2) + [det("square", (40, 0, 45, 5), 0.5, "blue")]
    assert check(COUNT_THREE, kept_detections(shaky, "counting"))[0] is False
    assert check(COUNT_THREE, kept_detections(shaky, "two_object"))[0] is True


def test_position_satisfied_violated_and_without_its_target():
    left = [det("circle", (0, 0, 4, 4), color="red"), det("square", (20, 0, 24, 4), color="blue")]
    right = [det("circle", (20, 0, 24, 4), color="red"), det("square", (0, 0, 4, 4), color="blue")]
    assert check(LEFT_OF, kept_detections(left, "position")) == (True, [])
    assert check(LEFT_OF, kept_detections(right, "position")) == (
        False, ["expected circle left of its target, found right of"])
    assert check(LEFT_OF, kept_detections(left[:1], "position")) == (
        False, ["expected 1 square, found 0", "no target for circle to be left of"])


def test_colour_is_checked_on_the_most_confident_objects_only():
    blue = [det("circle", (0, 0, 4, 4), color="blue")]
    assert check(RED_CIRCLE, kept_detections(blue, "colors")) == (
        False, ["expected 1 red circle, found colours ['blue']"])
    two = [det("circle", (0, 0, 4, 4), 0.9, "blue"), det("circle", (9, 0, 13, 4), 0.8, "red")]
    assert check(RED_CIRCLE, kept_detections(two, "colors"))[0] is False  # the top circle is blue
    two[1]["score"] = 0.95
    assert check(RED_CIRCLE, kept_detections(two, "colors"))[0] is True
    with pytest.raises(ValueError, match="needs detections with a 'color'"):
        check(RED_CIRCLE, kept_detections([det("circle", (0, 0, 4, 4))], "colors"))


def test_the_score_is_the_mean_of_the_per_tag_accuracies():
    """counting 1/3, position 1/2, colors 0/1: the score is (1/3 + 1/2 + 0) / 3 = 5/18, not 2/6 over images."""
    correct = [("counting", 1), ("counting", 0), ("counting", 0), ("position", 1), ("position", 0), ("colors", 0)]
    result = summarize([{"category": t, "scores": {"correct": float(c)}} for t, c in correct], "categories")
    assert result["overall"]["correct"] == pytest.approx(5 / 18)
    assert result["categories"]["counting"] == {"n": 3, "correct": pytest.approx(1 / 3)}
    assert summarize([{"category": t, "scores": {"correct": float(c)}} for t, c in correct],
                     "samples")["overall"]["correct"] == pytest.approx(2 / 6)


def test_metadata_of_shapes_scenes_is_geneval_s():
    rel = Scene("relation", (Obj("red", "circle"), Obj("blue", "square")), "left of")
    assert metadata_for(rel, "position") == LEFT_OF
    assert metadata_for(Scene("count", (Obj("blue", "square", 3),)), "counting") == COUNT_THREE
    assert metadata_for(Scene("single", (Obj("red", "circle"),)), "colors") == RED_CIRCLE
    pair = Scene("pair", (Obj("red", "circle"), Obj("green", "triangle")))
    assert metadata_for(pair, "color_attr")["include"] == [{"class": "circle", "count": 1, "color": "red"},
                                                          {"class": "triangle", "count": 1, "color": "green"}]
    assert metadata_for(pair, "two_object")["include"] == [{"class": "circle", "count": 1},
                                                          {"class": "triangle", "count": 1}]
    with pytest.raises(ValueError, match="is not a GenEval 'two_object' prompt"):
        metadata_for(Scene("pair", (Obj("red", "circle"), Obj("blue", "circle"))), "two_object")
    records = shapes_metadata(12)
    assert [r["tag"] for r in records] == list(TAGS) * 2 and records == shapes_metadata(12)
    assert all(check_metadata(r, "x") is r for r in records)
    with pytest.raises(ValueError, match="x, line 3: not GenEval metadata: include clause 0's position"):
        check_metadata({**LEFT_OF, "include": LEFT_OF["include"][::-1]}, "x, line 3")


def drawn(*objects):
    """A 32 px black image with ``(shape, colour, box)`` objects drawn on it."""
    img = Image.new("RGB", (32, 32))
    for shape, color, box in objects:
        draw_shape(ImageDraw.Draw(img), shape, box, COLORS[color])
    return img


def test_the_shapes_detector_finds_drawn_objects_with_boxes_and_colours():
    img = drawn(("circle", "red", (2, 10, 11, 19)), ("square", "blue", (20, 10, 29, 19)))
    found = sorted(shapes_detector(img), key=lambda d: d["box"][0])
    assert [(d["class"], d["color"], tuple(d["box"])) for d in found] == [
        ("circle", "red", (2, 10, 12, 20)), ("square", "blue", (20, 10, 30, 20))]  # pixel edges: x1 = last + 1
    assert check(LEFT_OF, kept_detections(found, "position")) == (True, [])
    three = drawn(*[("square", "blue", (1 + 10 * i, 2, 7 + 10 * i, 8)) for i in range(3)])
    assert check(COUNT_THREE, kept_detections(shapes_detector(three), "counting")) == (True, [])
