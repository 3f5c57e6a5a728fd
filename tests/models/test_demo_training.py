"""Pieces of the demo model's training pipeline that run without the corpus: the R data
reader, the corpus cleaning and splitting, the chat examples, the HF export."""

import gzip
import random
import struct
import zlib

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from models.demo_training import corpus
from models.demo_training.export import to_hf_tensors
from models.demo_training.rdata import read_lazyload_db
from models.loader import load_model


# --- R lazy-load database -----------------------------------------------------------------

def _int(v):
    return struct.pack(">i", v)


def _chars(text):
    raw = text.encode()
    return _int(0x00040009) + _int(len(raw)) + raw


def _serialized(body: bytes) -> bytes:
    return b"X\n" + _int(3) + _int(0x40201) + _int(0x30500) + _int(5) + b"UTF-8" + body


def _strsxp(lines):
    return _int(16) + _int(len(lines)) + b"".join(_chars(s) for s in lines)


def _named_list(items: dict, values: list[bytes], first_symbol: bool) -> bytes:
    names = _int(1) + _chars("names") if first_symbol else _int((1 << 8) | 255)  # SYMSXP, or REFSXP to it
    attributes = _int(0x402) + names + _strsxp(list(items)) + _int(254)
    return _int(0x213) + _int(len(values)) + b"".join(values) + attributes


def test_read_lazyload_db(tmp_path):
    objects = {"emma": ["EMMA", "", "By Jane Austen", "Emma Woodhouse, handsome"], "persuasion": ["Persuasion", "é"]}
    blob, offsets = b"", {}
    for name, lines in objects.items():
        payload = _serialized(_strsxp(lines))
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = (len(blob), len(record))
        blob += record
    variables = _named_list(offsets, [_int(13) + _int(2) + _int(o) + _int(n) for o, n in offsets.values()], True)
    references = _named_list({}, [], False)
    compressed = _int(10) + _int(1) + _int(1)  # LGLSXP TRUE
    index = _int(0x213) + _int(3) + variables + references + compressed
    index += _int(0x402) + _int((1 << 8) | 255) + _strsxp(["variables", "references", "compressed"]) + _int(254)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index)))
    assert read_lazyload_db(tmp_path / "Rdata.rdx") == objects


# --- corpus cleaning, split, chat examples ----------------------------------------------

NOVEL = """\
PRIDE AND PREJUDICE

By Jane Austen



Chapter 1


It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"

"_You_ want to tell me, and I have no objection to hearing it."

                        [To Mrs. Weston.]

      *       *       *       *       *

Chapter 2


Mr. Bennet was among the earliest of those who waited on Mr. Bingley.

FINIS
""".splitlines()


def test_chapters_drop_headings_notes_and_italics():
    assert corpus.chapters(NOVEL) == [
        [
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.",
            '"My dear Mr. Bennet," said his lady to him one day, '
            '"have you heard that Netherfield Park is let at last?"',
            '"You want to tell me, and I have no objection to hearing it."',
        ],
        ["Mr. Bennet was among the earliest of those who waited on Mr. Bingley."],
    ]


def test_split_holds_out_the_end_of_the_novel():
    novel = [[f"c{c} p{p} " + "word " * 9 for p in range(10)] for c in range(4)]  # 40 paragraphs of 11 words
    train, held = corpus.split_novel(novel)
    assert held == [novel[3][8], novel[3][9]]  # 5% of 440 words = 22: two paragraphs
    assert train == novel[:3] + [novel[3][:8]]


def test_speech_keeps_the_quoted_words():
    speech = corpus._speech('"My dear Mr. Bennet," said his lady, "have you heard?"')
    assert speech == "My dear Mr. Bennet, have you heard?"
    assert corpus._speech("Mr. Bennet replied that he had not.") is None
    assert corpus._speech('"It is the first of three paragraphs of one speech') is None


def test_chat_examples_are_deterministic_and_well_formed():
    speech = ['"Do you not want to know who has taken it?" cried his wife.',
              '"You want to tell me, and I have no objection."']
    prose = [f"Sentence {i} about Elizabeth and her sister, who walked to the town. " * 3 for i in range(12)]
    chapters = [speech * 3 + prose]
    first = corpus.chat_examples(chapters, random.Random(0))
    assert first == corpus.chat_examples(chapters, random.Random(0))
    assert first != corpus.chat_examples(chapters, random.Random(1))
    for messages in first:
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    dialogue = [m[-2:] for m in first if m[-2]["content"].startswith("Do you not want")]
    assert dialogue and dialogue[0][1]["content"] == "You want to tell me, and I have no objection."


# --- export ------------------------------------------------------------------------------

def test_export_writes_back_the_tensors_the_loader_read(checkpoint):
    # Every parameter layout of the weight map (split heads, biases, q/k norms, tied embeddings).
    for arch in ("llama", "qwen2", "qwen3"):
        folder = checkpoint(arch)
        model = load_model(folder)
        written = to_hf_tensors(model.cfg, model.state)
        original = load_file(str(folder / "model.safetensors"))
        expected = {k: v for k, v in original.items() if not (model.cfg.tie_word_embeddings and k == "lm_head.weight")}
        assert sorted(written) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(written[name], value, err_msg=name)
        assert len(written) == len(list(nnx.to_flat_state(model.state)))
