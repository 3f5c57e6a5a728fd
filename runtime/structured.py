"""Structured output: a grammar per sequence, as a token mask applied inside the sampling step.

llguidance (MIT) compiles JSON schemas, regular expressions, choices and Lark/GBNF grammars
against the tokenizer, and fills a bitmask of the tokens allowed next (bit t % 32 of word
t // 32). The runner passes the masks of the rows with a grammar in `LogitAdjustments`
(runtime/sampling.py), so a grammar request runs like one with penalties: its drawn tokens are
read back before its next step is planned (runtime/engine.py, `_needs_host_tokens`).

Compiling a grammar happens once per distinct spec (a bounded LRU of compiled matchers, each
sequence starts from a `deep_copy`); the llguidance tokenizer is built once per engine, at the
first grammar request (about 0.2 s for a 4k vocabulary, 1-2 s for 128k).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]
MAX_CACHED_GRAMMARS = 256


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """What the output must match. `spec`: a JSON schema (text), a regular expression, a JSON list
    of strings, or a Lark/GBNF grammar; `strict` refuses JSON schema keywords the engine cannot
    enforce (else they are ignored)."""

    kind: GrammarKind
    spec: str = ""
    strict: bool = True

    def __post_init__(self):
        if self.kind not in ("json", "json_object", "regex", "choice", "grammar"):
            raise ValueError(f"guided decoding kind {self.kind!r} is not one of json, json_object, regex, choice, grammar")
        if not isinstance(self.spec, str):
            raise ValueError("guided decoding spec must be a string")


class GrammarError(ValueError):
    """A grammar the engine cannot compile (the message names the problem)."""


class SequenceGrammar:
    """One sample's grammar state: which tokens may come next, advanced by each drawn token."""

    def __init__(self, matcher, eos_ids: tuple[int, ...]):
        self._matcher = matcher
        self._eos_ids = eos_ids

    def fill_mask(self, masks: np.ndarray, row: int) -> None:
        """Write the allowed-token bits into `masks[row]` (int32 words)."""
        if self._matcher.is_error():  # cannot go on: only the end is allowed
            masks[row] = 0
            for t in self._eos_ids:
                masks[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
            return
        view = masks[row]
        self._matcher.unsafe_compute_mask_ptr(view.ctypes.data, view.size * view.itemsize)

    def consume(self, token: int) -> bool:
        """Advance by a drawn token; False if the grammar did not allow it."""
        return self._matcher.consume_token(token)

    @property
    def is_finished(self) -> bool:
        """The grammar admits no further token: the output is complete."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""


class GrammarCompiler:
    """The engine's grammar engine: llguidance's view of the tokenizer and the compiled grammars."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_ids = tuple(sorted(eos_ids))
        self._ll_tokenizer = None
        self._compiled: OrderedDict[GuidedDecoding, object] = OrderedDict()
        self._lock = threading.Lock()  # make_request runs on the caller's thread, add() on the loop's

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def check(self, guided: GuidedDecoding) -> None:
        """Compile (and cache) the grammar; ValueError naming the problem if it cannot be."""
        self._prototype(guided)

    def start(self, guided: GuidedDecoding) -> SequenceGrammar:
        return SequenceGrammar(self._prototype(guided).deep_copy(), self.eos_ids)

    def _prototype(self, guided: GuidedDecoding):
        with self._lock:
            matcher = self._compiled.get(guided)
            if matcher is not None:
                self._compiled.move_to_end(guided)
                return matcher
        matcher = self._compile(guided)
        with self._lock:
            self._compiled[guided] = matcher
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def _tokenizer(self):
        from llguidance import LLTokenizer

        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                 eos_token=list(self.eos_ids) or None)
            return self._ll_tokenizer

    def _compile(self, guided: GuidedDecoding):
        from llguidance import LLMatcher

        grammar = _grammar(guided)
        tokenizer = self._tokenizer()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(f"the {_NAMES[guided.kind]} cannot be compiled: {_first_line(messages[0])}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {_NAMES[guided.kind]} cannot be compiled: {_first_line(matcher.get_error())}")
        return matcher


_NAMES = {"json": "JSON schema", "json_object": "JSON object format", "regex": "regular expression",
          "choice": "choice list", "grammar": "grammar"}


def _grammar(guided: GuidedDecoding) -> str:
    """llguidance's grammar text. JSON is compact (no free whitespace): a model that may always
    add a space could otherwise never finish."""
    from llguidance import LLMatcher, grammar_from

    options = {"whitespace_flexible": False, "lenient": not guided.strict}
    try:
        if guided.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if guided.kind == "json":
            schema = json.loads(guided.spec)
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema must be an object")
            return LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if guided.kind == "regex":
            return LLMatcher.grammar_from_regex(guided.spec)
        if guided.kind == "choice":
            choices = json.loads(guided.spec)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return grammar_from("grammar", guided.spec)
    except ValueError as e:
        raise GrammarError(f"the {_NAMES[guided.kind]} cannot be compiled: {_first_line(str(e))}") from None


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line if len(line) <= 300 else line[:297] + "..."
