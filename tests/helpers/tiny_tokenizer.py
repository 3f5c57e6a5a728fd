"""Train a tiny byte-level BPE tokenizer for tests, shaped like a Llama 3 or a Qwen2.5 checkpoint.

No model hub is reachable from the test machines, so tests that need a real `tokenizer.json`
train one here in well under a second from a fixed corpus.
"""

import json
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# English prose for the merges, plus emoji and CJK lines so that multi-byte characters exist in
# the byte alphabet. Only a few of those characters get merges; the rest stay split across
# several byte-level tokens, which is what the detokenizer tests need.
_CORPUS = """\
The server reads a request, turns the prompt into tokens, and schedules it with the other
requests that are waiting. Each step of the engine runs the model once for every sequence in
the batch and samples one new token for each of them. When a sequence reaches its end token or
its length limit, the scheduler frees its cache blocks and the answer is sent back to the client.

A tokenizer splits text into pieces that the model has seen during training. Common words become
a single token, while rare words are broken into several smaller pieces. Byte-level tokenizers
never fail on unknown text, because any string can be written as a sequence of bytes, and every
byte has a token of its own.

Streaming makes the answer appear word by word. The difficult part is that a single character
may be spread over more than one token, so the text of a token is not always printable on its
own. The detokenizer keeps those bytes back until the character is complete, and only then does
it send the new text to the client.

Paged attention stores the keys and values of every sequence in fixed-size blocks. The blocks of
one sequence do not need to be next to each other in memory, which means that memory is not
wasted when sequences grow at different speeds. Sequences that share a prompt can share the
blocks that hold it, and a block is returned to the pool when nobody uses it any more.

Good tests check exact values: the token ids, the decoded strings, the status codes and the
numbers that the metrics report. A test that only checks that a function ran without an error
tells the reader very little about what the function is supposed to do.
Thanks for the help! 😀 👍 🎉 ❤️ 🚀
Emoji are four bytes long: 😀😀 👍👍 🎉🎉
你好，世界！今天天气很好。我们一起学习中文。
日本語のテキストも少し入れておきます。ありがとうございます。
한국어 문장도 조금 있습니다. 감사합니다.
"""

# The pre-tokenizer regex of Llama 3 and Qwen2: contractions, letter runs with one leading
# non-letter, digits in groups of at most three, punctuation runs, and whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Same output as the Llama 3 instruct template: bos once, a header per message, trimmed content,
# <|eot_id|> after each message. Unknown roles are rejected so tests can exercise raise_exception.
_LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5-style ChatML: a default system message when the chat has none.
_CHATML_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- set chat = messages[1:] %}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- set chat = messages %}
{%- endif %}
{%- for message in chat %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def train_tiny_tokenizer(out_dir, vocab_size: int = 512, style: Literal["llama3", "chatml"] = "llama3") -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` to `out_dir`; `vocab_size` counts the special tokens."""
    if style not in ("llama3", "chatml"):
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'llama3' or 'chatml'")
    specials = _LLAMA3_SPECIALS if style == "llama3" else _CHATML_SPECIALS
    tokenizer = _train_byte_level_bpe(vocab_size - len(specials))
    if style == "chatml":
        tokenizer.normalizer = normalizers.NFC()
    # Added after training so they take the highest ids, as in the real checkpoints.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if style == "llama3":
        bos = specials[0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
        config = {"bos_token": bos, "eos_token": specials[1], "chat_template": _LLAMA3_TEMPLATE}
    else:
        # Offsets only, like Qwen2: encode adds no tokens.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                  "chat_template": _CHATML_TEMPLATE}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
               "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _train_byte_level_bpe(num_merged_tokens: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_merged_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer
