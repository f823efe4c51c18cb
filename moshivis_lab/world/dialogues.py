"""Dialogues of the synthetic world: image dialogues of the six MoshiVis kinds, image-unrelated
chit-chat, and one-question task dialogues for the speechless image-text samples.

Every utterance is short plain ASCII English (letters, spaces and . , ? ! ') so espeak-ng can
speak it. Every fact an assistant states about an image is true of the scene graph; turns carry
``refs`` (indices of the scene objects they talk about) and each dialogue lists its checkable
questions in ``qa``:

``{"question", "answers", "topic", "asker", ...}`` where ``answers`` are lowercase key words
(any one is acceptable) that appear as words in the canonical assistant reply (compare after
lower-casing and stripping punctuation). Image entries also carry ``type`` (colour, shape, size,
position, count, yes/no, relation), ``refs`` and ``filter`` so the answer can be recomputed from
the scene. In teacher/student dialogues the assistant asks (``asker == "assistant"``) and the
entry records the user's answer and whether it was right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moshivis_lab.world.scenes import Scene
from moshivis_lab.world.tasks import (
    TaskItem,
    absent_pair,
    capitalise,
    count_filter,
    count_sentence,
    filter_noun,
    object_phrase,
    pick,
    position_phrase,
    refer,
    referring,
    select,
    with_article,
)
from moshivis_lab.world.vocab import (
    CELLS,
    COLOUR_NAMES,
    POSITION_NAMES,
    SHAPES,
    SIZE_NAMES,
    number_word,
)

DIALOGUE_KINDS: tuple[str, ...] = ("PROP", "LOC", "NUM", "LEAD", "TNS", "COMB")
MAX_WORDS = 15


@dataclass
class Turn:
    """One utterance of a dialogue: who speaks, what, and which scene objects it is about."""

    speaker: str
    text: str
    refs: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"speaker": self.speaker, "text": self.text, "refs": list(self.refs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Turn:
        """Rebuild a turn from ``to_json`` output."""
        return cls(speaker=d["speaker"], text=d["text"], refs=[int(i) for i in d.get("refs", [])])


@dataclass
class Dialogue:
    """A dialogue: its kind (PROP..COMB, CHAT, or a task name), turns, image, topic, checkable QA."""

    id: str
    kind: str
    turns: list[Turn]
    image_id: str | None
    topic: str
    qa: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "kind": self.kind,
            "topic": self.topic,
            "image_id": self.image_id,
            "turns": [t.to_json() for t in self.turns],
            "qa": [dict(q) for q in self.qa],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Dialogue:
        """Rebuild a dialogue from ``to_json`` output."""
        return cls(
            id=d["id"],
            kind=d["kind"],
            turns=[Turn.from_json(t) for t in d["turns"]],
            image_id=d.get("image_id"),
            topic=d["topic"],
            qa=[dict(q) for q in d.get("qa", [])],
        )

    @property
    def text(self) -> str:
        """All turns as 'speaker: text' lines (for printing)."""
        return "\n".join(f"{t.speaker}: {t.text}" for t in self.turns)


def n_words(text: str) -> int:
    """Number of words of an utterance."""
    return len(text.split())


def _fit(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    """A random option of at most MAX_WORDS words (the shortest one if none fits)."""
    ok = [o for o in options if n_words(o) <= MAX_WORDS]
    return pick(rng, ok) if ok else min(options, key=n_words)


# --------------------------------------------------------------------------------------------
# Image exchanges: each returns one user question and the assistant's reply


@dataclass
class _Exchange:
    user: str
    assistant: str
    refs: list[int]
    qa: dict[str, Any] | None = None
    user_refs: list[int] | None = None


def _qa(question: str, answer: str, kind: str, refs: list[int], **extra: Any) -> dict[str, Any]:
    """A QA entry; the canonical answer comes first ("zero" also accepts "no" and "none")."""
    answers = [answer, "no", "none"] if answer == "zero" else [answer]
    return {"question": question, "answers": answers, "topic": "image", "asker": "user",
            "type": kind, "refs": list(refs), **extra}  # fmt: skip


def _obj(scene: Scene, rng: np.random.Generator) -> int:
    return int(rng.integers(len(scene.objects)))


def _ex_colour(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    ref = refer(scene, i, avoid=("colour",))
    c = scene.objects[i].colour
    q = pick(rng, (f"What colour is {ref}?", f"Which colour is {ref}?",
                   f"Can you tell me the colour of {ref}?"))  # fmt: skip
    a = _fit(rng, [f"{capitalise(ref)} is {c}.", f"It is {c}."])
    return _Exchange(q, a, [i], _qa(q, c, "colour", [i]))


def _ex_shape(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    shape = with_article(o.shape)
    if select(scene, {"colour": o.colour}) == [i] and rng.random() < 0.5:
        q = pick(rng, (f"What shape is the {o.colour} object?", f"What is the {o.colour} shape?"))
        a = pick(rng, (f"The {o.colour} object is {shape}.", f"It is {shape}."))
    else:
        pos = position_phrase(o.position)
        q = pick(rng, (f"What shape is {pos}?", f"Which shape is {pos}?"))
        a = pick(rng, (f"It is {shape}.", f"There is {with_article(object_phrase(o))} {pos}."))
    return _Exchange(q, a, [i], _qa(q, o.shape, "shape", [i]))


def _ex_size(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    ref = refer(scene, i, avoid=("size",))
    s = scene.objects[i].size
    q = pick(rng, (f"Is {ref} small or large?", f"How big is {ref}?", f"Is {ref} large or small?"))
    a = pick(rng, (f"{capitalise(ref)} is {s}.", f"It is {s}.", f"It is quite {s}."))
    return _Exchange(q, a, [i], _qa(q, s, "size", [i]))


def _ex_colour_check(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    ref = refer(scene, i, avoid=("colour",))
    flt = _ref_filter(scene, i, ("colour",))
    yes = bool(rng.random() < 0.5)
    c = o.colour if yes else pick(rng, [c for c in COLOUR_NAMES if c != o.colour])
    q = f"Is {ref} {c}?"
    if yes:
        a = pick(rng, (f"Yes, {ref} is {c}.", "Yes, it is.", f"Yes, it is {c}."))
    else:
        a = _fit(rng, [f"No, {ref} is {o.colour}, not {c}.", f"No, it is {o.colour}."])
    return _Exchange(
        q, a, [i], _qa(q, "yes" if yes else "no", "yes/no", [i], filter={**flt, "colour": c})
    )


def _ref_filter(scene: Scene, i: int, avoid: tuple[str, ...]) -> dict[str, str]:
    return referring(scene, i, avoid=avoid)[1]


def _ex_exists(scene: Scene, rng: np.random.Generator) -> _Exchange:
    yes = bool(rng.random() < 0.5)
    if yes:
        i = _obj(scene, rng)
        o = scene.objects[i]
        colour, shape = o.colour, o.shape
    else:
        colour, shape = absent_pair(scene, rng)
    np_ = with_article(f"{colour} {shape}")
    q = pick(rng, (f"Is there {np_}?", f"Can you see {np_}?", f"Do you see {np_} anywhere?"))
    flt = {"colour": colour, "shape": shape}
    refs = select(scene, flt)
    if yes:
        o = scene.objects[refs[0]]
        a = _fit(rng, [f"Yes, there is {with_article(object_phrase(o))} {position_phrase(o.position)}.",
                       f"Yes, {position_phrase(o.position)}.", "Yes, there is."])  # fmt: skip
    else:
        same_colour = select(scene, {"colour": colour})
        if same_colour and rng.random() < 0.4:
            other = scene.objects[same_colour[0]]
            a = f"No, but there is {with_article(f'{colour} {other.shape}')}."
            refs = [same_colour[0]]
        else:
            a = pick(rng, (f"No, there is no {colour} {shape}.", f"No, I do not see {np_}."))
    qa = _qa(q, "yes" if yes else "no", "yes/no", select(scene, flt), filter=flt)
    return _Exchange(q, a, refs, qa, user_refs=select(scene, flt))


def _ex_where(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    ref = refer(scene, i, avoid=("position",))
    pos = scene.objects[i].position
    q = pick(
        rng, (f"Where is {ref}?", f"Where can I find {ref}?", f"Where is {ref} in the picture?")
    )
    a = pick(
        rng, (f"{capitalise(ref)} is {position_phrase(pos)}.", f"It is {position_phrase(pos)}.")
    )
    return _Exchange(q, a, [i], _qa(q, pos, "position", [i]))


def _ex_what_at(scene: Scene, rng: np.random.Generator) -> _Exchange:
    occupied = {o.cell: k for k, o in enumerate(scene.objects)}
    empty = [c for c in CELLS if c not in occupied and c not in scene.word_cells]
    if empty and rng.random() < 0.3:
        cell = pick(rng, empty)
    else:
        cell = scene.objects[_obj(scene, rng)].cell
    pos = POSITION_NAMES[cell]
    q = pick(rng, (f"What is {position_phrase(pos)}?", f"What can you see {position_phrase(pos)}?"))
    if cell in occupied:
        i = occupied[cell]
        o = scene.objects[i]
        a = pick(rng, (f"There is {with_article(object_phrase(o))} {position_phrase(pos)}.",
                       f"{capitalise(with_article(object_phrase(o)))}."))  # fmt: skip
        return _Exchange(q, a, [i], _qa(q, o.shape, "shape", [i], filter={"position": pos}))
    a = pick(rng, (f"There is nothing {position_phrase(pos)}.", "Nothing, that part is empty."))
    return _Exchange(q, a, [], _qa(q, "nothing", "shape", [], filter={"position": pos}))


def _ex_position_check(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    ref = refer(scene, i, avoid=("position",))
    yes = bool(rng.random() < 0.5)
    p = o.position if yes else pick(rng, [p for p in POSITION_NAMES.values() if p != o.position])
    q = f"Is {ref} {position_phrase(p)}?"
    if yes:
        a = pick(rng, (f"Yes, {ref} is {position_phrase(p)}.", "Yes, it is."))
    else:
        a = _fit(rng, [f"No, {ref} is {position_phrase(o.position)}.",
                       f"No, it is {position_phrase(o.position)}."])  # fmt: skip
    flt = {**_ref_filter(scene, i, ("position",)), "position": p}
    return _Exchange(q, a, [i], _qa(q, "yes" if yes else "no", "yes/no", [i], filter=flt))


def _ex_relation(scene: Scene, rng: np.random.Generator) -> _Exchange | None:
    if len(scene.objects) < 2:
        return None
    i, j = (int(k) for k in rng.permutation(len(scene.objects))[:2])
    a_o, b_o = scene.objects[i], scene.objects[j]
    ra, rb = refer(scene, i, avoid=("position",)), refer(scene, j, avoid=("position",))
    if a_o.cell[0] != b_o.cell[0] and (a_o.cell[1] == b_o.cell[1] or rng.random() < 0.5):
        rel, q_rel = pick(rng, (("above", "above"), ("below", "below")))
        truth = a_o.cell[0] < b_o.cell[0] if rel == "above" else a_o.cell[0] > b_o.cell[0]
        real = "above" if a_o.cell[0] < b_o.cell[0] else "below"
    elif a_o.cell[1] != b_o.cell[1]:
        rel, q_rel = pick(rng, (("left of", "to the left of"), ("right of", "to the right of")))
        truth = a_o.cell[1] < b_o.cell[1] if rel == "left of" else a_o.cell[1] > b_o.cell[1]
        real = "to the left of" if a_o.cell[1] < b_o.cell[1] else "to the right of"
    else:
        return None
    q = f"Is {ra} {q_rel} {rb}?"
    if truth:
        a = _fit(rng, [f"Yes, {ra} is {q_rel} {rb}.", "Yes, it is."])
    else:
        a = _fit(rng, [f"No, {ra} is {real} {rb}.", f"No, it is {real} it."])
    qa = _qa(q, "yes" if truth else "no", "relation", [i, j], relation=rel)
    return _Exchange(q, a, [i, j], qa)


def _ex_count_all(scene: Scene, rng: np.random.Generator) -> _Exchange:
    n = len(scene.objects)
    q = pick(rng, ("How many objects are there?", "How many shapes can you see?",
                   "How many things are in the picture?", "Can you count the objects?"))  # fmt: skip
    noun = filter_noun({}, n)
    a = pick(rng, (count_sentence({}, n), f"I can see {number_word(n)} {noun}.",
                   f"I count {number_word(n)} {noun}."))  # fmt: skip
    refs = list(range(n))
    return _Exchange(q, a, refs, _qa(q, number_word(n), "count", refs, filter={}))


def _ex_count(scene: Scene, rng: np.random.Generator) -> _Exchange:
    flt = count_filter(scene, rng)
    if "shape" not in flt and "size" not in flt and rng.random() < 0.3:
        flt["size"] = pick(rng, SIZE_NAMES)
    refs = select(scene, flt)
    noun = filter_noun(flt, 2)
    q = pick(rng, (f"How many {noun} are there?", f"How many {noun} can you see?",
                   f"How many {noun} are in the picture?"))  # fmt: skip
    a = count_sentence(flt, len(refs))
    if refs and rng.random() < 0.3:
        a = f"I see {number_word(len(refs))} {filter_noun(flt, len(refs))}."
    return _Exchange(q, a, refs, _qa(q, number_word(len(refs)), "count", refs, filter=flt))


# Misleading questions (LEAD): the user states something false, the assistant corrects it.


def _lead_colour(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    ref = refer(scene, i, avoid=("colour",))
    wrong = pick(rng, [c for c in COLOUR_NAMES if c != o.colour])
    q = pick(rng, (f"Why is {ref} {wrong}?", f"Why did they make {ref} {wrong}?",
                   f"I wonder why {ref} is {wrong}."))  # fmt: skip
    a = _fit(
        rng,
        [
            f"Actually, {ref} is {o.colour}, not {wrong}.",
            f"Actually, it is {o.colour}, not {wrong}.",
        ],
    )
    return _Exchange(q, a, [i], _qa(q, o.colour, "colour", [i], false_premise=wrong))


def _lead_position(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    ref = refer(scene, i, avoid=("position",))
    wrong = pick(rng, [p for p in POSITION_NAMES.values() if p != o.position])
    q = pick(rng, (f"Why is {ref} {position_phrase(wrong)}?",
                   f"What is {ref} doing {position_phrase(wrong)}?"))  # fmt: skip
    a = _fit(rng, [f"Actually, {ref} is {position_phrase(o.position)}, not {position_phrase(wrong)}.",
                   f"Actually, {ref} is {position_phrase(o.position)}.",
                   f"Actually, it is {position_phrase(o.position)}."])  # fmt: skip
    return _Exchange(q, a, [i], _qa(q, o.position, "position", [i], false_premise=wrong))


def _lead_size(scene: Scene, rng: np.random.Generator) -> _Exchange:
    i = _obj(scene, rng)
    o = scene.objects[i]
    ref = refer(scene, i, avoid=("size",))
    wrong = "small" if o.size == "large" else "large"
    q = pick(rng, (f"Why is {ref} so {wrong}?", f"How come {ref} is so {wrong}?"))
    a = _fit(
        rng, [f"Actually, {ref} is {o.size}, not {wrong}.", f"Actually, it is quite {o.size}."]
    )
    return _Exchange(q, a, [i], _qa(q, o.size, "size", [i], false_premise=wrong))


def _lead_count(scene: Scene, rng: np.random.Generator) -> _Exchange:
    n = len(scene.objects)
    wrong = pick(rng, [m for m in range(2, 8) if m != n])
    q = pick(rng, (f"Why are there {number_word(wrong)} objects in the picture?",
                   f"Why did they draw {number_word(wrong)} shapes?"))  # fmt: skip
    if n == 1:
        a = "Actually, there is only one object."
    elif n < wrong:
        a = pick(rng, (f"Actually, there are only {number_word(n)} objects.",
                       f"Actually, there are {number_word(n)} objects, not {number_word(wrong)}."))  # fmt: skip
    else:
        a = f"Actually, there are {number_word(n)} objects, not {number_word(wrong)}."
    refs = list(range(n))
    return _Exchange(q, a, refs, _qa(q, number_word(n), "count", refs, filter={},
                                     false_premise=number_word(wrong)))  # fmt: skip


def _lead_absent(scene: Scene, rng: np.random.Generator) -> _Exchange:
    colour, shape = absent_pair(scene, rng)
    q = pick(rng, (f"Why is the {colour} {shape} so big?", f"What is the {colour} {shape} doing here?",
                   f"Why is the {colour} {shape} in the corner?"))  # fmt: skip
    a = pick(rng, (f"Actually, there is no {colour} {shape} in the picture.",
                   f"Actually, there is no {colour} {shape} here."))  # fmt: skip
    flt = {"colour": colour, "shape": shape}
    return _Exchange(q, a, [], _qa(q, "no", "yes/no", [], filter=flt, false_premise="yes"))


def _lead_shape(scene: Scene, rng: np.random.Generator) -> _Exchange | None:
    unique = [i for i, o in enumerate(scene.objects) if select(scene, {"colour": o.colour}) == [i]]
    if not unique:
        return None
    i = pick(rng, unique)
    o = scene.objects[i]
    wrong = pick(rng, [s for s in SHAPES if s != o.shape])
    q = f"Why is the {o.colour} object {with_article(wrong)}?"
    a = f"Actually, the {o.colour} object is {with_article(o.shape)}, not {with_article(wrong)}."
    return _Exchange(q, a, [i], _qa(q, o.shape, "shape", [i], false_premise=wrong))


_Maker = Callable[[Scene, np.random.Generator], "_Exchange | None"]
_MAKERS: dict[str, tuple[_Maker, ...]] = {
    "PROP": (_ex_colour, _ex_colour, _ex_shape, _ex_size, _ex_colour_check, _ex_exists),
    "LOC": (_ex_where, _ex_where, _ex_what_at, _ex_position_check, _ex_relation),
    "NUM": (_ex_count_all, _ex_count, _ex_count, _ex_count),
    "LEAD": (
        _lead_colour,
        _lead_colour,
        _lead_position,
        _lead_size,
        _lead_count,
        _lead_absent,
        _lead_shape,
    ),  # fmt: skip
}
_LEAD_ACKS = (
    ("Oh, you are right. Thanks!", "You are welcome."),
    ("Oops, my mistake.", "No problem at all."),
    ("Ah, I see it now.", "Great, happy to help."),
    ("Sorry, I looked too fast.", "That is okay."),
)
_OPENERS = ("", "", "", "Look at this picture. ", "Hey, ", "Quick question. ", "Tell me, ")


def _exchange(scene: Scene, kind: str, rng: np.random.Generator, asked: set[str]) -> _Exchange:
    for _ in range(30):
        ex = pick(rng, _MAKERS[kind])(scene, rng)
        if ex is not None and ex.user not in asked and n_words(ex.user) <= MAX_WORDS:
            return ex
    # Always possible and short: count or locate
    return _ex_count_all(scene, rng) if kind != "LOC" else _ex_where(scene, rng)


def _open(rng: np.random.Generator, text: str, first: bool) -> str:
    if first:
        opener = pick(rng, _OPENERS)
        if opener and n_words(opener + text) <= MAX_WORDS:
            return opener + (text[0].lower() + text[1:] if opener.endswith(", ") else text)
        return text
    if rng.random() < 0.3 and n_words(text) < MAX_WORDS and not text.startswith(("I ", "Oh")):
        return "And " + text[0].lower() + text[1:]
    return text


# Teacher/student (TNS): the user asks to be quizzed; the assistant asks, the user answers.

_QUIZ_REQUESTS = (
    "Can you quiz me about this picture?",
    "Let us play a quiz about the image.",
    "Test me on this picture, please.",
    "Ask me a question about the image.",
    "I want to practise. Quiz me on this picture.",
)
_PRAISE = ("Yes, well done!", "That is right!", "Correct, great job!", "Exactly right!")
_NEXT = ("Next question.", "Here is another one.", "Now try this one.")


def _quiz(
    scene: Scene, rng: np.random.Generator
) -> tuple[str, str, list[str], str, list[int], dict[str, str]]:
    """(question, truth, wrong values, type, refs, filter) for one quiz question."""
    kind = pick(rng, ("colour", "colour", "shape", "count", "position", "size"))
    i = _obj(scene, rng)
    o = scene.objects[i]
    if kind == "colour":
        q = f"What colour is {refer(scene, i, avoid=('colour',))}?"
        return q, o.colour, [c for c in COLOUR_NAMES if c != o.colour], kind, [i], {}
    if kind == "shape":
        q = f"What shape is {position_phrase(o.position)}?"
        return q, o.shape, [s for s in SHAPES if s != o.shape], kind, [i], {}
    if kind == "position":
        q = f"Where is {refer(scene, i, avoid=('position',))}?"
        return q, o.position, [p for p in POSITION_NAMES.values() if p != o.position], kind, [i], {}
    if kind == "size":
        q = f"Is {refer(scene, i, avoid=('size',))} small or large?"
        return q, o.size, [s for s in SIZE_NAMES if s != o.size], kind, [i], {}
    flt = count_filter(scene, rng, p_absent=0.1) if rng.random() < 0.6 else {}
    refs = select(scene, flt)
    q = f"How many {filter_noun(flt, 2)} are there?"
    n = len(refs)
    wrong = [number_word(m) for m in range(0, 7) if m != n and abs(m - n) <= 2]
    return q, number_word(n), wrong, "count", refs, flt


def _say_value(rng: np.random.Generator, kind: str, v: str) -> str:
    """How the user says an answer of this kind."""
    v = _spoken(kind, v)
    if kind == "count":
        return pick(
            rng, (f"{capitalise(v)}?", f"I think {v}.", f"I count {v}.", f"{capitalise(v)}.")
        )
    return pick(rng, (f"It is {v}.", f"{capitalise(v)}?", f"I think it is {v}.", f"Is it {v}?"))


def _spoken(kind: str, value: str) -> str:
    """A value as said in a sentence: 'a star', 'at the top left', 'red'."""
    if kind == "shape":
        return with_article(value)
    if kind == "position":
        return position_phrase(value)
    return value


def _feedback(kind: str, truth: str, said: str, flt: dict[str, str], n: int, ref: str) -> list[str]:
    """Feedback options on a quiz answer, shortest last."""
    if said == truth:
        return list(_PRAISE)
    if kind == "count":
        return [f"Not quite. {count_sentence(flt, n)}", f"Good try, but the answer is {truth}."]
    shown, wrong = _spoken(kind, truth), _spoken(kind, said)
    opts = [f"Good try, but it is {shown}.", f"Not quite, it is {shown}."]
    if ref:
        opts.insert(0, f"Not quite. {capitalise(ref)} is {shown}, not {wrong}.")
    return opts


def _tns(scene: Scene, rng: np.random.Generator) -> tuple[list[Turn], list[dict[str, Any]]]:
    turns = [Turn("user", pick(rng, _QUIZ_REQUESTS))]
    qa: list[dict[str, Any]] = []
    rounds = 1 if rng.random() < 0.5 else 2
    lead = pick(rng, ("Sure!", "Okay!", "Of course.", "Let us go."))
    asked: set[str] = set()
    prev_feedback: list[str] | None = None
    for _ in range(rounds):
        # Leave room for the feedback on the previous answer in the same turn.
        budget = MAX_WORDS - (4 if prev_feedback is None else min(map(n_words, prev_feedback)))
        for _ in range(20):
            q, truth, wrong, kind, refs, flt = _quiz(scene, rng)
            if q not in asked and n_words(q) <= budget:
                break
        else:
            n = len(scene.objects)
            q, truth, kind, refs, flt = (
                "How many objects are there?",
                number_word(n),
                "count",
                list(range(n)),
                {},
            )
            wrong = [number_word(m) for m in range(1, 7) if m != n and abs(m - n) <= 2]
        asked.add(q)
        if prev_feedback is None:
            turns.append(Turn("assistant", _fit(rng, [f"{lead} {q}", q]), refs))
        else:
            nxt = pick(rng, _NEXT)
            opts = [f"{fb} {nxt} {q}" for fb in prev_feedback] + [
                f"{fb} {q}" for fb in prev_feedback
            ]
            turns.append(Turn("assistant", _fit(rng, opts), turns[-1].refs + refs))
        correct = bool(rng.random() < 0.6) or not wrong
        said = truth if correct else pick(rng, wrong)
        turns.append(Turn("user", _say_value(rng, kind, said), list(refs)))
        ref = "" if kind in ("shape", "count") else refer(scene, refs[0], avoid=(kind,))
        prev_feedback = _feedback(kind, truth, said, flt, len(refs), ref)
        qa.append({"question": q, "answers": [truth], "topic": "image", "asker": "assistant",
                   "type": kind, "refs": list(refs), "filter": dict(flt), "user_answer": said,
                   "user_correct": said == truth})  # fmt: skip
    assert prev_feedback is not None
    turns.append(Turn("assistant", _fit(rng, prev_feedback), list(turns[-1].refs)))
    return turns, qa


def image_dialogue(scene: Scene, kind: str, rng: np.random.Generator, dialogue_id: str) -> Dialogue:
    """A spoken-style dialogue of one MoshiVis kind (PROP, LOC, NUM, LEAD, TNS, COMB) about a scene."""
    if kind not in DIALOGUE_KINDS:
        raise ValueError(f"image_dialogue: kind must be one of {DIALOGUE_KINDS}, got {kind!r}")
    if not scene.objects:
        raise ValueError(f"image_dialogue: scene {scene.id} has no objects")
    if kind == "TNS":
        turns, qa = _tns(scene, rng)
        return Dialogue(dialogue_id, kind, turns, scene.id, "image", qa)
    n_ex = int(rng.integers(1, 4))
    if kind == "COMB":
        n_ex = max(2, n_ex)
        kinds = [str(k) for k in rng.permutation(["PROP", "LOC", "NUM", "LEAD"])[:n_ex]]
    elif kind == "LEAD":
        kinds = ["LEAD"] + [
            pick(rng, ("ACK", "ACK", "PROP", "LOC", "NUM", "LEAD")) for _ in range(n_ex - 1)
        ]
    else:
        kinds = [kind] * n_ex
    turns: list[Turn] = []
    qa: list[dict[str, Any]] = []
    asked: set[str] = set()
    for k, sub in enumerate(kinds):
        if sub == "ACK" and kinds[k - 1] != "LEAD":
            sub = "PROP"  # acknowledgements only follow a correction
        if sub == "ACK":
            u, a = pick(rng, _LEAD_ACKS)
            turns += [Turn("user", u), Turn("assistant", a)]
            continue
        ex = _exchange(scene, sub, rng, asked)
        asked.add(ex.user)
        user = _open(rng, ex.user, first=(k == 0))
        user_refs = ex.refs if ex.user_refs is None else ex.user_refs
        turns += [
            Turn("user", user, list(user_refs)),
            Turn("assistant", ex.assistant, list(ex.refs)),
        ]
        if ex.qa is not None:
            qa.append({**ex.qa, "question": user})
    return Dialogue(dialogue_id, kind, turns, scene.id, "image", qa)


def task_dialogue(scene: Scene, item: TaskItem, dialogue_id: str) -> Dialogue:
    """One task item as a two-turn dialogue (kind = task name upper-cased, e.g. 'VQA')."""
    answer = item.answer if item.answer.endswith(".") else capitalise(item.answer) + "."
    turns = [
        Turn("user", item.question, list(item.refs)),
        Turn("assistant", answer, list(item.refs)),
    ]
    qa: list[dict[str, Any]] = []
    if item.task != "caption":
        qa.append({"question": item.question, "answers": [item.answer], "topic": "image",
                   "asker": "user", "type": item.answer_type, "refs": list(item.refs),
                   "filter": dict(item.filter)})  # fmt: skip
    return Dialogue(dialogue_id, item.task.upper(), turns, scene.id, "image", qa)


# --------------------------------------------------------------------------------------------
# Chit-chat: image-unrelated dialogues. Each topic yields (user, assistant, answers | None).

_Ex = tuple[str, str, list[str] | None]

_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
          "Laura", "Max", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Lucy", "Leo")  # fmt: skip
_CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Greece": "Athens",
    "Norway": "Oslo", "Russia": "Moscow", "China": "Beijing", "England": "London",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Cuba": "Havana", "Thailand": "Bangkok", "Chile": "Santiago",
    "Hungary": "Budapest", "Denmark": "Copenhagen", "Finland": "Helsinki", "Belgium": "Brussels",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Turkey": "Ankara", "Ghana": "Accra",
}  # fmt: skip
_SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "snake": "hiss", "bee": "buzz",
    "mouse": "squeak", "frog": "croak", "wolf": "howl", "crow": "caw", "dove": "coo",
}  # fmt: skip
_BABIES = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal",
    "duck": "duckling", "frog": "tadpole", "bear": "cub", "goat": "kid", "kangaroo": "joey",
}  # fmt: skip
_ANIMAL_FACTS = (
    ("Where do fish live?", "Fish live in water.", "water"),
    ("What do birds use to fly?", "Birds use their wings to fly.", "wings"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("What do spiders spin?", "Spiders spin webs.", "webs"),
    ("Which animal has a very long neck?", "The giraffe has a very long neck.", "giraffe"),
    ("Which animal has a trunk?", "The elephant has a trunk.", "elephant"),
    (
        "Which animal is the king of the jungle?",
        "The lion is called the king of the jungle.",
        "lion",
    ),
    ("What do rabbits like to eat?", "Rabbits like to eat carrots.", "carrots"),
)
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("day", "night"), ("light", "dark"), ("open", "closed"), ("old", "young"), ("wet", "dry"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"), ("high", "low"),
    ("long", "short"), ("near", "far"), ("strong", "weak"), ("thick", "thin"), ("clean", "dirty"),
    ("left", "right"), ("push", "pull"), ("win", "lose"), ("first", "last"), ("inside", "outside"),
    ("awake", "asleep"), ("true", "false"), ("heavy", "light"), ("rich", "poor"), ("sweet", "sour"),
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip
_SEASONS = ("spring", "summer", "autumn", "winter")
_THING_COLOURS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("coal", "black"), ("a strawberry", "red"), ("a carrot", "orange"), ("chocolate", "brown"),
    ("a lemon", "yellow"), ("milk", "white"), ("a tomato", "red"), ("the sun", "yellow"),
    ("a frog", "green"), ("a pumpkin", "orange"), ("an elephant", "grey"), ("a flamingo", "pink"),
    ("the sea", "blue"), ("a crow", "black"), ("a cherry", "red"), ("a polar bear", "white"),
    ("a lime", "green"), ("a plum", "purple"), ("a pig", "pink"), ("a lemon peel", "yellow"),
)  # fmt: skip
_COUNT_FACTS = (
    ("How many legs does a dog have?", "A dog has four legs.", "four"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight"),
    ("How many legs does a bird have?", "A bird has two legs.", "two"),
    ("How many legs does an insect have?", "An insect has six legs.", "six"),
    ("How many arms does an octopus have?", "An octopus has eight arms.", "eight"),
    ("How many hearts does an octopus have?", "An octopus has three hearts.", "three"),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "two"),
    ("How many wheels does a car have?", "A car has four wheels.", "four"),
    ("How many wheels does a tricycle have?", "A tricycle has three wheels.", "three"),
    ("How many sides does a square have?", "A square has four sides.", "four"),
    ("How many sides does a triangle have?", "A triangle has three sides.", "three"),
    ("How many fingers are on one hand?", "There are five fingers on one hand.", "five"),
    ("How many colours are in a rainbow?", "A rainbow has seven colours.", "seven"),
    ("How many continents are there?", "There are seven continents.", "seven"),
    ("How many planets go around the sun?", "Eight planets go around the sun.", "eight"),
    ("How many strings does a violin have?", "A violin has four strings.", "four"),
    ("How many wings does a bird have?", "A bird has two wings.", "two"),
    ("How many legs does a chicken have?", "A chicken has two legs.", "two"),
)
_SPELL_WORDS = ("cat", "moon", "apple", "tree", "sun", "house", "fish", "river", "dog", "bread",
                "lamp", "garden", "window", "water", "music", "book")  # fmt: skip
_TIME_FACTS = (
    ("How many minutes are in an hour?", "There are sixty minutes in an hour.", "sixty"),
    ("How many seconds are in a minute?", "There are sixty seconds in a minute.", "sixty"),
    ("How many days are in a week?", "There are seven days in a week.", "seven"),
    ("How many months are in a year?", "There are twelve months in a year.", "twelve"),
    ("How many seasons are in a year?", "There are four seasons in a year.", "four"),
    ("How many days are in a weekend?", "A weekend has two days.", "two"),
    ("What is the first day of the week?", "Monday is the first day of the week.", "monday"),
    ("When do people usually eat breakfast?", "People usually eat breakfast in the morning.",
     "morning"),
    ("When do the stars come out?", "The stars come out at night.", "night"),
)  # fmt: skip
_TIME_CHAT = (
    ("What time is it?", "I do not have a clock, sorry. Maybe check your phone."),
    ("Is it morning or evening?", "I cannot tell, but I hope it is a good one."),
    ("I woke up very early today.", "Early mornings can be nice and quiet."),
    ("Time flies so fast.", "It really does, especially when you are having fun."),
    ("I am always late.", "Maybe try setting an alarm a little earlier."),
)
_WEATHER = {
    "sunny": (("It is so sunny today.", "The sun is shining today."),
              ("That sounds lovely. Maybe go for a walk.", "Great weather for a picnic!")),
    "rainy": (("It is raining again.", "It is very rainy today."),
              ("Do not forget your umbrella.", "Rainy days are good for reading.")),
    "snowy": (("It is snowing outside.", "There is snow everywhere today."),
              ("Wow, you could build a snowman!", "Stay warm out there.")),
    "windy": (("It is very windy today.", "The wind is so strong today."),
              ("Hold on to your hat!", "It is a good day to fly a kite.")),
    "cold": (("It is freezing today.", "It is really cold outside."),
             ("Wear a warm coat and a scarf.", "A hot drink would help.")),
    "hot": (("It is so hot today.", "It is really warm outside."),
            ("Drink lots of water today.", "Try to stay in the shade.")),
    "cloudy": (("It is grey and cloudy today.", "The sky is full of clouds."),
               ("Cloudy days can be calm and cosy.", "Maybe the sun will come out later.")),
    "foggy": (("It is very foggy this morning.", "I can hardly see through the fog."),
              ("Be careful on the roads.", "Fog can look quite magical.")),
}  # fmt: skip
_WEATHER_FOLLOW = (
    ("I will, thanks.", "You are welcome. Enjoy your day!"),
    ("Good idea.", "Glad I could help."),
    ("Do you like this kind of weather?", "I like every kind of weather, it keeps life interesting."),
    ("What is your favourite season?", "I like spring, when the flowers come out."),
    ("I hope it changes soon.", "I hope so too."),
)  # fmt: skip
_HOBBIES = (
    ("paint", "painting"), ("swim", "swimming"), ("read", "reading"), ("cook", "cooking"),
    ("dance", "dancing"), ("sing", "singing"), ("run", "running"), ("draw", "drawing"),
    ("fish", "fishing"), ("hike", "hiking"), ("knit", "knitting"), ("play chess", "playing chess"),
    ("play football", "playing football"), ("play the guitar", "playing the guitar"),
    ("play the piano", "playing the piano"), ("ride my bike", "riding a bike"),
    ("bake bread", "baking bread"), ("take photos", "taking photos"),
    ("grow flowers", "growing flowers"), ("write stories", "writing stories"),
)  # fmt: skip
_HOBBY_FOLLOW = (
    ("For about a year.", "That is great. Keep it up!"),
    ("Since I was a child.", "Wow, you must be very good by now."),
    ("It helps me relax.", "It is good to have something that calms you."),
    ("I like being creative.", "Being creative is so much fun."),
    ("Every weekend.", "That is a lovely way to spend the weekend."),
)
_FOODS = ("pizza", "pasta", "soup", "salad", "rice", "noodles", "pancakes", "apples", "cheese",
          "toast", "eggs", "fish", "curry", "ice cream", "cake", "cookies", "porridge",
          "sandwiches", "tacos", "strawberries", "carrots", "potatoes")  # fmt: skip
_MEALS = ("breakfast", "lunch", "dinner")
_FOOD_FACTS = (
    ("What do cows give us?", "Cows give us milk.", "milk"),
    ("What do hens lay?", "Hens lay eggs.", "eggs"),
    ("What is bread made from?", "Bread is made from flour.", "flour"),
    ("What is cheese made from?", "Cheese is made from milk.", "milk"),
    ("What fruit do monkeys love?", "Monkeys love bananas.", "bananas"),
    ("What is ice made of?", "Ice is frozen water.", "water"),
    ("What do we make chips from?", "We make chips from potatoes.", "potatoes"),
    ("Which fruit is used to make wine?", "Wine is made from grapes.", "grapes"),
)
_FEELINGS = {
    "tired": "Maybe you should take a short rest.",
    "happy": "That is wonderful! What made you happy?",
    "sad": "I am sorry to hear that. Do you want to talk about it?",
    "bored": "How about reading a book or going for a walk?",
    "excited": "That is great! What are you excited about?",
    "hungry": "Maybe it is time for a snack.",
    "nervous": "Take a deep breath. You will do fine.",
    "sleepy": "It might be time for bed.",
    "lonely": "I am here to chat whenever you like.",
    "proud": "You should be! Tell me what you did.",
}
_FEELING_FOLLOW = (
    ("Thanks, that helps.", "You are welcome. I am always happy to listen."),
    ("I think I will.", "Good, take care of yourself."),
    ("It was a long day.", "Long days can be hard. Be kind to yourself."),
    ("I just finished a big project.", "Well done! You deserve a break."),
)
_JOKES = (
    "Why did the bicycle fall over? It was two tired.",
    "What do you call a sleeping bull? A bulldozer.",
    "What has hands but cannot clap? A clock.",
    "Why are fish so smart? They live in schools.",
    "What has keys but cannot open locks? A piano.",
    "Why did the cookie go to the doctor? It felt crummy.",
    "What is orange and sounds like a parrot? A carrot.",
    "What do you call a bear with no teeth? A gummy bear.",
    "Why was the maths book sad? It had too many problems.",
    "What falls but never gets hurt? The rain.",
    "What has a neck but no head? A bottle.",
    "What gets wetter the more it dries? A towel.",
    "Why do cows wear bells? Their horns do not work.",
)
_JOKE_ASKS = ("Tell me a joke.", "Do you know any jokes?", "Can you make me laugh?",
              "Say something funny.", "I need a good joke.")  # fmt: skip
_JOKE_FOLLOW = (
    ("Ha ha, that is funny!", "I am glad you liked it!"),
    ("That is a silly one.", "Silly jokes are the best ones."),
    ("I do not get it.", "That is okay, it is just a silly pun."),
)


def _chat_greetings(rng: np.random.Generator, n: int) -> list[_Ex]:
    name = pick(rng, _NAMES)
    first = pick(rng, (
        (f"Hi, my name is {name}.", f"Nice to meet you, {name}!"),
        (f"Hello! I am {name}.", f"Hello {name}, how can I help you today?"),
        (f"Good morning, I am {name}.", f"Good morning, {name}! Nice to meet you."),
    ))  # fmt: skip
    middle = pick(rng, (
        ("How are you today?", "I am very well, thank you. How are you?"),
        ("How is your day going?", "It is going well, thanks for asking."),
        ("What can you do?", "I can chat with you and talk about pictures."),
        ("Are you doing well?", "Yes, I am doing great, thank you."),
    ))  # fmt: skip
    recall_q = pick(rng, ("What is my name?", "Do you remember my name?", "Can you say my name?"))
    recall = (recall_q, f"Of course, your name is {name}.", [name.lower()])
    if n == 1:
        return [(*first, None)] if rng.random() < 0.5 else [(*middle, None)]
    if n == 2:
        return [(*first, None), recall] if rng.random() < 0.5 else [(*first, None), (*middle, None)]
    return [(*first, None), (*middle, None), recall]


def _arith_question(rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, reply, answer) for one small sum, difference or product."""
    op = pick(rng, ("plus", "plus", "minus", "times"))
    if op == "plus":
        a, b = int(rng.integers(0, 11)), int(rng.integers(0, 11))
        c = a + b
        wa, wb, wc = number_word(a), number_word(b), number_word(c)
        q = pick(
            rng,
            (
                f"What is {wa} plus {wb}?",
                f"Can you add {wa} and {wb}?",
                f"How much is {wa} plus {wb}?",
                f"What do you get if you add {wa} and {wb}?",
            ),
        )
        r = pick(rng, (f"{capitalise(wa)} plus {wb} is {wc}.", f"{capitalise(wa)} plus {wb} equals {wc}.",
                       f"That makes {wc}."))  # fmt: skip
    elif op == "minus":
        a = int(rng.integers(0, 21))
        b = int(rng.integers(0, min(a, 10) + 1))
        c = a - b
        wa, wb, wc = number_word(a), number_word(b), number_word(c)
        if a >= 2 and b >= 1 and rng.random() < 0.3:
            q = f"If I have {wa} apples and eat {wb}, how many are left?"
            noun = "apple" if c == 1 else "apples"
            r = pick(rng, (f"You have {wc} {noun} left.", f"{capitalise(wc)} {noun} left."))
        else:
            q = pick(rng, (f"What is {wa} minus {wb}?", f"What is {wa} take away {wb}?"))
            r = pick(rng, (f"{capitalise(wa)} minus {wb} is {wc}.", f"The answer is {wc}."))
    else:
        a = int(rng.integers(1, 6))
        b = int(rng.integers(1, 20 // a + 1))
        b = min(b, 10)
        c = a * b
        wa, wb, wc = number_word(a), number_word(b), number_word(c)
        q = pick(rng, (f"What is {wa} times {wb}?", f"How much is {wa} times {wb}?"))
        r = pick(rng, (f"{capitalise(wa)} times {wb} is {wc}.", f"The answer is {wc}."))
    return q, r, wc


def _chat_arithmetic(rng: np.random.Generator, n: int) -> list[_Ex]:
    return [(q, r, [c]) for q, r, c in (_arith_question(rng) for _ in range(n))]


def _chat_numbers(rng: np.random.Generator, n: int) -> list[_Ex]:
    out: list[_Ex] = []
    for _ in range(n):
        kind = pick(rng, ("after", "before", "bigger", "smaller"))
        if kind == "after":
            k = int(rng.integers(0, 20))
            w, v = number_word(k), number_word(k + 1)
            out.append((f"What number comes after {w}?",
                        pick(rng, (f"{capitalise(v)} comes after {w}.", f"After {w} comes {v}.")), [v]))  # fmt: skip
        elif kind == "before":
            k = int(rng.integers(1, 21))
            w, v = number_word(k), number_word(k - 1)
            out.append(
                (f"What number comes before {w}?", f"{capitalise(v)} comes before {w}.", [v])
            )
        else:
            a, b = (int(x) for x in rng.choice(21, size=2, replace=False))
            wa, wb = number_word(a), number_word(b)
            if kind == "bigger":
                hi, lo = number_word(max(a, b)), number_word(min(a, b))
                out.append(
                    (
                        f"Which is bigger, {wa} or {wb}?",
                        f"{capitalise(hi)} is bigger than {lo}.",
                        [hi],
                    )
                )
            else:
                hi, lo = number_word(max(a, b)), number_word(min(a, b))
                out.append(
                    (
                        f"Which is smaller, {wa} or {wb}?",
                        f"{capitalise(lo)} is smaller than {hi}.",
                        [lo],
                    )
                )
    return out


def _facts(rng: np.random.Generator, n: int, make: Callable[[], _Ex]) -> list[_Ex]:
    out: list[_Ex] = []
    for _ in range(10 * n):
        ex = make()
        if all(ex[0] != o[0] for o in out):
            out.append(ex)
        if len(out) == n:
            break
    return out


def _chat_capitals(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        country = pick(rng, tuple(_CAPITALS))
        city = _CAPITALS[country]
        q = pick(rng, (f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                       f"Do you know the capital of {country}?"))  # fmt: skip
        a = pick(
            rng, (f"The capital of {country} is {city}.", f"{city} is the capital of {country}.")
        )
        return q, a, [city.lower()]

    return _facts(rng, n, make)


def _chat_animals(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        kind = pick(rng, ("sound", "sound", "baby", "fact"))
        if kind == "sound":
            animal = pick(rng, tuple(_SOUNDS))
            s = _SOUNDS[animal]
            q = pick(rng, (f"What sound does a {animal} make?", f"What does a {animal} say?"))
            return q, pick(rng, (f"A {animal} says {s}.", f"A {animal} goes {s}.")), [s]
        if kind == "baby":
            animal = pick(rng, tuple(_BABIES))
            b = _BABIES[animal]
            q = pick(
                rng, (f"What is a baby {animal} called?", f"What do you call a baby {animal}?")
            )
            return q, f"A baby {animal} is called {with_article(b)}.", [b]
        q, a, ans = pick(rng, _ANIMAL_FACTS)
        return q, a, [ans]

    return _facts(rng, n, make)


def _chat_opposites(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        a, b = pick(rng, _OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        q = pick(rng, (f"What is the opposite of {a}?", f"What is the opposite word for {a}?",
                       f"Can you tell me the opposite of {a}?"))  # fmt: skip
        return q, pick(rng, (f"The opposite of {a} is {b}.", f"It is {b}.")), [b]

    return _facts(rng, n, make)


def _chat_calendar(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        kind = pick(
            rng, ("day_after", "day_before", "month_after", "month_before", "season", "first")
        )
        if kind in ("day_after", "day_before"):
            k = int(rng.integers(7))
            d = _DAYS[k]
            if kind == "day_after":
                v = _DAYS[(k + 1) % 7]
                return f"What day comes after {d}?", f"{v} comes after {d}.", [v.lower()]
            v = _DAYS[(k - 1) % 7]
            return f"What day comes before {d}?", f"The day before {d} is {v}.", [v.lower()]
        if kind in ("month_after", "month_before"):
            k = int(rng.integers(12))
            m = _MONTHS[k]
            if kind == "month_after":
                v = _MONTHS[(k + 1) % 12]
                return f"What month comes after {m}?", f"{v} comes after {m}.", [v.lower()]
            v = _MONTHS[(k - 1) % 12]
            return f"Which month comes before {m}?", f"The month before {m} is {v}.", [v.lower()]
        if kind == "season":
            k = int(rng.integers(4))
            s, v = _SEASONS[k], _SEASONS[(k + 1) % 4]
            return f"What season comes after {s}?", f"{capitalise(v)} comes after {s}.", [v]
        which = pick(rng, ("first", "last"))
        v = _MONTHS[0] if which == "first" else _MONTHS[-1]
        return (f"What is the {which} month of the year?",
                f"{v} is the {which} month of the year.", [v.lower()])  # fmt: skip

    return _facts(rng, n, make)


def _chat_colours(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        thing, colour = pick(rng, _THING_COLOURS)
        q = pick(rng, (f"What colour is {thing}?", f"Which colour is {thing}?"))
        return q, pick(rng, (f"{capitalise(thing)} is {colour}.", f"It is {colour}.")), [colour]

    return _facts(rng, n, make)


def _chat_counting(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        if rng.random() < 0.3:
            w = pick(rng, _SPELL_WORDS)
            k = number_word(len(w))
            return f"How many letters are in the word {w}?", f"The word {w} has {k} letters.", [k]
        q, a, ans = pick(rng, _COUNT_FACTS)
        return q, a, [ans]

    return _facts(rng, n, make)


def _chat_time(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        if rng.random() < 0.35:
            q, a = pick(rng, _TIME_CHAT)
            return q, a, None
        q, a, ans = pick(rng, _TIME_FACTS)
        return q, a, [ans]

    return _facts(rng, n, make)


def _chat_weather(rng: np.random.Generator, n: int) -> list[_Ex]:
    kind = pick(rng, tuple(_WEATHER))
    says, replies = _WEATHER[kind]
    out: list[_Ex] = [(pick(rng, says), pick(rng, replies), None)]
    if rng.random() < 0.3:
        out.insert(0, ("What is the weather like today?",
                       "I cannot look outside. What is it like where you are?", None))  # fmt: skip
    for k in rng.permutation(len(_WEATHER_FOLLOW))[: max(0, n - len(out))]:
        u, a = _WEATHER_FOLLOW[int(k)]
        out.append((u, a, None))
    return out[:n]


def _chat_hobbies(rng: np.random.Generator, n: int) -> list[_Ex]:
    verb, ger = pick(rng, _HOBBIES)
    u = pick(rng, (f"I like to {verb}.", f"My hobby is {ger}.", f"I love {ger}.",
                   f"I spent the weekend {ger}."))  # fmt: skip
    a = pick(rng, (f"{capitalise(ger)} is a wonderful hobby!",
                   f"That sounds like fun. How long have you been {ger}?",
                   f"Nice! What do you enjoy most about {ger}?"))  # fmt: skip
    out: list[_Ex] = [(u, a, None)]
    if rng.random() < 0.3:
        out.insert(0, ("What do you like to do for fun?",
                       "I enjoy chatting and learning new words. And you?", None))  # fmt: skip
    for k in rng.permutation(len(_HOBBY_FOLLOW))[: max(0, n - len(out))]:
        fu, fa = _HOBBY_FOLLOW[int(k)]
        out.append((fu, fa, None))
    return out[:n]


def _chat_food(rng: np.random.Generator, n: int) -> list[_Ex]:
    def make() -> _Ex:
        kind = pick(rng, ("had", "suggest", "like", "fact", "fact", "hungry"))
        food, meal = pick(rng, _FOODS), pick(rng, _MEALS)
        if kind == "had":
            return (f"I had {food} for {meal}.",
                    pick(rng, (f"{capitalise(food)} for {meal} sounds tasty!", "Yum, that sounds good.")),
                    None)  # fmt: skip
        if kind == "suggest":
            return f"What should I eat for {meal}?", f"How about some {food}?", None
        if kind == "like":
            return f"Do you like {food}?", f"I cannot eat, but {food} sounds delicious.", None
        if kind == "hungry":
            return "I am so hungry.", f"Maybe have a snack, like some {food}.", None
        q, a, ans = pick(rng, _FOOD_FACTS)
        return q, a, [ans]

    return _facts(rng, n, make)


def _chat_feelings(rng: np.random.Generator, n: int) -> list[_Ex]:
    feeling = pick(rng, tuple(_FEELINGS))
    u = pick(
        rng, (f"I feel {feeling} today.", f"I am so {feeling}.", f"I am feeling a bit {feeling}.")
    )
    out: list[_Ex] = [(u, _FEELINGS[feeling], None)]
    for k in rng.permutation(len(_FEELING_FOLLOW))[: n - 1]:
        fu, fa = _FEELING_FOLLOW[int(k)]
        out.append((fu, fa, None))
    return out


def _chat_jokes(rng: np.random.Generator, n: int) -> list[_Ex]:
    jokes = [_JOKES[int(k)] for k in rng.permutation(len(_JOKES))]
    out: list[_Ex] = [(pick(rng, _JOKE_ASKS), jokes[0], None)]
    if n >= 2:
        out.append(("Tell me another one.", jokes[1], None))
    if n >= 3:
        fu, fa = pick(rng, _JOKE_FOLLOW)
        out.append((fu, fa, None))
    return out


def _chat_goodbyes(rng: np.random.Generator, n: int) -> list[_Ex]:
    thanks = pick(rng, (
        ("Thank you for your help.", "You are welcome!"),
        ("Thanks for the nice chat.", "It was my pleasure."),
        ("You were very helpful today.", "I am glad I could help."),
    ))  # fmt: skip
    bye = pick(rng, (
        ("I have to go now. Goodbye!", "Goodbye! Have a lovely day."),
        ("See you later!", "See you soon!"),
        ("Good night!", "Good night, sleep well!"),
        ("I need to leave now, bye.", "Bye! It was nice talking to you."),
        ("Talk to you tomorrow.", "Sure, take care until then!"),
    ))  # fmt: skip
    if n == 1:
        return [(*bye, None)]
    return [(*thanks, None), (*bye, None)]


_CHAT: dict[str, Callable[[np.random.Generator, int], list[_Ex]]] = {
    "greetings": _chat_greetings,
    "arithmetic": _chat_arithmetic,
    "numbers": _chat_numbers,
    "capitals": _chat_capitals,
    "animals": _chat_animals,
    "opposites": _chat_opposites,
    "calendar": _chat_calendar,
    "colours_of_things": _chat_colours,
    "counting_facts": _chat_counting,
    "time": _chat_time,
    "weather": _chat_weather,
    "hobbies": _chat_hobbies,
    "food": _chat_food,
    "feelings": _chat_feelings,
    "jokes": _chat_jokes,
    "goodbyes": _chat_goodbyes,
}
CHAT_TOPICS: tuple[str, ...] = tuple(_CHAT)


def chitchat_dialogue(
    rng: np.random.Generator, dialogue_id: str, topic: str | None = None
) -> Dialogue:
    """An image-unrelated dialogue of 1-3 exchanges on one topic (random unless given)."""
    if topic is None:
        topic = pick(rng, CHAT_TOPICS)
    if topic not in _CHAT:
        raise ValueError(f"chitchat_dialogue: unknown topic {topic!r}; choose from {CHAT_TOPICS}")
    n = int(rng.integers(1, 4))
    exchanges = _CHAT[topic](rng, n)
    turns: list[Turn] = []
    qa: list[dict[str, Any]] = []
    for k, (u, a, answers) in enumerate(exchanges):
        if k > 0 and answers is not None and rng.random() < 0.3 and u[:1] in "WH":
            u = "And " + u[0].lower() + u[1:]
        turns += [Turn("user", u), Turn("assistant", a)]
        if answers is not None:
            qa.append({"question": u, "answers": list(answers), "topic": topic, "asker": "user"})
    return Dialogue(dialogue_id, "CHAT", turns, None, topic, qa)
