"""Guardrails: policy checks on every prompt and completion, per tenant.

The interface
-------------
A guardrail is a subclass of `Guardrail` overriding any of three methods, each returning a
`Verdict` (`Verdict.allow()`, `.flag(reason)`, `.redact(new_text, reason)`, `.block(reason)`):

    class Guardrail:
        name: str                      # reported in x-tessera-guardrails, and in error codes
        stream_overlap: int = 0        # characters of a stream's tail to see again with the next chunk
        checks_stream: bool = True     # False: check a stream once, complete, at its end
        blocking_io: bool = False      # True: the server runs it in a worker thread
        def pre_call(self, text, ctx) -> Verdict: ...            # a prompt, or one chat message's text
        def post_call(self, text, ctx) -> Verdict: ...           # a whole completion
        def stream_chunk(self, window, ctx, final) -> Verdict: ...  # default: post_call(window)

`ctx` is a `CallContext` (tenant, request_id, model, endpoint, role). A guardrail that
raises is treated as unavailable: the request fails closed with a 503 naming it.

Blocked requests raise `GuardrailBlocked` (`.code` such as `guardrail_jailbreak`, `.status`
400, `.error_body()` in OpenAI's shape); `GuardrailUnavailable` is its 503 form. Which
guardrails ran, and what they did, is in a `GuardrailReport` (`.headers()` gives
`x-tessera-guardrails: pii,jailbreak` and `x-tessera-guardrail-actions: pii=redact`).

Built-ins: `PIIScrubber` ("pii": e-mail, phone, card numbers with Luhn, IBANs with mod 97),
`JailbreakHeuristic` ("jailbreak"), `ClassifierGuardrail` ("classifier": any callable or
an HTTP endpoint returning labels and scores). Policies (`GuardrailPolicy`, one list per
tenant, from a dict or a JSON/TOML file) name them, or plugins registered with
`register_guardrail(kind, factory)`, or any `module:ClassName`.

Plugging in Llama Guard (served by Tessera or vLLM; it answers "safe" or "unsafe\\nS1,S10"):

    import httpx
    from serving.guardrails import Guardrail, Verdict

    class LlamaGuard(Guardrail):
        name = "llama_guard"
        blocking_io = True
        checks_stream = False

        def __init__(self, url="http://llama-guard:8000/v1/chat/completions", model="llama-guard-3-1b"):
            self.url, self.model, self.http = url, model, httpx.Client(timeout=10)

        def _judge(self, messages):
            body = {"model": self.model, "messages": messages, "max_tokens": 20, "temperature": 0}
            answer = self.http.post(self.url, json=body).json()["choices"][0]["message"]["content"].strip()
            if answer.startswith("unsafe"):
                categories = tuple(answer.split("\\n", 1)[1].split(",")) if "\\n" in answer else ()
                return Verdict.block(f"unsafe ({', '.join(categories)})", findings=categories)
            return Verdict.allow()

        def pre_call(self, text, ctx):
            return self._judge([{"role": "user", "content": text}])

        def post_call(self, text, ctx):
            return self._judge([{"role": "user", "content": "(earlier turn)"}, {"role": "assistant", "content": text}])

and in the policy: `{"name": "llama_guard", "kind": "mypackage.guards:LlamaGuard"}`.

NeMo Guardrails: run only its input (or output) rails and read what they did:

    from nemoguardrails import LLMRails, RailsConfig

    class NemoInputRails(Guardrail):
        name = "nemo"
        blocking_io = True

        def __init__(self, config_path="./rails"):
            self.rails = LLMRails(RailsConfig.from_path(config_path))

        def pre_call(self, text, ctx):
            res = self.rails.generate(messages=[{"role": "user", "content": text}],
                                      options={"rails": ["input"], "log": {"activated_rails": True}})
            stopped = [rail.name for rail in res.log.activated_rails if rail.stop]
            if stopped:
                return Verdict.block(f"stopped by {', '.join(stopped)}")
            checked = res.response[0]["content"]
            return Verdict.redact(checked, "altered by input rails") if checked != text else Verdict.allow()

(`post_call` is the same with `options={"rails": ["output"], ...}` and the completion as the
assistant message.)
"""

from serving.guardrails.base import (
    Action, CallContext, Guardrail, GuardrailBlocked, GuardrailUnavailable, Verdict,
)
from serving.guardrails.classifier import ClassifierError, ClassifierGuardrail, http_classifier, normalize_scores
from serving.guardrails.jailbreak import JailbreakHeuristic, jailbreak_score
from serving.guardrails.pii import PIIScrubber, find_pii, iban_valid, luhn_valid
from serving.guardrails.pipeline import (
    ACTIONS_HEADER, HEADER, GuardrailPipeline, GuardrailReport, Guardrails, StreamGuard,
)
from serving.guardrails.policy import GuardrailPolicy, GuardrailSpec, TenantPolicy, build_guardrail, register_guardrail

__all__ = [
    "ACTIONS_HEADER", "HEADER", "Action", "CallContext", "ClassifierError", "ClassifierGuardrail", "Guardrail",
    "GuardrailBlocked", "GuardrailPipeline", "GuardrailPolicy", "GuardrailReport", "GuardrailSpec",
    "GuardrailUnavailable", "Guardrails", "JailbreakHeuristic", "PIIScrubber", "StreamGuard", "TenantPolicy",
    "Verdict", "build_guardrail", "find_pii", "http_classifier", "iban_valid", "jailbreak_score", "luhn_valid",
    "normalize_scores", "register_guardrail",
]
