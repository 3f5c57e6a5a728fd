"""Streaming output checks: PII split across SSE chunks is still redacted; the streamed text equals
the redacted whole whatever the chunking; a block ends the stream; end-of-stream classifiers."""

import random

import pytest

from serving.guardrails import (
    Action, ClassifierGuardrail, GuardrailBlocked, GuardrailReport, Guardrails, PIIScrubber, Verdict,
)

COMPLETION = ("Sure. Charge card 4111 1111 1111 1111 and wire the rest to DE89 3704 0044 0532 0130 00; "
              "confirm by mail to billing@example.com or call +1 415 555 0100. Thanks!")
REDACTED = ("Sure. Charge card [REDACTED_CARD] and wire the rest to [REDACTED_IBAN]; "
            "confirm by mail to [REDACTED_EMAIL] or call [REDACTED_PHONE]. Thanks!")


def pipeline(**policy):
    return Guardrails({"default": {"guardrails": ["pii"], **policy}}).for_tenant("acme")


def stream_through(guard, chunks):
    sent = [guard.feed(chunk) for chunk in chunks]
    sent.append(guard.finish())
    return sent


def test_card_split_across_two_chunks_is_redacted():
    guard = pipeline().stream()
    sent = stream_through(guard, ["Your card 4111 1111 ", "1111 1111 is on file."])
    assert "".join(sent) == "Your card [REDACTED_CARD] is on file."
    assert not any("4111" in piece or "1111" in piece for piece in sent)


def test_every_chunking_gives_the_redacted_whole():
    assert PIIScrubber().post_call(COMPLETION, None).text == REDACTED
    rng = random.Random(7)
    for trial in range(200):
        cuts = sorted(rng.sample(range(1, len(COMPLETION)), rng.randint(1, 40)))
        chunks = [COMPLETION[a:b] for a, b in zip([0, *cuts], [*cuts, len(COMPLETION)], strict=True)]
        sent = stream_through(pipeline().stream(), chunks)
        assert "".join(sent) == REDACTED, (trial, chunks)
        for secret in ("4111", "3704", "billing@", "555 0100"):
            assert not any(secret in piece for piece in sent)


def test_chunking_never_changes_what_is_redacted():
    text = ("Order 4111 1111 1111 1112 shipped on 2024-01-15 to jane.q.public.longname@mail.example.com, "
            "reference GB00 WEST 1234 5698 7654 32 (not an IBAN), card 5500-0000-0000-0004, tel 415-555-0100. ") * 3
    whole = PIIScrubber().post_call(text, None).text
    assert whole.count("[REDACTED_") == 9 and "4111 1111 1111 1112" in whole
    rng = random.Random(11)
    for trial in range(150):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 60)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert "".join(stream_through(pipeline().stream(), chunks)) == whole, (trial, chunks)


def test_one_character_at_a_time():
    sent = stream_through(pipeline().stream(), list(COMPLETION))
    assert "".join(sent) == REDACTED


def test_text_is_held_back_only_by_the_overlap():
    guard = pipeline().stream()
    assert guard.overlap == 96
    assert guard.feed("word " * 40) == "word " * 20  # 200 chars: the cut at 104 moves back to a word's start
    assert guard.feed("x" * 100) == "word " * 20  # cut back to where the x-run starts
    assert guard.feed("y" * 10) == ""  # no token starts in reach: hold (at most twice the overlap)
    assert guard.finish() == "x" * 100 + "y" * 10
    small = pipeline(stream_overlap=8).stream()
    assert small.feed("hello world, ") == ""  # no token starts in reach of the cut: hold
    assert small.feed("call 415 555 0100 now") == "hello world, call [RED"
    assert small.feed(" and more text") == "ACTED_PHONE] now and "  # cut before a word, never in a number
    assert small.finish() == "more text"


def test_no_output_guardrails_pass_chunks_straight_through():
    guard = Guardrails({"default": {"guardrails": [{"name": "pii", "output": "off"}]}}).for_tenant("x").stream()
    assert (guard.overlap, guard.feed("card 4111 1111 1111 1111"), guard.finish()) == (0, "card 4111 1111 1111 1111",
                                                                                        "")


def test_block_mid_stream_raises_with_output_stage():
    guard = Guardrails({"default": {"guardrails": [{"name": "pii", "output": "block"}]}}).for_tenant("x").stream()
    assert guard.feed("Hello, here is the number you asked for: ") == ""
    with pytest.raises(GuardrailBlocked) as e:
        guard.feed("4111 1111 1111 1111 and more text after it")
    assert (e.value.stage, e.value.code, e.value.status) == ("output", "guardrail_pii", 400)
    assert str(e.value) == "the response was blocked by guardrail 'pii': contains personal data (card)"


def test_end_of_stream_classifier_sees_the_whole_text():
    seen = []

    def classify(text):
        seen.append(text)
        return {"toxic": 0.99 if "idiot" in text else 0.0}

    from serving.guardrails import register_guardrail

    register_guardrail("toy_toxic", lambda spec: ClassifierGuardrail(classify, name="toy_toxic"))
    pipe = Guardrails({"default": {"guardrails": ["pii", "toy_toxic"]}}).for_tenant("x")
    report = GuardrailReport()
    guard = pipe.stream(report=report)
    assert report.header_value() == "pii,toy_toxic"  # known before the first chunk: the response header
    sent = stream_through(guard, ["You are ", "kind, mail ", "me@example.com"])
    assert "".join(sent) == "You are kind, mail [REDACTED_EMAIL]"
    assert seen == ["You are kind, mail [REDACTED_EMAIL]"]  # once, at the end, already redacted
    guard = pipe.stream()
    guard.feed("You are an idiot")
    with pytest.raises(GuardrailBlocked, match="classified as toxic 0.99") as e:
        guard.finish()
    assert e.value.stage == "output"


def test_custom_stream_check_with_overlap():
    """A plugin that needs the previous chunk's tail: a banned word split across chunks."""
    from serving.guardrails import Guardrail, register_guardrail

    class BannedWord(Guardrail):
        stream_overlap = 16

        def post_call(self, text, ctx):
            if "project-zeus" in text:
                return Verdict.redact(text.replace("project-zeus", "[codename]"), "codename")
            return Verdict.allow()

    register_guardrail("codename", lambda spec: BannedWord())
    pipe = Guardrails({"default": {"guardrails": ["codename"]}}).for_tenant("x")
    report = GuardrailReport()
    sent = stream_through(pipe.stream(report=report), ["We ship project", "-ze", "us on Monday."])
    assert "".join(sent) == "We ship [codename] on Monday."
    assert report.outcomes == {"codename": "redact"}


def test_stream_verdicts_are_redactions_of_the_window():
    verdict = PIIScrubber().stream_chunk("card 4111 1111 1111 1111 then", None, final=False)
    assert (verdict.action, verdict.text) == (Action.REDACT, "card [REDACTED_CARD] then")
    # The number touches the window's end: it may still grow, so it waits for more text.
    assert PIIScrubber().stream_chunk("card 4111 1111 1111 1111", None, final=False).action is Action.ALLOW
    assert PIIScrubber().stream_chunk("card 4111 1111 1111 1111", None, final=True).action is Action.REDACT
