"""Image-text task items with ground truth, in the style of COCO captions, VQAv2, OCR-VQA and
TallyQA, plus the small language helpers (object phrases, referring expressions, counts) that
the dialogue templates share.

Answers are short and normalised: lowercase words, numbers spelled out ("three"), positions as
grid names ("top left"), "yes"/"no".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moshivis_lab.world.scenes import Scene, SceneObject
from moshivis_lab.world.vocab import (
    BACKGROUNDS,
    COLOUR_NAMES,
    POSITION_NAMES,
    POSITION_PHRASES,
    SHAPE_PLURALS,
    SHAPES,
    SIZE_NAMES,
    number_word,
)

TASKS: tuple[str, ...] = ("caption", "vqa", "ocr", "count")
ANSWER_TYPES: tuple[str, ...] = (
    "caption", "colour", "shape", "size", "count", "position", "yes/no", "word",
)  # fmt: skip


@dataclass
class TaskItem:
    """One image-text sample: a question about a scene, its normalised answer, the objects used.

    ``filter`` records the attribute filter of counting and existence questions (for example
    ``{"colour": "red"}``), so the answer can be recomputed from the scene graph.
    """

    task: str
    question: str
    answer: str
    answer_type: str
    refs: list[int] = field(default_factory=list)
    filter: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "task": self.task,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "refs": list(self.refs),
            "filter": dict(self.filter),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskItem:
        """Rebuild a task item from ``to_json`` output."""
        return cls(
            task=d["task"],
            question=d["question"],
            answer=d["answer"],
            answer_type=d["answer_type"],
            refs=[int(i) for i in d.get("refs", [])],
            filter=dict(d.get("filter", {})),
        )


# --------------------------------------------------------------------------------------------
# Language helpers shared with the dialogue templates


def pick(rng: np.random.Generator, seq: Any) -> Any:
    """One element of a sequence, chosen by ``rng`` (plain Python values, not numpy scalars)."""
    return seq[int(rng.integers(len(seq)))]


def capitalise(text: str) -> str:
    """Upper-case the first letter of a sentence."""
    return text[:1].upper() + text[1:]


def article(phrase: str) -> str:
    """'a' or 'an' for a noun phrase ('an orange star', 'a red star')."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    """The phrase with its indefinite article ('an orange star')."""
    return f"{article(phrase)} {phrase}"


def object_phrase(o: SceneObject, *, size: bool = True, colour: bool = True) -> str:
    """'small red star' (the object's noun phrase without an article)."""
    words = ([o.size] if size else []) + ([o.colour] if colour else []) + [o.shape]
    return " ".join(words)


def position_phrase(position: str) -> str:
    """'at the top left', 'in the centre', 'on the right', ..."""
    return POSITION_PHRASES[position]


def matches(o: SceneObject, flt: dict[str, str]) -> bool:
    """Whether an object has every attribute of ``flt`` (keys shape/colour/size/position)."""
    return all(getattr(o, k) == v for k, v in flt.items())


def select(scene: Scene, flt: dict[str, str]) -> list[int]:
    """Indices of the scene objects matching an attribute filter."""
    return [i for i, o in enumerate(scene.objects) if matches(o, flt)]


def filter_noun(flt: dict[str, str], n: int) -> str:
    """'red objects', 'circle', 'small stars' for a filter and a count (plural unless n == 1)."""
    adj = [flt[k] for k in ("size", "colour") if k in flt]
    if "shape" in flt:
        noun = flt["shape"] if n == 1 else SHAPE_PLURALS[flt["shape"]]
    else:
        noun = "object" if n == 1 else "objects"
    return " ".join([*adj, noun])


def count_sentence(flt: dict[str, str], n: int) -> str:
    """'There are two red objects.', 'There is one circle.', 'There are no stars.'"""
    if n == 0:
        return f"There are no {filter_noun(flt, 0)}."
    if n == 1:
        return f"There is one {filter_noun(flt, 1)}."
    return f"There are {number_word(n)} {filter_noun(flt, n)}."


def referring(
    scene: Scene, index: int, *, avoid: tuple[str, ...] = ()
) -> tuple[str, dict[str, str]]:
    """The shortest unambiguous 'the ...' phrase for an object and the filter it denotes, not
    using the ``avoid`` attributes (any of "colour", "size", "position"; the shape is always
    named). Raises ``ValueError`` if no such phrase singles the object out."""
    o = scene.objects[index]
    options: list[tuple[dict[str, str], str]] = [({"shape": o.shape}, f"the {o.shape}")]
    if "size" not in avoid:
        options.append(({"shape": o.shape, "size": o.size}, f"the {o.size} {o.shape}"))
    if "colour" not in avoid:
        options.append(({"shape": o.shape, "colour": o.colour}, f"the {o.colour} {o.shape}"))
    if "position" not in avoid:
        options.append(
            (
                {"shape": o.shape, "position": o.position},
                f"the {o.shape} {position_phrase(o.position)}",
            )
        )
    for flt, text in options:
        if select(scene, flt) == [index]:
            return text, flt
    raise ValueError(
        f"refer: object {index} of scene {scene.id} cannot be singled out without {avoid}"
    )


def refer(scene: Scene, index: int, *, avoid: tuple[str, ...] = ()) -> str:
    """The shortest unambiguous 'the ...' phrase for an object (see ``referring``)."""
    return referring(scene, index, avoid=avoid)[0]


def can_refer(scene: Scene, index: int, *, avoid: tuple[str, ...] = ()) -> bool:
    """Whether ``refer`` finds a phrase for the object under these constraints."""
    try:
        refer(scene, index, avoid=avoid)
    except ValueError:
        return False
    return True


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """One sentence naming every object with its size, colour and position, and the background."""
    parts = [
        f"{with_article(object_phrase(o))} {position_phrase(o.position)}" for o in scene.objects
    ]
    text = f"{capitalise(_join(parts))} on a {BACKGROUNDS[scene.background]} background"
    if scene.word is not None:
        text += f", with the word {scene.word} written on it"
    return text + "."


# --------------------------------------------------------------------------------------------
# Task items

_CAPTION_QUESTIONS = (
    "Describe the picture.",
    "What is in this image?",
    "Describe this image in one sentence.",
    "What do you see in the picture?",
    "Give a short caption for this picture.",
)
_OCR_QUESTIONS = (
    "What word is written in the picture?",
    "What does the text in the image say?",
    "Which word can you read in the picture?",
    "What is written in this image?",
)


def _vqa_colour(scene: Scene, rng: np.random.Generator) -> TaskItem:
    i = int(rng.integers(len(scene.objects)))
    ref = refer(scene, i, avoid=("colour",))
    q = pick(rng, (f"What colour is {ref}?", f"Which colour does {ref} have?"))
    return TaskItem("vqa", q, scene.objects[i].colour, "colour", [i])


def _vqa_shape(scene: Scene, rng: np.random.Generator) -> TaskItem:
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    if select(scene, {"colour": o.colour}) == [i] and rng.random() < 0.5:
        q = f"What shape is the {o.colour} object?"
    else:
        q = f"What shape is {position_phrase(o.position)}?"
    return TaskItem("vqa", q, o.shape, "shape", [i])


def _vqa_size(scene: Scene, rng: np.random.Generator) -> TaskItem:
    i = int(rng.integers(len(scene.objects)))
    ref = refer(scene, i, avoid=("size",))
    return TaskItem("vqa", f"Is {ref} small or large?", scene.objects[i].size, "size", [i])


def _vqa_position(scene: Scene, rng: np.random.Generator) -> TaskItem:
    i = int(rng.integers(len(scene.objects)))
    ref = refer(scene, i, avoid=("position",))
    q = pick(rng, (f"Where is {ref}?", f"Where in the picture is {ref}?"))
    return TaskItem("vqa", q, scene.objects[i].position, "position", [i])


def _vqa_count(scene: Scene, rng: np.random.Generator) -> TaskItem:
    n = len(scene.objects)
    q = pick(rng, ("How many objects are there?", "How many shapes are in the picture?"))
    return TaskItem("vqa", q, number_word(n), "count", list(range(n)))


def absent_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) pair not in the scene, often sharing the colour or shape of an object."""
    present = scene.pairs
    for _ in range(50):
        o = pick(rng, scene.objects)
        r = rng.random()
        if r < 0.4:
            pair = (o.colour, pick(rng, SHAPES))
        elif r < 0.8:
            pair = (pick(rng, COLOUR_NAMES), o.shape)
        else:
            pair = (pick(rng, COLOUR_NAMES), pick(rng, SHAPES))
        if pair not in present:
            return pair
    return next((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present)


def yes_no_item(scene: Scene, rng: np.random.Generator, yes: bool) -> TaskItem:
    """A yes/no question whose answer is ``yes`` (existence, colour or position questions).

    ``filter`` is the claim the question asks about: the answer is "yes" exactly when some
    scene object matches it.
    """
    kind = pick(rng, ("exists", "exists", "colour", "position"))
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    if kind == "colour" and can_refer(scene, i, avoid=("colour",)):
        ref, flt = referring(scene, i, avoid=("colour",))
        c = o.colour if yes else pick(rng, [c for c in COLOUR_NAMES if c != o.colour])
        flt = {**flt, "colour": c}
        return TaskItem("vqa", f"Is {ref} {c}?", "yes" if yes else "no", "yes/no", [i], flt)
    if kind == "position":
        p = (
            o.position
            if yes
            else pick(rng, [p for p in POSITION_NAMES.values() if p != o.position])
        )
        flt = {"shape": o.shape, "colour": o.colour, "position": p}
        q = f"Is the {o.colour} {o.shape} {position_phrase(p)}?"
        return TaskItem("vqa", q, "yes" if yes else "no", "yes/no", [i], flt)
    colour, shape = (o.colour, o.shape) if yes else absent_pair(scene, rng)
    flt = {"colour": colour, "shape": shape}
    np_ = with_article(f"{colour} {shape}")
    q = pick(rng, (f"Is there {np_}?", f"Can you see {np_}?"))
    return TaskItem("vqa", q, "yes" if yes else "no", "yes/no", select(scene, flt), flt)


def count_filter(scene: Scene, rng: np.random.Generator, p_absent: float = 0.25) -> dict[str, str]:
    """An attribute filter for a counting question; with ``p_absent`` it matches nothing."""
    key = pick(rng, ("colour", "shape", "shape", "size", "colour"))
    values = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZE_NAMES}[key]
    present = sorted({getattr(o, key) for o in scene.objects})
    absent = [v for v in values if v not in present]
    if absent and rng.random() < p_absent:
        return {key: pick(rng, absent)}
    return {key: pick(rng, present)}


def _count_item(scene: Scene, rng: np.random.Generator) -> TaskItem:
    flt = count_filter(scene, rng)
    refs = select(scene, flt)
    noun = filter_noun(flt, 2)
    q = pick(rng, (f"How many {noun} are there?", f"How many {noun} are in the picture?"))
    return TaskItem("count", q, number_word(len(refs)), "count", refs, flt)


_VQA_MAKERS: tuple[Callable[[Scene, np.random.Generator], TaskItem], ...] = (
    _vqa_colour,
    _vqa_shape,
    _vqa_size,
    _vqa_position,
    _vqa_count,
)


def make_tasks(scene: Scene, rng: np.random.Generator) -> list[TaskItem]:
    """All task items for a scene: one caption, seven VQA (two yes/no), OCR if a word, two counts."""
    items = [TaskItem("caption", pick(rng, _CAPTION_QUESTIONS), caption(scene), "caption",
                      list(range(len(scene.objects))))]  # fmt: skip
    items += [make(scene, rng) for make in _VQA_MAKERS]
    items += [yes_no_item(scene, rng, bool(rng.random() < 0.5)) for _ in range(2)]
    if scene.word is not None:
        items.append(TaskItem("ocr", pick(rng, _OCR_QUESTIONS), scene.word, "word", []))
    counts: list[TaskItem] = []
    for _ in range(8):
        item = _count_item(scene, rng)
        if all(item.filter != c.filter for c in counts):
            counts.append(item)
        if len(counts) == 2:
            break
    items += counts
    return items
