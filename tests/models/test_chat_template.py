"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

import json
import shutil
from datetime import datetime

import pytest

from models.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SINGLE_TURN = [{"role": "user", "content": "What is 2 + 2?"}]
MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "  What is 2 + 2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 你好 😀?"},
]
NO_SYSTEM_MULTI_TURN = MULTI_TURN[1:]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
@pytest.mark.parametrize(
    "messages", [SINGLE_TURN, MULTI_TURN, NO_SYSTEM_MULTI_TURN], ids=["single", "multi", "no_system"]
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_same_string_as_transformers(checkpoints, style, messages, add_generation_prompt):
    ours = Tokenizer.from_dir(checkpoints[style])
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoints[style])
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_llama3_exact_prompt(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    assert tok.apply_chat_template(MULTI_TURN[:2], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chatml_adds_default_system_message(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["chatml"])
    assert tok.apply_chat_template(SINGLE_TURN, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The rendered prompt encodes to the control tokens, not to their characters.
    ids = tok.encode(tok.apply_chat_template(SINGLE_TURN), add_special_tokens=False)
    assert ids[0] == 510 and ids.count(511) == 2


def test_raise_exception_gives_chat_template_error(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    with pytest.raises(ChatTemplateError, match=r"^Unknown role: robot$"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_jinja_file_wins(checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama3"], folder)
    file_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(file_template)
    tok = Tokenizer.from_dir(folder)
    assert tok.chat_template == file_template
    assert tok.apply_chat_template(SINGLE_TURN) == "[user]What is 2 + 2?<|end_of_text|>"
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs.apply_chat_template(SINGLE_TURN, tokenize=False) == "[user]What is 2 + 2?<|end_of_text|>"


def test_template_list_uses_default_and_tool_use_with_tools(checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["chatml"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "plain:{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "tools:{{ tools | map(attribute='name') | join(',') }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(folder)
    tools = [{"name": "add"}, {"name": "mul"}]
    assert tok.chat_template == "plain:{{ messages[0]['content'] }}"
    assert tok.apply_chat_template(SINGLE_TURN) == "plain:What is 2 + 2?"
    assert tok.apply_chat_template(SINGLE_TURN, tools=tools) == "tools:add,mul"
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs.apply_chat_template(SINGLE_TURN, tools=tools, tokenize=False) == "tools:add,mul"


def test_tojson_keeps_order_non_ascii_and_html():
    # Jinja's own tojson would sort the keys and escape "<" and "&"; transformers' does neither.
    template = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}"
    tools = [{"name": "<b>&", "city": "東京"}]
    assert render_chat_template(template, SINGLE_TURN, tools=tools) == (
        '[{"name": "<b>&", "city": "東京"}]|{\n  "name": "<b>&",\n  "city": "東京"\n}'
    )


def test_variables_match_transformers(checkpoints):
    # Special tokens, extra keyword arguments, documents, None-valued keys dropped, reasoning aliased.
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ enable_thinking }}|"
        "{{ documents | length }}|{% for m in messages %}{{ m.content is defined }},{{ m.thinking }};{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "reasoning": "think"}]
    kwargs = {"enable_thinking": False, "documents": [{"title": "a", "text": "b"}]}
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoints["llama3"])
    expected = "<|begin_of_text|>|<|end_of_text|>|False|False|1|True,;False,think;"
    assert render_chat_template(template, messages, special_tokens=tok.special_tokens, **kwargs) == expected
    assert theirs.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs) == expected


def test_trim_blocks_lstrip_blocks_and_loop_controls():
    template = (
        "  {% for m in messages %}\n{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m['content'] }}\n  {% endfor %}"
    )
    assert render_chat_template(template, MULTI_TURN) == "You answer briefly.\n"


def test_strftime_now():
    assert render_chat_template("{{ strftime_now('%Y') }}", SINGLE_TURN) == str(datetime.now().year)


def test_generation_block_renders_its_body():
    template = "{% for m in messages %}{% generation %}<{{ m['content'] }}>{% endgeneration %}{% endfor %}"
    assert render_chat_template(template, SINGLE_TURN) == "<What is 2 + 2?>"


def test_sandbox_rejects_underscore_namespace_attributes():
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(__class__=1) %}", SINGLE_TURN)


def test_syntax_error_is_chat_template_error():
    with pytest.raises(ChatTemplateError, match="line 1"):
        render_chat_template("{% for m in messages %}", SINGLE_TURN)


def test_template_compiled_once():
    template = "{{ messages | length }}"
    assert compile_chat_template(template) is compile_chat_template(template)
