"""The classifier hook: any callable, or an HTTP endpoint, that returns labels and scores.

    ClassifierGuardrail(my_model.predict, thresholds={"toxic": 0.8})
    ClassifierGuardrail(http_classifier("http://guard:8080/classify"), name="llama_guard")

A classifier may return `{"toxic": 0.93, "safe": 0.07}`, `[("toxic", 0.93), ...]`,
`[{"label": "toxic", "score": 0.93}, ...]` (Hugging Face pipelines, TEI), or one of those
under a `labels`/`results`/`predictions` key (HTTP bodies). A label outside `safe_labels`
whose score reaches its threshold blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from serving.guardrails.base import CallContext, Guardrail, GuardrailUnavailable, Verdict

Scores = Mapping[str, float] | Iterable[Any]
SAFE_LABELS = ("safe", "benign", "ok", "neutral", "negative", "label_0")


class ClassifierError(Exception):
    """The classifier did not answer, or answered something that is not labels and scores."""


def normalize_scores(result: Any) -> dict[str, float]:
    """Any accepted shape -> {label (lower case): score}."""
    if isinstance(result, Mapping):
        for key in ("labels", "results", "predictions", "scores"):
            if key in result and not isinstance(result[key], (int, float)):
                return normalize_scores(result[key])
        items = result.items()
    else:
        items = []
        for entry in result:
            if isinstance(entry, Mapping) and "label" in entry and "score" in entry:
                items.append((entry["label"], entry["score"]))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append(tuple(entry))
            elif isinstance(entry, (list, tuple)):  # a batch of one: [[{label, score}, ...]]
                return normalize_scores(entry)
            else:
                raise ClassifierError(f"cannot read a label and score from {type(entry).__name__}")
    try:
        return {str(label).lower(): float(score) for label, score in items}
    except (TypeError, ValueError) as e:
        raise ClassifierError(f"scores must be numbers: {e}") from None


def http_classifier(url: str, *, timeout_s: float = 5.0, headers: Mapping[str, str] | None = None,
                    input_field: str = "input", client=None) -> Callable[[str], dict[str, float]]:
    """A callable that POSTs `{input_field: text}` as JSON to `url` and reads labels and scores."""
    import httpx

    http = client or httpx.Client(timeout=timeout_s, headers=dict(headers or {}))

    def classify(text: str) -> dict[str, float]:
        try:
            response = http.post(url, json={input_field: text})
        except httpx.HTTPError as e:
            raise ClassifierError(f"{url} did not answer ({type(e).__name__})") from None
        if response.status_code >= 300:
            raise ClassifierError(f"{url} answered HTTP {response.status_code}")
        try:
            return normalize_scores(response.json())
        except ValueError as e:
            raise ClassifierError(f"{url} answered something that is not labels and scores: {e}") from None

    classify.url = url  # type: ignore[attr-defined]
    return classify


class ClassifierGuardrail(Guardrail):
    """Blocks when a flagged label's score reaches its threshold.

    `thresholds` per label (others use `threshold`); `labels`, when given, are the only ones
    that can block. `on_error="block"` fails closed with a 503 (`GuardrailUnavailable`);
    `"allow"` lets the text through and reports a flag. `stages` picks input, output or both.
    While streaming it runs once on the complete text (`checks_stream = False`).
    """

    name = "classifier"
    checks_stream = False

    def __init__(self, classify: Callable[[str], Any], *, name: str | None = None, threshold: float = 0.5,
                 thresholds: Mapping[str, float] | None = None, labels: Iterable[str] | None = None,
                 safe_labels: Iterable[str] = SAFE_LABELS, on_error: str = "block",
                 stages: Iterable[str] = ("input", "output"), blocking_io: bool | None = None):
        if on_error not in ("block", "allow"):
            raise ValueError(f"on_error={on_error!r} must be block or allow")
        self.classify, self.threshold = classify, threshold
        self.thresholds = {k.lower(): v for k, v in (thresholds or {}).items()}
        self.labels = {x.lower() for x in labels} if labels is not None else None
        self.safe_labels = {x.lower() for x in safe_labels}
        self.on_error, self.stages = on_error, frozenset(stages)
        self.name = name or self.name
        self.blocking_io = hasattr(classify, "url") if blocking_io is None else blocking_io

    def _judge(self, text: str, stage: str) -> Verdict:
        if stage not in self.stages:
            return Verdict()
        try:
            scores = normalize_scores(self.classify(text))
        except Exception as e:  # noqa: BLE001 - a plugin's failure is the classifier's, reported as such
            reason = str(e) if isinstance(e, ClassifierError) else f"classifier failed ({type(e).__name__})"
            if self.on_error == "block":
                raise GuardrailUnavailable(self.name, reason, stage=stage) from None
            return Verdict.flag(reason, findings=("classifier_error",))
        flagged = sorted(((label, score) for label, score in scores.items() if self._blocks(label, score)),
                         key=lambda item: -item[1])
        if flagged:
            shown = ", ".join(f"{label} {score:.2f}" for label, score in flagged)
            return Verdict.block(f"classified as {shown}", labels=scores, findings=tuple(label for label, _ in flagged),
                                 code=f"guardrail_{self.name}")
        return Verdict(labels=scores)

    def _blocks(self, label: str, score: float) -> bool:
        if label in self.safe_labels or (self.labels is not None and label not in self.labels):
            return False
        return score >= self.thresholds.get(label, self.threshold)

    def pre_call(self, text: str, ctx: CallContext) -> Verdict:
        return self._judge(text, "input")

    def post_call(self, text: str, ctx: CallContext) -> Verdict:
        return self._judge(text, "output")
