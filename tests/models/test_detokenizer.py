"""IncrementalDetokenizer: streamed chunks never hold a broken character and add up to decode()."""

import pytest

from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import Tokenizer
from tests.helpers.tiny_tokenizer import train_tiny_tokenizer

# 🦀, 語 and 🇯🇵 are rare in the training corpus, so each spans several byte-level tokens.
TEXT = "Hi 😀 there! The crab 🦀 says 你好，世界 and 語 then 🇯🇵 ok."
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("llama3")
    train_tiny_tokenizer(folder, style="llama3")
    return Tokenizer.from_dir(folder)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def _prompt(tok: Tokenizer) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_id_by_id_decode_would_break_characters(tok):
    # Proves the stream below exercises the hold-back: per-token decoding produces U+FFFD.
    ids = tok.encode(TEXT, add_special_tokens=False)
    per_token = [tok.decode([i]) for i in ids]
    assert sum(REPLACEMENT in piece for piece in per_token) >= 10
    assert tok.encode(" 🦀", add_special_tokens=False) == [296, 99, 222]
    assert [tok.decode([i]) for i in (296, 99, 222)] == [" " + REPLACEMENT, REPLACEMENT, REPLACEMENT]


def test_stream_has_no_broken_characters_and_matches_decode(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    chunks = _stream(IncrementalDetokenizer(tok, _prompt(tok)), ids)
    assert not any(REPLACEMENT in chunk for chunk in chunks)
    assert "".join(chunks) == tok.decode(ids) == TEXT
    # The crab arrives whole, in one chunk, after two empty held-back steps.
    crab_start = ids.index(296)
    assert chunks[crab_start:crab_start + 3] == ["", "", " 🦀"]
    assert chunks[-1] == ""  # nothing left for flush


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("Done 😀", add_special_tokens=False) + [tok.token_to_id("<|eot_id|>")]
    skipped = _stream(IncrementalDetokenizer(tok, _prompt(tok)), ids)
    kept = _stream(IncrementalDetokenizer(tok, _prompt(tok), skip_special_tokens=False), ids)
    assert "".join(skipped) == "Done 😀"
    assert "".join(kept) == "Done 😀<|eot_id|>" == tok.decode(ids, skip_special_tokens=False)


def test_flush_returns_incomplete_character_at_the_end(tok):
    detok = IncrementalDetokenizer(tok, _prompt(tok))
    assert [detok.add(i) for i in (296, 99)] == ["", ""]
    assert detok.flush() == " " + REPLACEMENT == tok.decode([296, 99])


def test_each_step_decodes_a_short_window(tok, monkeypatch):
    window_lengths = []
    real_decode = tok.decode

    def counting_decode(ids, skip_special_tokens=True):
        window_lengths.append(len(ids))
        return real_decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    ids = tok.encode(TEXT * 20, add_special_tokens=False)
    chunks = _stream(IncrementalDetokenizer(tok, _prompt(tok)), ids)
    assert len(ids) > 500
    assert "".join(chunks) == TEXT * 20
    # The first window is the prompt context (5) plus one token; later ones hold the last
    # emitted tokens plus the bytes of one character. None grows with the sequence.
    assert max(window_lengths) <= 8
