"""The tokenizer of a Hugging Face checkpoint folder, read the way transformers' AutoTokenizer reads it.

Only the `tokenizers` library runs at serving time; transformers is needed by the tests alone.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from models.chat_template import ChatTemplateError, render_chat_template

# Named special tokens that transformers knows; any other `*_token` key in tokenizer_config.json
# (e.g. Qwen-VL's "image_token") is a model-specific named token and reaches templates too.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """The checkpoint folder lacks a file the tokenizer needs, or a file is malformed."""


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str],
        extra_special_tokens: Sequence[str] = (),
        chat_templates: Mapping[str, str] | None = None,
        generation_eos_ids: Iterable[int] = (),
        generation_bos_id: int | None = None,
        generation_pad_id: int | None = None,
    ):
        """`special_tokens` maps names such as "eos_token" to token text; `chat_templates` maps names to templates."""
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._extra_special_tokens = list(extra_special_tokens)
        self._chat_templates = dict(chat_templates or {})
        self._generation_eos_ids = frozenset(generation_eos_ids)
        self._generation_bos_id = generation_bos_id
        self._generation_pad_id = generation_pad_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} not found: only fast (tokenizer.json) tokenizers are supported")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        special_tokens = _named_special_tokens(config)
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        extra_tokens = [_token_text(t) for t in extra] if isinstance(extra, list) else []
        _register_special_tokens(backend, [*special_tokens.values(), *extra_tokens])
        # add_bos_token / add_eos_token are ignored on purpose: transformers 5 drops them when
        # tokenizer.json exists, so its post-processor alone decides what encode() adds.
        return cls(
            backend,
            special_tokens,
            extra_tokens,
            chat_templates=_read_chat_templates(folder, config),
            generation_eos_ids=_as_id_list(generation.get("eos_token_id")),
            generation_bos_id=generation.get("bos_token_id"),
            generation_pad_id=generation.get("pad_token_id"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # transformers skips clean_up_tokenization_spaces for BPE models (it would eat real
        # spaces before punctuation), so plain backend decode matches it for byte-level BPE.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The backend tokenizer as tokenizer.json text (what grammar engines read)."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        """The embedding table needs at least max_token_id + 1 rows."""
        return max(self._backend.get_vocab(with_added_tokens=True).values())

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token", fallback=self._generation_bos_id)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Generation stops at any of these: instruct models often end turns with a token
        (<|eot_id|>, <|im_end|>) that generation_config.json lists but tokenizer_config.json does not."""
        eos = self._named_id("eos_token")
        return self._generation_eos_ids | ({eos} if eos is not None else set())

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token", fallback=self._generation_pad_id)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and extra special tokens, in transformers' order."""
        texts = list(dict.fromkeys([*self._special_tokens.values(), *self._extra_special_tokens]))
        ids = [self._backend.token_to_id(t) for t in texts]
        return [i for i in ids if i is not None]

    @property
    def special_tokens(self) -> dict[str, str]:
        """Name -> text of the named special tokens; chat templates see these as variables."""
        return dict(self._special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """Render the prompt text; encode it with add_special_tokens=False, since templates write bos themselves."""
        # Like transformers: a checkpoint with several templates uses "tool_use" when tools are given.
        name = "tool_use" if tools is not None and "tool_use" in self._chat_templates else "default"
        template = self._chat_templates.get(name)
        if template is None:
            raise ChatTemplateError(f"the tokenizer has no chat template (available: {sorted(self._chat_templates)})")
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self._special_tokens,
            **extra,
        )

    def _named_id(self, name: str, fallback: int | None = None) -> int | None:
        text = self._special_tokens.get(name)
        token_id = self._backend.token_to_id(text) if text is not None else None
        return token_id if token_id is not None else fallback


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes a token as a string or as a serialized AddedToken dict."""
    if _is_token_value(value):
        return value if isinstance(value, str) else value["content"]
    raise TokenizerError(f"expected a token string or an AddedToken dict, got {value!r}")


def _is_token_value(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, Mapping) and isinstance(value.get("content"), str))


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    # Known names first, then model-specific ones, so all_special_ids keeps transformers' order.
    # Only token-valued keys count: "add_bos_token" also ends in "_token" but holds a bool.
    model_specific = [k for k, v in config.items() if k.endswith("_token") and _is_token_value(v)]
    names = [*_NAMED_SPECIAL_TOKENS, *(k for k in model_specific if k not in _NAMED_SPECIAL_TOKENS)]
    tokens = {name: _token_text(config[name]) for name in names if config.get(name) is not None}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):  # the v5 form of model-specific named tokens
        tokens |= {name: _token_text(value) for name, value in extra.items()}
    return tokens


def _register_special_tokens(backend: tokenizers.Tokenizer, texts: Iterable[str]) -> None:
    # transformers adds every special token named in the config as a special added token: one that
    # is missing from tokenizer.json gets a new id, and one that is an ordinary vocab entry stops
    # being split by the pre-tokenizer and is skipped by decode(skip_special_tokens=True).
    already_special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in dict.fromkeys(texts) if t not in already_special]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _read_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    # transformers 5 saves templates as chat_template.jinja (the default) and
    # chat_templates/<name>.jinja; when any such file exists the tokenizer_config.json entry is ignored.
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_templates").is_dir():
        for path in sorted((folder / "chat_templates").glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if files:
        return files
    template = config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    return {}
