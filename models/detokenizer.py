"""Turn a stream of generated token ids into text chunks for streaming responses.

Two problems make `decode([token_id])` per step wrong:
  * byte-level BPE splits a multi-byte character (emoji, CJK) over several tokens, and the first
    of them decodes to U+FFFD until the rest arrive;
  * some decoders change a token's text depending on its neighbours (leading spaces).
So each step decodes a short window of recent tokens twice, with and without the new ones, and
emits the difference once it no longer ends in a broken character. Only the window is kept:
`_window[:_read_offset]` is text already emitted (the left context), the rest is held back.
After each emission the window drops its old context, so a step costs O(window), not O(sequence).
"""

from collections.abc import Sequence

from models.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first generated tokens: enough for any decoder's
# neighbour-dependent spacing, and short enough to be cheap.
_PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (often "", never a broken character)."""
        self._window.append(token_id)
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # A character still waits for its remaining bytes, or the token was a skipped
            # special token: hold the window open and emit nothing yet.
            return ""
        # The tokens just emitted become the left context of the next window.
        del self._window[:self._read_offset]
        self._read_offset = len(self._window)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Return the held-back text at the end of generation, even an incomplete character."""
        prefix_text, full_text = self._decode_window()
        self._window.clear()
        self._read_offset = 0
        return full_text[len(prefix_text):]

    def _decode_window(self) -> tuple[str, str]:
        """(text already emitted from the window, text of the whole window)."""
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        prefix_text = decode(self._window[:self._read_offset], skip_special_tokens=skip)
        full_text = decode(self._window, skip_special_tokens=skip)
        return prefix_text, full_text
