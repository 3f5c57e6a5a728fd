"""A jailbreak and prompt-injection heuristic: weighted phrase patterns, combined as independent
evidence (score = 1 - prod(1 - w)), blocking at a threshold.

It catches the common, literal attacks (instruction overrides, DAN and "developer mode"
personas, system-prompt extraction, chat-template tokens smuggled into user text). It is a
cheap first line, not a classifier: put a model (Llama Guard, Prompt Guard) behind the
classifier hook for paraphrased attacks.
"""

from __future__ import annotations

import re

from serving.guardrails.base import CallContext, Guardrail, Verdict

_I = re.IGNORECASE
SIGNALS: tuple[tuple[str, float, re.Pattern], ...] = (
    ("instruction_override", 0.8, re.compile(
        r"\b(ignore|disregard|forget|override|skip)\b[\w\s,]{0,20}?\b(previous|prior|above|earlier|preceding|"
        r"all|any|your|system)\b[\w\s]{0,20}?\b(instructions?|prompts?|rules|directions|guidelines|directives)\b", _I)),
    ("persona_dan", 0.6, re.compile(r"\bDAN\b|\b(?i:do anything now)\b")),
    ("persona_mode", 0.6, re.compile(
        r"\b(developer|god|jailbreak|jailbroken|unrestricted|unfiltered|uncensored)\s+mode\b", _I)),
    ("persona_switch", 0.5, re.compile(
        r"\b(you are now|from now on,? you( are|'re| will)|act as|pretend (to be|you are)|roleplay as)\b[^.\n]{0,60}?"
        r"\b(unfiltered|uncensored|jailbroken|no (rules|restrictions|limits|filters)|without (any )?(rules|"
        r"restrictions|limits|filters))", _I)),
    ("prompt_extraction", 0.7, re.compile(
        r"\b(reveal|print|show|repeat|output|tell me|give me|leak|dump)\b[\w\s]{0,15}?\b(your|the)\s+(system|hidden|"
        r"initial|original|secret)\s+(prompt|instructions?|message)", _I)),
    ("no_rules", 0.6, re.compile(
        r"\b(no|without|free (of|from))\s+(any\s+)?(moral|ethical|safety|content)\s+(rules|restrictions|constraints|"
        r"guidelines|filters|limits)\b", _I)),
    ("filter_bypass", 0.6, re.compile(
        r"\b(bypass|circumvent|disable|turn off|get around|evade)\b[\w\s]{0,15}?\b(safety|content|moderation|"
        r"ethical)?\s*(filters?|guidelines|policies|restrictions|guardrails|safeguards)\b", _I)),
    ("template_injection", 0.5, re.compile(
        r"<\|(im_start|im_end|start_header_id|end_header_id|eot_id|system|begin_of_text)\|>|\[/?INST\]|<</?SYS>>")),
    ("fake_role_header", 0.4, re.compile(r"(^|\n)\s*(#{2,}\s*)?(system|assistant)\s*(prompt|message)?\s*:\s", _I)),
)


def jailbreak_score(text: str) -> tuple[float, tuple[str, ...]]:
    """(score in [0, 1], names of the signals found)."""
    found = tuple(name for name, _, pattern in SIGNALS if pattern.search(text))
    weights = {name: w for name, w, _ in SIGNALS}
    miss = 1.0
    for name in found:
        miss *= 1.0 - weights[name]
    return round(1.0 - miss, 4), found


class JailbreakHeuristic(Guardrail):
    """Blocks input whose score reaches `threshold` (default 0.5: one strong signal, or two weak)."""

    name = "jailbreak"

    def __init__(self, *, threshold: float = 0.5, name: str | None = None, check_output: bool = False):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"jailbreak threshold {threshold} must be in (0, 1]")
        self.threshold, self.check_output = threshold, check_output
        self.name = name or self.name

    def pre_call(self, text: str, ctx: CallContext) -> Verdict:
        score, found = jailbreak_score(text)
        if score >= self.threshold:
            return Verdict.block(f"prompt injection or jailbreak attempt (score {score:.2f}: {', '.join(found)})",
                                 labels={"jailbreak": score}, findings=found)
        if found:
            return Verdict.flag(f"score {score:.2f} below threshold {self.threshold}", labels={"jailbreak": score},
                                findings=found)
        return Verdict()

    def post_call(self, text: str, ctx: CallContext) -> Verdict:
        # Off by default: a model explaining jailbreaks is not one. On, it flags injected
        # instructions in a tool's or model's output before they reach another model.
        return self.pre_call(text, ctx) if self.check_output else Verdict()
