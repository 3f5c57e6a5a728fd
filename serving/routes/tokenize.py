"""POST /tokenize and POST /detokenize, in vLLM's shapes."""

from __future__ import annotations

from litestar import Controller, post

from serving.auth.guard import needs
from serving.auth.principal import GENERATE
from serving.errors import bad_request
from serving.protocol.admin import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serving.prompts import decode, encode_text, render_chat, token_texts
from serving.routes.chat import plain_messages
from serving.routes.common import ERROR_RESPONSES
from serving.state import ServerState


class TokenizeController(Controller):
    path = "/"
    tags = ["Tokenizer"]
    opt = needs(GENERATE)

    @post("/tokenize", operation_id="tokenize", status_code=200, responses=ERROR_RESPONSES,
          summary="Token ids of a prompt, or of messages through the chat template")
    async def tokenize(self, data: TokenizeRequest, server: ServerState) -> TokenizeResponse:
        server.check_model(data.model)
        if (data.prompt is None) == (data.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if data.messages is not None:
            if not data.messages:
                raise bad_request("messages must not be empty", "messages")
            _, ids = await render_chat(server, plain_messages(data.messages), data.add_generation_prompt,
                                       data.chat_template_kwargs)
        else:
            ids = await encode_text(server, data.prompt, "prompt", add_special_tokens=data.add_special_tokens)
        strs = await token_texts(server, ids) if data.return_token_strs else None
        return TokenizeResponse(len(ids), server.max_model_len, ids, strs)

    @post("/detokenize", operation_id="detokenize", status_code=200, responses=ERROR_RESPONSES,
          summary="Text of token ids")
    async def detokenize(self, data: DetokenizeRequest, server: ServerState) -> DetokenizeResponse:
        server.check_model(data.model)
        vocab = server.tokenizer.vocab_size
        bad = [t for t in data.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens {bad[:8]} are outside the vocabulary [0, {vocab})", "tokens")
        return DetokenizeResponse(await decode(server, data.tokens))
