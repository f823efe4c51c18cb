"""Tasks and dialogues of the synthetic world: every stated fact is true of the scene graph,
checkable answers appear in the replies, texts are short plain ASCII, generation is
deterministic and fast."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshivis_lab.config import WorldConfig
from moshivis_lab.world import vocab
from moshivis_lab.world.dialogues import (
    CHAT_TOPICS,
    DIALOGUE_KINDS,
    Dialogue,
    chitchat_dialogue,
    image_dialogue,
    task_dialogue,
)
from moshivis_lab.world.scenes import Scene, sample_scene
from moshivis_lab.world.tasks import TaskItem, caption, make_tasks

CFG = WorldConfig(p_word=0.5)
TEXT_RE = re.compile(r"^[A-Za-z][A-Za-z .,?!']*$")
FACT_TOPICS = {"arithmetic", "numbers", "capitals", "animals", "opposites", "calendar",
               "colours_of_things", "counting_facts"}  # fmt: skip


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, CFG, f"s{i:04d}") for i in range(n)]


SCENES = _scenes(0, 120)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _select(scene: Scene, flt: dict) -> list[int]:
    return [
        i for i, o in enumerate(scene.objects) if all(getattr(o, k) == v for k, v in flt.items())
    ]


def _check_text(text: str) -> None:
    assert TEXT_RE.match(text), text
    assert text.isascii() and not any(ch.isdigit() for ch in text), text
    assert "  " not in text and text == text.strip(), text


# ------------------------------------------------------------------------------------------
# An independent reader of the assistant's claims about a scene (no generator code used).

SINGULAR = {s: s for s in vocab.SHAPES} | {"object": None}
PLURAL = {p: s for s, p in vocab.SHAPE_PLURALS.items()} | {"objects": None}
NUMBERS = {w: i for i, w in enumerate(vocab.NUMBER_WORDS)}
POSITIONS = sorted(
    ((p.split(), name) for name, p in vocab.POSITION_PHRASES.items()), key=lambda x: -len(x[0])
)


def _position_at(words: list[str], k: int) -> tuple[str | None, int]:
    for phrase, name in POSITIONS:
        if words[k : k + len(phrase)] == phrase:
            return name, k + len(phrase)
    return None, k


def _noun_phrase(words: list[str], k: int) -> tuple[dict, str, int] | None:
    """Parse [det] [size] [colour] noun starting at k: (filter, determiner, end) or None."""
    det = words[k] if k < len(words) else ""
    j = k + 1 if det in ("a", "an", "the", "no", "only") or det in NUMBERS else k
    det = det if j > k else ""
    flt: dict = {}
    if j < len(words) and words[j] in vocab.SIZES:
        flt["size"] = words[j]
        j += 1
    if j < len(words) and words[j] in vocab.COLOURS:
        flt["colour"] = words[j]
        j += 1
    if j < len(words) and (words[j] in SINGULAR or words[j] in PLURAL):
        shape = SINGULAR.get(words[j], PLURAL.get(words[j]))
        if shape:
            flt["shape"] = shape
        return flt, det, j + 1
    return None


def check_claims(scene: Scene, text: str, refs: list[int]) -> int:
    """Assert every claim the reader recognises in ``text`` holds; return how many it checked."""
    checked = 0
    for sentence in re.findall(r"[^.!?]+[.!?]?", text.lower()):
        if sentence.endswith("?"):
            continue  # questions claim nothing
        words = re.findall(r"[a-z']+", sentence)
        for k in range(len(words)):
            if k > 0 and words[k - 1] in ("not", "any") or (k > 1 and words[k - 2] == "not"):
                continue  # "not green", "not a star", "do not see any red star": negated
            parsed = _noun_phrase(words, k)
            if words[k] == "nothing":
                pos, _ = _position_at(words, k + 1)
                if pos:
                    assert not _select(scene, {"position": pos}), text
                    checked += 1
                continue
            if parsed is None or (k > 0 and _noun_phrase(words, k - 1) is not None):
                continue
            flt, det, end = parsed
            pos, after = _position_at(words, end)
            if pos:
                flt = {**flt, "position": pos}
            matches = _select(scene, flt)
            if det == "no":
                assert not matches, (text, flt)
            elif det in NUMBERS and words[end - 1] in PLURAL | SINGULAR:
                if "position" not in flt:
                    assert len(matches) == NUMBERS[det], (text, flt, det)
            elif flt:
                assert matches, (text, flt)
                if det == "the":
                    assert len(matches) == 1, ("definite description not unique", text, flt)
            checked += 1
            # "<NP> is <predicate>"
            subject = matches if det == "the" else None
            checked += _predicate(scene, words, after, subject, text)
        for k, w in enumerate(words[:-1]):
            if w == "it" and words[k + 1] == "is" and len(refs) >= 1:
                checked += _predicate(scene, words, k + 1, refs[:1], text)
    return checked


def _predicate(scene: Scene, words: list[str], k: int, subject: list[int] | None, text: str) -> int:
    if subject is None or len(subject) != 1 or k >= len(words) or words[k] != "is":
        return 0
    o = scene.objects[subject[0]]
    j = k + 1
    if j < len(words) and words[j] == "quite":
        j += 1
    if j >= len(words):
        return 0
    w = words[j]
    if w in vocab.COLOURS:
        assert o.colour == w, text
        return 1
    if w in vocab.SIZES:
        assert o.size == w, text
        return 1
    pos, _ = _position_at(words, j)
    if pos:
        assert o.position == pos, text
        return 1
    for rel, phrase in (("above", ["above"]), ("below", ["below"]),
                        ("left", ["to", "the", "left", "of"]), ("right", ["to", "the", "right", "of"])):  # fmt: skip
        if words[j : j + len(phrase)] == phrase:
            other = _noun_phrase(words, j + len(phrase))
            if other is None:  # "it is below it"
                return 0
            assert other[1] == "the", text
            (m,) = _select(scene, other[0])
            p = scene.objects[m]
            ok = {"above": o.cell[0] < p.cell[0], "below": o.cell[0] > p.cell[0],
                  "left": o.cell[1] < p.cell[1], "right": o.cell[1] > p.cell[1]}[rel]  # fmt: skip
            assert ok, text
            return 1
    return 0


def test_claim_reader_catches_false_statements():
    s = SCENES[0]
    o = s.objects[0]
    wrong_colour = next(c for c in vocab.COLOURS if c != o.colour)
    with pytest.raises(AssertionError):
        check_claims(
            s,
            f"There is a {o.size} {wrong_colour} {o.shape} {vocab.POSITION_PHRASES[o.position]}.",
            [],
        )
    with pytest.raises(AssertionError):
        check_claims(s, f"There are {vocab.NUMBER_WORDS[len(s.objects) + 1]} objects.", [])
    with pytest.raises(AssertionError):
        check_claims(s, f"It is {wrong_colour}.", [0])
    assert check_claims(s, f"Actually, it is {o.colour}, not {wrong_colour}.", [0]) == 1
    assert check_claims(s, caption(s), []) >= len(s.objects)


# ------------------------------------------------------------------------------------------
# Task items


def _check_answer(scene: Scene, kind: str, answer: str, refs: list[int], flt: dict) -> None:
    if kind in ("colour", "shape", "size", "position") and not (kind == "shape" and not refs):
        assert len(refs) == 1
        assert answer == getattr(scene.objects[refs[0]], kind)
        if flt:
            assert _select(scene, flt) == refs
    elif kind == "shape":  # "what is at <position>?" with nothing there
        assert answer == "nothing" and not _select(scene, flt)
    elif kind == "count":
        assert refs == _select(scene, flt)
        assert answer == vocab.NUMBER_WORDS[len(refs)]
    elif kind == "yes/no":
        assert answer == ("yes" if _select(scene, flt) else "no")
    elif kind == "word":
        assert answer == scene.word
    elif kind == "caption":
        assert answer == caption(scene)
    else:
        raise AssertionError(f"unknown answer type {kind}")


def test_tasks_are_true_of_the_scene():
    rng = np.random.default_rng(1)
    types: Counter = Counter()
    yes_no: Counter = Counter()
    zero_counts = 0
    for s in SCENES:
        items = make_tasks(s, rng)
        assert {it.task for it in items} >= {"caption", "vqa", "count"}
        assert ("ocr" in {it.task for it in items}) == (s.word is not None)
        for it in items:
            assert it.task in ("caption", "vqa", "ocr", "count")
            _check_text(it.question)
            assert it.question.endswith(("?", "."))
            if it.answer_type != "caption":
                assert re.fullmatch(r"[a-z]+( [a-z]+)?", it.answer), it.answer
            assert all(0 <= r < len(s.objects) for r in it.refs)
            _check_answer(s, it.answer_type, it.answer, it.refs, it.filter)
            types[it.answer_type] += 1
            if it.answer_type == "yes/no":
                yes_no[it.answer] += 1
            zero_counts += it.answer_type == "count" and it.answer == "zero"
            assert TaskItem.from_json(json.loads(json.dumps(it.to_json()))) == it
    assert set(types) == {
        "caption",
        "colour",
        "shape",
        "size",
        "position",
        "count",
        "yes/no",
        "word",
    }
    assert 0.4 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.6, yes_no
    assert zero_counts > 5


def test_caption_names_every_object():
    for s in SCENES[:30]:
        c = caption(s)
        _check_text(c)
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.shape} {vocab.POSITION_PHRASES[o.position]}" in c
        assert vocab.BACKGROUNDS[s.background] in c
        assert (s.word is not None) == (f"the word {s.word}" in c)


def test_task_dialogues_wrap_one_item():
    rng = np.random.default_rng(2)
    for s in SCENES[:40]:
        for it in make_tasks(s, rng):
            d = task_dialogue(s, it, "t")
            assert d.kind == it.task.upper() and d.image_id == s.id and d.topic == "image"
            assert [t.speaker for t in d.turns] == ["user", "assistant"]
            assert d.turns[0].text == it.question
            assert it.answer.lower() in d.turns[1].text.lower()
            _check_text(d.turns[1].text)
            check_claims(s, d.turns[1].text, d.turns[1].refs)
            for q in d.qa:
                assert q["answers"] == [it.answer]


# ------------------------------------------------------------------------------------------
# Image dialogues


def _check_image_dialogue(s: Scene, d: Dialogue) -> int:
    assert d.image_id == s.id and d.topic == "image"
    assert 2 <= len(d.turns) <= 6 and len(d.turns) % 2 == 0
    assert [t.speaker for t in d.turns] == ["user", "assistant"] * (len(d.turns) // 2)
    checked = 0
    for t in d.turns:
        _check_text(t.text)
        assert 1 <= len(t.text.split()) <= 15, t.text
        assert all(0 <= r < len(s.objects) for r in t.refs)
        if t.speaker == "assistant":
            checked += check_claims(s, t.text, t.refs)
    user_texts = [t.text for t in d.turns if t.speaker == "user"]
    for q in d.qa:
        assert q["topic"] == "image"
        ans = q["answers"][0]
        if q["type"] == "relation":
            a, b = (s.objects[i].cell for i in q["refs"])
            truth = {"above": a[0] < b[0], "below": a[0] > b[0],
                     "left of": a[1] < b[1], "right of": a[1] > b[1]}[q["relation"]]  # fmt: skip
            assert ans == ("yes" if truth else "no")
        else:
            _check_answer(s, q["type"], ans, q["refs"], q.get("filter", {}))
        if q["asker"] == "user":
            k = [t.text for t in d.turns].index(q["question"])
            assert q["question"] in user_texts and d.turns[k + 1].speaker == "assistant"
            reply = " ".join(_words(d.turns[k + 1].text))
            assert any(re.search(rf"\b{a}\b", reply) for a in q["answers"]), (q, reply)
            if "false_premise" in q:
                assert q["false_premise"] != ans
                assert d.turns[k + 1].text.startswith("Actually")
        else:
            assert d.kind == "TNS"
            assert q["user_correct"] == (q["user_answer"] == ans)
    return checked


def test_image_dialogues_of_every_kind_are_true():
    rng = np.random.default_rng(3)
    checked = Counter()
    lengths = Counter()
    for s in SCENES:
        for kind in DIALOGUE_KINDS:
            d = image_dialogue(s, kind, rng, f"{s.id}_{kind}")
            assert d.kind == kind
            checked[kind] += _check_image_dialogue(s, d)
            lengths[len(d.turns)] += 1
            if kind == "LEAD":
                assert d.turns[1].text.startswith("Actually"), d.text
                assert d.qa[0].get("false_premise") is not None
            if kind == "TNS":
                assert all(q["asker"] == "assistant" for q in d.qa) and d.qa
            else:
                assert d.qa, d.text
            assert Dialogue.from_json(json.loads(json.dumps(d.to_json()))) == d
    assert set(lengths) == {2, 4, 6}
    for kind in ("PROP", "LOC", "NUM", "LEAD", "COMB"):
        assert checked[kind] > 50, checked  # the reader really looked at the claims


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(DIALOGUE_KINDS))
def test_image_dialogue_property(seed, kind):
    rng = np.random.default_rng(seed)
    s = sample_scene(rng, CFG, "p")
    _check_image_dialogue(s, image_dialogue(s, kind, rng, "p"))


def test_tns_feedback_matches_the_users_answer():
    rng = np.random.default_rng(4)
    right = wrong = 0
    for s in SCENES:
        d = image_dialogue(s, "TNS", rng, "t")
        replies = [t.text for t in d.turns if t.speaker == "assistant"][1:]
        for q, reply in zip(d.qa, replies, strict=True):
            praise = reply.startswith(("Yes", "That is right", "Correct", "Exactly"))
            assert praise == q["user_correct"], (q, reply)
            right += q["user_correct"]
            wrong += not q["user_correct"]
    assert right > 10 and wrong > 10


def test_image_dialogues_deterministic_and_varied():
    a = [
        image_dialogue(s, k, np.random.default_rng(5), "x").to_json()
        for s in SCENES[:20]
        for k in DIALOGUE_KINDS
    ]
    b = [
        image_dialogue(s, k, np.random.default_rng(5), "x").to_json()
        for s in SCENES[:20]
        for k in DIALOGUE_KINDS
    ]
    assert a == b
    rng = np.random.default_rng(6)
    utts = {
        t.text for s in SCENES for k in DIALOGUE_KINDS for t in image_dialogue(s, k, rng, "x").turns
    }
    assert len(utts) > 500


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        image_dialogue(SCENES[0], "NOPE", np.random.default_rng(0), "x")


# ------------------------------------------------------------------------------------------
# Chit-chat


def _chats(seed: int, n: int) -> list[Dialogue]:
    rng = np.random.default_rng(seed)
    return [chitchat_dialogue(rng, f"c{i}") for i in range(n)]


CHATS = _chats(7, 2000)


def test_chitchat_shape_and_text():
    for d in CHATS:
        assert d.kind == "CHAT" and d.image_id is None and d.topic in CHAT_TOPICS
        assert 2 <= len(d.turns) <= 6 and len(d.turns) % 2 == 0
        assert [t.speaker for t in d.turns] == ["user", "assistant"] * (len(d.turns) // 2)
        for t in d.turns:
            _check_text(t.text)
            assert 1 <= len(t.text.split()) <= 15, t.text
            assert t.refs == []


def test_chitchat_variety():
    topics = Counter(d.topic for d in CHATS)
    assert len(CHAT_TOPICS) >= 10 and set(topics) == set(CHAT_TOPICS)
    assert min(topics.values()) > 50
    utterances = {t.text for d in CHATS for t in d.turns}
    assert len(utterances) >= 300, len(utterances)
    assert len(utterances) >= 1000, len(utterances)


def test_chitchat_qa_answers_are_in_the_reply():
    n_qa = 0
    for d in CHATS:
        texts = [t.text for t in d.turns]
        for q in d.qa:
            assert q["topic"] == d.topic and q["asker"] == "user"
            k = texts.index(q["question"])
            assert d.turns[k].speaker == "user" and d.turns[k + 1].speaker == "assistant"
            assert q["answers"] and all(a == a.lower() for a in q["answers"])
            assert any(a in _words(d.turns[k + 1].text) for a in q["answers"]), (q, texts[k + 1])
            n_qa += 1
        if d.topic in FACT_TOPICS:
            assert len(d.qa) == len(d.turns) // 2, d.text
    assert n_qa > 1000


def test_chitchat_arithmetic_is_right():
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
           "take": lambda a, b: a - b}  # fmt: skip
    n = 0
    for d in CHATS:
        for q in d.qa:
            m = re.search(r"(\w+) (plus|minus|times|take away) (\w+)", q["question"])
            m = m or re.search(r"add (\w+) and (\w+)", q["question"])
            if d.topic != "arithmetic" or not m:
                continue
            if len(m.groups()) == 2:
                a, op, b = m.group(1), "plus", m.group(2)
            else:
                a, op, b = m.group(1), m.group(2).split()[0], m.group(3)
            value = ops[op](NUMBERS[a], NUMBERS[b])
            assert q["answers"] == [vocab.NUMBER_WORDS[value]], q
            n += 1
    assert n > 100


def test_chitchat_deterministic_and_topic_choice():
    assert [d.to_json() for d in _chats(9, 50)] == [d.to_json() for d in _chats(9, 50)]
    rng = np.random.default_rng(0)
    for topic in CHAT_TOPICS:
        assert chitchat_dialogue(rng, "x", topic=topic).topic == topic
    with pytest.raises(ValueError):
        chitchat_dialogue(rng, "x", topic="nope")


def test_dialogue_generation_speed():
    rng = np.random.default_rng(10)
    t0 = time.perf_counter()
    for i, s in enumerate(SCENES * 2):
        image_dialogue(s, DIALOGUE_KINDS[i % 6], rng, "x")
        chitchat_dialogue(rng, "y")
    assert time.perf_counter() - t0 < 2.0
