"""The official openai client, sync and async, against a real server: completions and chat,
streamed and not, usage, logprobs, stop, n > 1, seeded repeatability, vLLM's extra fields."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL_NAME

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def _prompt_tokens(base_url: str, prompt: str) -> int:
    return httpx.post(f"{base_url}/tokenize", json={"prompt": prompt}).json()["count"]


def _chat_prompt_tokens(base_url: str, messages: list[dict]) -> int:
    return httpx.post(f"{base_url}/tokenize", json={"messages": messages}).json()["count"]


def test_completion_usage_and_text_match_the_stream(openai_client, base_url):
    prompt = "The server reads a request and"
    full = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, **GREEDY)
    assert full.object == "text_completion" and full.model == MODEL_NAME and full.id.startswith("cmpl-")
    (choice,) = full.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert full.usage.prompt_tokens == _prompt_tokens(base_url, prompt)
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(openai_client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": full.usage.prompt_tokens, "completion_tokens": 12}


def test_chat_usage_and_text_match_the_stream(openai_client, base_url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is paged attention?"}]
    full = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                                 **GREEDY)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == _chat_prompt_tokens(base_url, messages)
    assert full.usage.completion_tokens == 10

    chunks = list(openai_client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stream_without_include_usage_has_no_usage_chunk(openai_client):
    chunks = list(openai_client.completions.create(model=MODEL_NAME, prompt="Paged", max_tokens=4, stream=True,
                                                   **GREEDY))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completion_logprobs(openai_client):
    result = openai_client.completions.create(model=MODEL_NAME, prompt="A tokenizer splits", max_tokens=6,
                                              logprobs=3, **GREEDY)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 3 <= len(top) <= 4  # the top 3 and the chosen token (if it is not among them)
        assert top[token] == logprob
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_and_top_logprobs(openai_client):
    result = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True,
        top_logprobs=2, **GREEDY)
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy
        assert item.bytes == list(item.token.encode())
    streamed = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True,
        top_logprobs=2, stream=True, **GREEDY)
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [item.token for item in content]


def test_stop_string_ends_the_completion_before_it(openai_client):
    prompt = "Streaming makes the answer"
    text = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, **GREEDY).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3 and stop in text
    for stream in (False, True):
        result = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, stop=[stop, "\x00"],
                                                  stream=stream, **GREEDY)
        chunks = list(result) if stream else [result]
        assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
        last = chunks[-1].choices[0]
        assert last.finish_reason == "stop"
        assert last.model_extra["stop_reason"] == stop


def test_stop_token_ids_and_min_tokens(openai_client):
    half_vocab = list(range(0, 512, 2))  # every other token ends the completion
    result = openai_client.completions.create(
        model=MODEL_NAME, prompt="Good tests check", max_tokens=30, temperature=1.0, seed=3,
        extra_body={"stop_token_ids": half_vocab, "min_tokens": 6})
    choice = result.choices[0]
    assert result.usage.completion_tokens >= 6
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] in half_vocab


def test_n_samples_complete_each_choice(openai_client):
    result = openai_client.completions.create(model=MODEL_NAME, prompt="The blocks", max_tokens=5, n=3,
                                              temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 15
    assert len({c.text for c in result.choices}) > 1  # independent samples

    chunks = list(openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, temperature=1.0, seed=5,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 8


def test_prompt_batch_gives_a_choice_per_prompt_and_sample(openai_client):
    result = openai_client.completions.create(model=MODEL_NAME, prompt=["First prompt", "Second prompt"], max_tokens=3,
                                              n=2, **GREEDY)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text  # greedy samples of one prompt agree
    assert result.usage.completion_tokens == 12


def test_seeded_sampling_repeats(openai_client):
    kwargs = dict(model=MODEL_NAME, prompt="Each step of the engine", max_tokens=10, temperature=1.0, top_p=0.9,
                  extra_body={"ignore_eos": True, "top_k": 50})
    a = openai_client.completions.create(seed=1234, **kwargs).choices[0].text
    b = openai_client.completions.create(seed=1234, **kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(seed=1234, stream=True, **kwargs))
    others = {openai_client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert a == b == streamed
    assert others - {a}  # other seeds give other text


def test_vllm_sampling_fields_are_accepted(openai_client):
    result = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.8, seed=2,
        presence_penalty=0.5, frequency_penalty=0.3, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True, "min_tokens": 2,
                    "priority": 1, "cache_salt": "s1"})
    assert result.usage.completion_tokens == 6


def test_async_client_streams_concurrently(base_url, openai_client):
    kwargs = dict(model=MODEL_NAME, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    prompts = [f"Request number {i} asks" for i in range(4)]
    expected = [openai_client.completions.create(prompt=p, seed=i, **kwargs).choices[0].text
                for i, p in enumerate(prompts)]

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
            async def one(i: int) -> str:
                stream = await client.completions.create(prompt=prompts[i], seed=i, stream=True, **kwargs)
                return "".join([c.choices[0].text async for c in stream])

            chat = await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, **GREEDY)
            assert chat.usage.completion_tokens == 3
            return list(await asyncio.gather(*(one(i) for i in range(4))))

    assert asyncio.run(run()) == expected  # a seeded request's text does not depend on its neighbours
