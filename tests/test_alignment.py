"""Moshi's text-stream alignment rules, as examples and as properties."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moshivis_lab.config import TEXT_EPAD_ID as EPAD
from moshivis_lab.config import TEXT_PAD_ID as PAD
from moshivis_lab.world.alignment import TimedTokens, align_text_stream


def test_words_start_at_their_frame_with_epad_before() -> None:
    words = [TimedTokens((10, 11), 0.40, 0.7), TimedTokens((12,), 1.0, 1.2)]
    s = align_text_stream(words, 20)
    # 0.40 s * 12.5 = frame 5; 1.0 s = frame 12.5 -> frame 12
    assert s.tolist() == [PAD] * 4 + [EPAD, 10, 11] + [PAD] * 4 + [EPAD, 12] + [PAD] * 7


def test_long_words_push_the_next_word_later_without_dropping() -> None:
    words = [TimedTokens((10, 11, 12, 13), 0.0, 0.2), TimedTokens((20,), 0.1, 0.3)]
    s = align_text_stream(words, 8)
    assert s.tolist()[:5] == [10, 11, 12, 13, 20]


def test_tokens_past_the_end_are_cut() -> None:
    s = align_text_stream([TimedTokens((10, 11, 12), 0.0, 1.0)], 2)
    assert s.tolist() == [10, 11]


word_lists = st.lists(
    st.tuples(
        st.lists(st.integers(10, 99), min_size=1, max_size=3),
        st.floats(0, 10),
        st.floats(0.05, 1.0),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(word_lists, st.integers(1, 200))
def test_every_word_is_placed_in_order_at_or_after_its_start(raw, n_frames) -> None:
    words = [TimedTokens(tuple(t), s, s + d) for t, s, d in raw]
    out = align_text_stream(words, n_frames)
    assert out.shape == (n_frames,)
    placed = [int(x) for x in out if x not in (PAD, EPAD)]
    expected: list[int] = []
    frame = 0
    for w in sorted(words, key=lambda w: w.start):
        start = max(int(np.floor(w.start * 12.5)), frame)
        if start >= n_frames:
            break
        expected += list(w.tokens)[: n_frames - start]
        # the word's first token sits at `start`, and EPAD precedes it when that frame was free
        assert out[start] == w.tokens[0]
        if start > 0 and start > frame:
            assert out[start - 1] == EPAD
        frame = start + len(w.tokens)
    assert placed == expected
