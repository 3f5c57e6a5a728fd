"""lm-eval 0.4's `local-completions` against `tessera serve`, end to end: a multiple-choice task
and a loglikelihood_rolling (perplexity) task from local YAML and JSONL files, nothing from a hub.

lm-eval runs in a subprocess through its Python API (`simple_evaluate`, what its CLI calls; the CLI
itself only adds a printed table, whose writer is not installed: pytablewriter pulls in an LGPL
package, see BUILD_NOTES.md), with the checkpoint's folder as its Hugging Face tokenizer (it needs one to find where the context ends; the
requests go out as token ids, several prompts per request). Every number it reports is
checked against the same quantity computed here from transformers' float32 log-probs of the
same checkpoint: each choice's log-likelihood, the accuracies, each document's rolling
log-likelihood and the perplexities.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tests.helpers.cluster import start_serve
from tests.helpers.tiny_checkpoint import load_reference

SERVED = "tiny"
MAX_MODEL_LEN = 256

# Questions and choices in the tiny tokenizer's vocabulary (tests/helpers/tiny_tokenizer.py), of
# one to several tokens each; `answer` is the index of the gold choice.
QUESTIONS = [
    ("What does the server read first?", ["a request", "the cache", "a block", "the metrics"], 0),
    ("What does the tokenizer split text into?", ["pieces", "bytes and blocks", "sequences", "requests"], 0),
    ("Where are keys and values stored?", ["in fixed-size blocks", "in the client", "in the tokenizer", "nowhere"], 0),
    ("What makes the answer appear word by word?", ["memory", "streaming", "the scheduler", "a test"], 1),
    ("What do good tests check?", ["nothing", "exact values", "only that it ran", "the weather"], 1),
    ("How long are emoji?", ["one byte", "two bytes", "four bytes", "a block"], 2),
    ("What is returned to the pool?", ["a token", "a request", "a block", "the model"], 2),
    ("Who gets the answer?", ["the engine", "the tokenizer", "the cache", "the client"], 3),
]
DOCUMENTS = [
    "The server reads a request and sends the answer back to the client.",
    "Paged attention stores keys and values in blocks of a fixed size.",
    "A tokenizer splits text into pieces that the model has seen during training. Rare words are "
    "broken into several smaller pieces, and every byte has a token of its own.",
]

LM_EVAL_DRIVER = """
import json
import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

ran = lm_eval.simple_evaluate(model="local-completions", model_args="{model_args}",
                              tasks=["tessera_mc", "tessera_ppl"], task_manager=TaskManager(include_path="{tasks}"),
                              batch_size=4, log_samples=True)
with open("{out}", "w") as f:
    json.dump({{"results": ran["results"], "samples": ran["samples"]}}, f, default=handle_non_serializable)
"""

MC_TASK = """\
task: tessera_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PPL_TASK = """\
task: tessera_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def model_dir(checkpoint) -> Path:
    return checkpoint("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    """`tessera serve` as a process, run from this checkout (tests/helpers/cluster.py sets cwd)."""
    handle = start_serve(env={"TESSERA_MODEL": str(model_dir), "TESSERA_SERVED_MODEL_NAME": SERVED,
                              "TESSERA_MAX_MODEL_LEN": str(MAX_MODEL_LEN), "TESSERA_WARM_UP": "false"})
    yield handle.address
    handle.stop()


@pytest.fixture(scope="module")
def lm_eval_run(server, model_dir, tmp_path_factory) -> tuple[dict, dict[str, list[dict]]]:
    """lm-eval over both tasks: (its results, its samples per task)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = root / "tasks"
    tasks.mkdir()
    _write_jsonl(tasks / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    _write_jsonl(tasks / "ppl.jsonl", [{"text": t} for t in DOCUMENTS])
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl"))
    (tasks / "ppl.yaml").write_text(PPL_TASK.format(data=tasks / "ppl.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    model_args = ",".join([f"base_url={server}/v1/completions", f"model={SERVED}", "tokenizer_backend=huggingface",
                           f"tokenizer={model_dir}", f"max_length={MAX_MODEL_LEN}", "max_retries=1"])
    out = root / "out.json"
    driver = LM_EVAL_DRIVER.format(model_args=model_args, tasks=str(tasks), out=str(out))
    done = subprocess.run([sys.executable, "-c", driver], env=env, cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ran = json.loads(out.read_text())
    samples = {task: sorted(ran["samples"][task], key=lambda s: s["doc_id"]) for task in ("tessera_mc", "tessera_ppl")}
    return ran["results"], samples


@pytest.fixture(scope="module")
def reference(model_dir):
    """log P(continuation | context) over token ids, from transformers in float32."""
    model = load_reference(model_dir)

    def loglikelihood(context: list[int], continuation: list[int]) -> float:
        tokens = context + continuation
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].float()
        rows = torch.log_softmax(logits, dim=-1)
        return sum(float(rows[i - 1, tokens[i]]) for i in range(len(context), len(tokens)))

    return loglikelihood


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_multiple_choice_matches_transformers(lm_eval_run, reference, tokenizer):
    results, samples = lm_eval_run
    correct = correct_norm = 0
    for sample, (question, choices, answer) in zip(samples["tessera_mc"], QUESTIONS, strict=True):
        # The context is the prompt up to "Answer:"; the delimiter's space starts each choice.
        context = _encode(tokenizer, f"Question: {question}\nAnswer:")
        expected = []
        for choice in choices:
            whole = _encode(tokenizer, f"Question: {question}\nAnswer: {choice}")
            assert whole[:len(context)] == context  # the choice does not merge into the context's tokens
            expected.append(reference(context, whole[len(context):]))
        got = [float(ll) for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(got, expected, atol=2e-3)
        ranked = sorted(expected, reverse=True)
        assert ranked[0] - ranked[1] > 0.05, "near-tie in the reference: choose other choices"
        correct += int(np.argmax(expected) == answer)
        correct_norm += int(np.argmax(np.array(expected) / [len(c) for c in choices]) == answer)
        assert sample["acc"] == float(np.argmax(expected) == answer)
    mc = results["tessera_mc"]
    assert mc["sample_len"] == len(QUESTIONS)
    assert mc["acc,none"] == pytest.approx(correct / len(QUESTIONS), abs=1e-12)
    assert mc["acc_norm,none"] == pytest.approx(correct_norm / len(QUESTIONS), abs=1e-12)


def test_rolling_loglikelihood_and_perplexity_match_transformers(lm_eval_run, reference, tokenizer):
    results, samples = lm_eval_run
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    totals, words, nbytes = [], 0, 0
    for sample, text in zip(samples["tessera_ppl"], DOCUMENTS, strict=True):
        # Each document fits one window: every token given the beginning-of-text token and all before it.
        expected = reference([bos], _encode(tokenizer, text))
        (got,) = sample["filtered_resps"]
        assert float(got) == pytest.approx(expected, abs=1e-2)
        totals.append(expected)
        words += len(text.split())
        nbytes += len(text.encode())
    ppl = results["tessera_ppl"]
    assert ppl["sample_len"] == len(DOCUMENTS)
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-sum(totals) / words), rel=2e-3)
    assert ppl["byte_perplexity,none"] == pytest.approx(math.exp(-sum(totals) / nbytes), rel=2e-3)
    assert ppl["bits_per_byte,none"] == pytest.approx(-sum(totals) / nbytes / math.log(2), rel=2e-3)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
