"""PII scrubbing: e-mail addresses, phone numbers, card numbers (Luhn) and IBANs (mod 97).

Each kind is a regular expression plus, for cards and IBANs, its checksum, so a random
16-digit number or a reference code is left alone. Matches are replaced by
`[REDACTED_<KIND>]` (action "redact") or refuse the request (action "block").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from serving.guardrails.base import CallContext, Guardrail, Verdict

KINDS = ("email", "card", "iban", "phone")

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# 4-4-4-x with one consistent separator, Amex's 4-6-5, or 13-19 digits in a row.
_CARD = re.compile(r"(?<![\d-])(?:\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5}|\d{13,19})(?![\d])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
# Not part of a longer run of digit groups (a card or account number is not a phone number).
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}"
    r"(?![ .-]?\d)(?!\w)"
    r"|(?<![\w+])\+\d{8,15}(?![\w])")


@dataclass(frozen=True, slots=True)
class PIIMatch:
    kind: str
    start: int
    end: int


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    iban = candidate.replace(" ", "").upper()
    if not (15 <= len(iban) <= 34 and iban[:2].isalpha() and iban[2:4].isdigit() and iban.isalnum()):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban_spans(text: str) -> Iterable[tuple[int, int]]:
    """Each candidate's longest prefix that passes mod 97 (the pattern may run into a following word)."""
    for m in _IBAN.finditer(text):
        for end in range(m.end(), m.start() + 14, -1):
            if text[end - 1] != " " and iban_valid(text[m.start():end]):
                yield m.start(), end
                break


def find_pii(text: str, kinds: Iterable[str] = KINDS) -> list[PIIMatch]:
    """Non-overlapping matches, earliest first; where two overlap, the earlier kind in KINDS wins."""
    kinds = [k for k in KINDS if k in set(kinds)]
    found: list[PIIMatch] = []
    for kind in kinds:
        if kind == "email":
            spans = ((m.start(), m.end()) for m in _EMAIL.finditer(text))
        elif kind == "card":
            spans = ((m.start(), m.end()) for m in _CARD.finditer(text) if luhn_valid(m.group()))
        elif kind == "iban":
            spans = _iban_spans(text)
        else:
            spans = ((m.start(), m.end()) for m in _PHONE.finditer(text)
                     if 7 <= sum(c.isdigit() for c in m.group()) <= 15)
        for start, end in spans:
            if not any(start < f.end and f.start < end for f in found):
                found.append(PIIMatch(kind, start, end))
    return sorted(found, key=lambda f: f.start)


def redact_pii(text: str, matches: list[PIIMatch]) -> str:
    out, last = [], 0
    for m in matches:
        out += [text[last:m.start], f"[REDACTED_{m.kind.upper()}]"]
        last = m.end
    return "".join(out) + text[last:]


class PIIScrubber(Guardrail):
    """Finds PII in prompts and completions; redacts it by default (`action="block"` refuses).

    While streaming, a match that ends within `settle` characters of the window's end might
    still grow (a card number cut after 12 digits), so it is left for the next window.
    """

    name = "pii"
    stream_overlap = 96  # longer than any card, phone or IBAN, and most e-mail addresses
    settle = 4

    def __init__(self, *, kinds: Iterable[str] = KINDS, action: str = "redact", name: str | None = None):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        if action not in ("redact", "block", "flag"):
            raise ValueError(f"PII action {action!r} must be redact, block or flag")
        self.kinds, self.action = tuple(kinds), action
        self.name = name or self.name

    def check(self, text: str, *, final: bool = True) -> Verdict:
        matches = find_pii(text, self.kinds)
        if not final:
            matches = [m for m in matches if m.end <= len(text) - self.settle]
        if not matches:
            return Verdict()
        found = tuple(sorted({m.kind for m in matches}))
        reason = f"contains personal data ({', '.join(found)})"
        if self.action == "block":
            return Verdict.block(reason, findings=found)
        if self.action == "flag":
            return Verdict.flag(reason, findings=found)
        return Verdict.redact(redact_pii(text, matches), reason, findings=found)

    def pre_call(self, text: str, ctx: CallContext) -> Verdict:
        return self.check(text)

    def post_call(self, text: str, ctx: CallContext) -> Verdict:
        return self.check(text)

    def stream_chunk(self, window: str, ctx: CallContext, final: bool) -> Verdict:
        return self.check(window, final=final)
