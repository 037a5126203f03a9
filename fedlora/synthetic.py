"""A small built-in sentiment task, generated from a seed.

Used only when the default dataset (GLUE SST-2) is found neither in a local
data directory nor on the hub, so that a first run works on any machine. The
sentences are English templates whose label is carried by the polarity of the
adjectives, which a pretrained encoder can pick up in a few dozen steps.
"""

from __future__ import annotations

import random

LABEL_NAMES = ("negative", "positive")

_POSITIVE = (
    "wonderful",
    "excellent",
    "delightful",
    "brilliant",
    "charming",
    "moving",
    "superb",
    "enjoyable",
    "gripping",
    "beautiful",
    "funny",
    "touching",
    "great",
    "memorable",
    "clever",
    "satisfying",
)
_NEGATIVE = (
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "tedious",
    "clumsy",
    "dull",
    "painful",
    "lifeless",
    "mediocre",
    "annoying",
    "pointless",
    "ugly",
    "forgettable",
    "bland",
    "disappointing",
)
_SUBJECTS = (
    "the film",
    "this movie",
    "the plot",
    "the acting",
    "the script",
    "the soundtrack",
    "the ending",
    "the cast",
    "the story",
    "the direction",
)
_TEMPLATES = (
    "{s} was {a}.",
    "{s} is {a} and {b}.",
    "i found {s} {a}.",
    "honestly, {s} felt {a} from start to finish.",
    "{s} turned out {a}, even {b}.",
    "what a {a} experience; {s} was {b}.",
)


def make_examples(n: int, seed: int) -> list[dict]:
    """``n`` examples ``{"text", "label"}``, balanced in expectation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = _POSITIVE if label == 1 else _NEGATIVE
        a, b = rng.sample(words, 2)
        text = rng.choice(_TEMPLATES).format(s=rng.choice(_SUBJECTS), a=a, b=b)
        rows.append({"text": text, "label": label})
    return rows


def make_splits(seed: int, n_train: int = 2000, n_eval: int = 400) -> dict[str, list[dict]]:
    return {"train": make_examples(n_train, seed), "validation": make_examples(n_eval, seed + 1)}
