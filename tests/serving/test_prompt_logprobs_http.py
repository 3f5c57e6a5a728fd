"""Prompt logprobs over HTTP with the official openai client: lm-eval's loglikelihood requests
(`echo` + `logprobs` + `max_tokens` 1 or 0, token-id prompts in a batch), vLLM's
`prompt_logprobs` on both endpoints (streamed too), and the refusals."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from tests.helpers.tiny_checkpoint import load_reference
from tests.serving.conftest import MODEL_NAME, assert_error

CONTEXTS = [[17, 230, 45, 9, 301, 77, 12], [400, 3, 3, 88, 150, 61, 250, 19, 7, 2, 90]]


@pytest.fixture(scope="module")
def log_softmax(tiny_model):
    hf = load_reference(tiny_model)

    def rows(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1).numpy()

    return rows


def test_lm_eval_loglikelihood_request_matches_transformers(openai_client, log_softmax):
    # What lm-eval's local-completions sends for loglikelihood and loglikelihood_rolling.
    out = openai_client.completions.create(model=MODEL_NAME, prompt=CONTEXTS, echo=True, logprobs=1,
                                           max_tokens=1, temperature=0, seed=1234)
    assert len(out.choices) == 2
    for choice, prompt in zip(sorted(out.choices, key=lambda c: c.index), CONTEXTS, strict=True):
        lps = choice.logprobs
        assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == len(prompt) + 1
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        ref = log_softmax(prompt)
        expected = [ref[j - 1, prompt[j]] for j in range(1, len(prompt))]
        np.testing.assert_allclose(lps.token_logprobs[1 : len(prompt)], expected, atol=1e-3)
        # lm-eval's greedy check: the prompt token is the top one exactly where transformers says so.
        for j in range(1, len(prompt)):
            top = lps.top_logprobs[j]
            greedy = lps.token_logprobs[j] == max(top.values())
            assert greedy == (int(ref[j - 1].argmax()) == prompt[j])
        assert lps.text_offset[0] == 0 and lps.text_offset == sorted(lps.text_offset)


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(openai_client, log_softmax):
    prompt = "The server reads a request and"
    out = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    (choice,) = out.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.total_tokens == out.usage.prompt_tokens
    assert len(choice.logprobs.token_logprobs) == out.usage.prompt_tokens
    streamed = list(openai_client.completions.create(model=MODEL_NAME, prompt=prompt, echo=True, logprobs=0,
                                                     max_tokens=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    assert [lp for c in streamed for lp in c.choices[0].logprobs.token_logprobs] == choice.logprobs.token_logprobs


def test_streamed_echo_logprobs_equal_the_whole_answer(openai_client):
    args = dict(model=MODEL_NAME, prompt=CONTEXTS[1], echo=True, logprobs=2, max_tokens=5, temperature=0)
    whole = openai_client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in openai_client.completions.create(**args, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert [v for c in chunks for v in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_vllm_prompt_logprobs_on_both_endpoints(openai_client, base_url, log_softmax):
    prompt = CONTEXTS[0]
    out = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0,
                                           extra_body={"prompt_logprobs": 2})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    ref = log_softmax(prompt)
    assert entries[0] is None and len(entries) == len(prompt)
    for j in range(1, len(prompt)):
        entry = entries[j]
        row = ref[j - 1]
        actual = entry[str(prompt[j])]
        np.testing.assert_allclose(actual["logprob"], row[prompt[j]], atol=1e-3)
        assert actual["rank"] == 1 + int((row > row[prompt[j]]).sum())
        ranked = sorted((e for e in entry.values() if e["rank"] <= 2), key=lambda e: e["rank"])
        np.testing.assert_allclose([e["logprob"] for e in ranked], np.sort(row)[::-1][:2], atol=1e-3)

    messages = [{"role": "user", "content": "hello there"}]
    chat = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1,
                                                 extra_body={"prompt_logprobs": 0})
    given = chat.model_extra["prompt_logprobs"]
    count = httpx.post(f"{base_url}/tokenize", json={"messages": messages}).json()["count"]
    assert given[0] is None and len(given) == count == chat.usage.prompt_tokens
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in given[1:])


def test_streamed_chat_carries_prompt_logprobs_once(openai_client):
    """On the first chunk after the prompt is computed (not the role chunk), equal to the whole
    answer's; no other chunk has the field."""
    args = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hello there"}], max_tokens=4, temperature=0,
                extra_body={"prompt_logprobs": 2})
    whole = openai_client.chat.completions.create(**args)
    chunks = list(openai_client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    carrying = [i for i, c in enumerate(chunks) if "prompt_logprobs" in (c.model_extra or {})]
    assert carrying == [1] and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].model_extra["prompt_logprobs"] == whole.model_extra["prompt_logprobs"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == len(whole.model_extra["prompt_logprobs"])


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": "2"}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 21,
                              "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": -1},
     "prompt_logprobs"),
])
def test_bad_prompt_logprob_fields_are_400s(base_url, path, body, param):
    assert_error(httpx.post(f"{base_url}{path}", json=body), 400, param=param)
