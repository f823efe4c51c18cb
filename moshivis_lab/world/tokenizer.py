"""The text tokenizer: SentencePiece trained on the world's corpus, or Moshi's own 32k model.

Moshi repurposes two SentencePiece ids: 0 (``<unk>`` in the model file) is EPAD, the "end of
padding" marker placed on the frame before a new word, and 3 (``<pad>``) is PAD. The tiny model
is trained with exactly that id layout (unk 0, bos 1, eos 2, pad 3) so token grids mean the same
thing at both scales. The zero token (-1) lives only in token grids, never in the tokenizer.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from moshivis_lab.artefacts import atomic_path
from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID


class TextTokenizer:
    """A SentencePiece processor with Moshi's special ids checked and named."""

    epad_id = TEXT_EPAD_ID
    pad_id = TEXT_PAD_ID

    def __init__(self, sp: spm.SentencePieceProcessor, source: str = "<memory>") -> None:
        self.sp = sp
        self.source = source
        if sp.get_piece_size() <= max(self.epad_id, self.pad_id):
            raise ValueError(f"{source}: a vocabulary of {sp.get_piece_size()} pieces is too small")
        if not (sp.is_unknown(self.epad_id) or sp.is_control(self.epad_id)):
            raise ValueError(
                f"{source}: id {self.epad_id} must be a special piece (Moshi uses it as EPAD), "
                f"but it is the ordinary piece {sp.id_to_piece(self.epad_id)!r}; "
                "train with unk_id=0, bos_id=1, eos_id=2, pad_id=3"
            )
        if not (sp.is_control(self.pad_id) or sp.is_unknown(self.pad_id)):
            raise ValueError(
                f"{source}: id {self.pad_id} must be a special piece (Moshi uses it as PAD), "
                f"but it is the ordinary piece {sp.id_to_piece(self.pad_id)!r}"
            )

    @property
    def vocab_size(self) -> int:
        """Number of pieces (the LM's text cardinality)."""
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS). Empty or whitespace-only text gives [].

        Text that is not valid Unicode (a lone surrogate) is refused with its position
        (``check_unicode``). Characters the vocabulary cannot spell (no piece, no byte fallback) are refused: their
        ``<unk>`` id is Moshi's EPAD (0), so encoding them would silently put end-of-padding
        tokens in the text stream. The tiny tokenizer has byte fallback and spells anything.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text)
        text = " ".join(text.split())
        ids = list(self.sp.encode(text)) if text else []
        if self.epad_id in ids and self.sp.is_unknown(self.epad_id):
            unknown = sorted(
                {ch for ch in text if not ch.isspace() and self.epad_id in self.sp.encode(ch)}
            )
            raise ValueError(
                f"{self.source}: the tokenizer has no piece for {len(unknown)} character(s) "
                f"{unknown[:20]} (they would encode as <unk>, which Moshi reads as EPAD); "
                "remove or transliterate them, or use a tokenizer trained with byte_fallback"
            )
        return ids

    def encode_word(self, word: str) -> list[int]:
        """Token ids of a single word as it appears mid-sentence (leading word boundary)."""
        return self.encode(word.strip())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; special ids (EPAD, PAD) and negative ids are skipped."""
        keep = [int(i) for i in ids if int(i) >= 0 and int(i) not in (self.epad_id, self.pad_id)]
        keep = [i for i in keep if i < self.vocab_size]
        return self.sp.decode(keep)

    def piece(self, i: int) -> str:
        """A readable name for one id, with Moshi's names for the special ones."""
        if i == -1:
            return "<zero>"
        if i == self.epad_id:
            return "<EPAD>"
        if i == self.pad_id:
            return "<PAD>"
        if 0 <= i < self.vocab_size:
            return self.sp.id_to_piece(int(i))
        return f"<{i}>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load a SentencePiece model file (the tiny one, or Moshi's ``tokenizer_spm_32k_3.model``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no tokenizer here; build the tiny one with `moshivis-lab data` or "
                "point to Moshi's tokenizer_spm_32k_3.model"
            )
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e})") from e
        return cls(sp, str(path))


def check_unicode(text: str, what: str = "text") -> str:
    """``text`` itself, or a ValueError naming the first lone surrogate and its position: such a
    string is not Unicode text and cannot be written as UTF-8 (for SentencePiece or espeak-ng)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone surrogate {text[e.start]!r} at position {e.start} (not valid "
            "Unicode: a half emoji pair, or bytes decoded with errors='surrogateescape'); remove "
            "it, or replace it: text.encode('utf-8', 'replace').decode('utf-8')"
        ) from None
    return text


def train_tokenizer(
    sentences: Iterable[str],
    path: str | os.PathLike[str],
    vocab_size: int = 1000,
    seed: int = 0,
    character_coverage: float = 1.0,
) -> TextTokenizer:
    """Train a SentencePiece unigram model with Moshi's special-id layout and save it at ``path``."""
    corpus = [" ".join(s.split()) for s in sentences]
    corpus = [s for s in corpus if s]
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=character_coverage,
        unk_id=TEXT_EPAD_ID,
        bos_id=1,
        eos_id=2,
        pad_id=TEXT_PAD_ID,
        hard_vocab_limit=False,
        byte_fallback=True,  # unknown characters become bytes, never <unk> (= EPAD)
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.getvalue())
    return TextTokenizer.load(path)
