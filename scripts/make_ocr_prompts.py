"""Write the ``ocr`` evaluation suite's prompts: text-rendering prompts with their targets (seeded, deterministic).

Each line of the output is ``{"prompt": ..., "text": target, "category": short|medium|long}``: the prompt puts the
target between double quotes (where the OCR reward reads it) on one of a few dozen surfaces (signs, mugs, book
covers, ...), and the category is the target's length without spaces (the OCR reward ignores spaces): short 1-5,
medium 6-10, long 11-20 characters. Targets are upper-case words from a fixed list, optionally with a number, drawn
from ``random.Random(seed)``; every target is unique and none is a target of the training prompts
(``prompts/ocr_train.txt``), so the suite is held out. Categories take turns, so any first ``n`` lines are balanced.

    python scripts/make_ocr_prompts.py                        # writes prompts/ocr_suite.jsonl (300 prompts, seed 0)
    python scripts/make_ocr_prompts.py --n 30 --out /tmp/o.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SURFACES = (
    'a neon sign that says "{}"', 'a wooden signpost reading "{}"', 'a coffee mug with "{}" printed on it',
    'a chalkboard that says "{}"', 'a street sign reading "{}"', 'a birthday cake with "{}" written in icing',
    'a protest banner that says "{}"', 'a vintage poster titled "{}"', 'a t-shirt printed with "{}"',
    'a book cover titled "{}"', 'a shop window sticker reading "{}"', 'a theater marquee showing "{}"',
    'a doormat that says "{}"', 'a hand-painted sign reading "{}"', 'a greeting card with the words "{}"',
    'a tote bag printed with "{}"', 'a graffiti wall spelling "{}"', 'a cardboard box stamped "{}"',
    'a paper note that says "{}"', 'a bus display showing "{}"', 'a storefront awning reading "{}"',
    'a baseball cap embroidered with "{}"', 'a glass jar labelled "{}"', 'a billboard that reads "{}"',
    'a wooden crate stamped "{}"', 'a sticky note that says "{}"', 'a tin can labelled "{}"',
    'a movie poster with the title "{}"', 'a flag with the word "{}"', 'a lab coat name tag reading "{}"',
)
WORDS = (
    "ACE", "ARC", "BAY", "BOX", "CAB", "DOCK", "DUNE", "ECHO", "FERN", "FIG", "GATE", "GLOW", "HALO", "HIVE", "IRIS",
    "JADE", "KITE", "LAMP", "LIME", "MINT", "MOSS", "NEST", "NOVA", "OAK", "OPAL", "PIER", "PINE", "QUIZ", "REEF",
    "ROSE", "SAGE", "SILO", "TIDE", "TOWER", "UNION", "VAN", "VOLT", "WAVE", "YARD", "ZEN", "AMBER", "BISON", "CEDAR",
    "DELTA", "EMBER", "FABLE", "GRAIN", "HAVEN", "IVORY", "JUMBO", "KOALA", "LUNAR", "MAPLE", "NORTH", "OLIVE",
    "PIXEL", "QUEST", "RIVER", "SOLAR", "TULIP", "URBAN", "VELVET", "WALNUT", "YONDER", "ZEPHYR", "ANCHOR", "BREEZE",
    "CANYON", "DRAGON", "EMPIRE", "FOREST", "GALAXY", "HARBOR", "ISLAND", "JUNGLE", "KETTLE", "LAGOON", "MEADOW",
    "NECTAR", "ORBIT", "PEPPER", "QUARTZ", "ROCKET", "SUMMIT", "TIMBER", "VOYAGE", "WILLOW", "BAKERY", "CIRCUS",
    "LIBRARY", "MUSEUM", "STATION", "THEATER", "GARDEN", "MARKET", "FACTORY", "COTTAGE", "LANTERN", "COMPASS",
)
CATEGORIES = {"short": (1, 5), "medium": (6, 10), "long": (11, 20)}
"""Target length without spaces (characters), inclusive."""


def normalise(text: str) -> str:
    """As the OCR reward compares texts: lower-case, spaces removed."""
    return text.replace(" ", "").lower()


def training_targets(path: Path) -> set[str]:
    """The normalised quoted targets of a prompt file (one prompt a line)."""
    return {normalise(line.split('"')[1]) for line in path.read_text().splitlines() if line.count('"') >= 2}


def draw_target(rng: random.Random) -> str:
    """One to three words, or a word and a number from 1 to 99."""
    if rng.random() < 0.25:
        return f"{rng.choice(WORDS)} {rng.randint(1, 99)}"
    return " ".join(rng.sample(WORDS, rng.randint(1, 3)))


def category_of(target: str) -> str:
    """The length category of a target, or ``""`` when it is longer than every category."""
    size = len(normalise(target))
    return next((name for name, (lo, hi) in CATEGORIES.items() if lo <= size <= hi), "")


def make(n: int, seed: int, exclude: set[str]) -> list[dict]:
    """``n`` records, categories in turn, targets unique and outside ``exclude`` (normalised)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    pools: dict[str, list[str]] = {name: [] for name in CATEGORIES}
    names = list(CATEGORIES)
    while len(out) < n:
        want = names[len(out) % len(names)]
        while not pools[want]:
            target = draw_target(rng)
            if normalise(target) not in seen and category_of(target):
                seen.add(normalise(target))
                pools[category_of(target)].append(target)
        target = pools[want].pop(0)
        out.append({"prompt": rng.choice(SURFACES).format(target), "text": target, "category": want})
    return out


def main() -> None:
    """Parse the arguments and write the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of prompts (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=str(ROOT / "prompts" / "ocr_suite.jsonl"), help="output .jsonl file")
    args = parser.parse_args()
    records = make(args.n, args.seed, training_targets(ROOT / "prompts" / "ocr_train.txt"))
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = {name: sum(r["category"] == name for r in records) for name in CATEGORIES}
    print(f"wrote {args.out}: {len(records)} prompts ({', '.join(f'{k} {v}' for k, v in counts.items())})")


if __name__ == "__main__":
    main()
