"""GET /v1/models."""

from __future__ import annotations

from litestar import Controller, get

from serving.auth.guard import needs
from serving.auth.principal import READ
from serving.protocol.admin import ModelCard, ModelList
from serving.state import ServerState


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["OpenAI"]
    opt = needs(READ)

    @get(operation_id="listModels", summary="The model this server serves, and its LoRA adapters (parent: the model)")
    async def list_models(self, server: ServerState) -> ModelList:
        root = server.config.model or server.model_name
        host = server.adapter_host
        cards = [ModelCard(id=server.model_name, created=int(server.started), root=root,
                           max_model_len=server.max_model_len, version=host.model_version if host else None)]
        adapters = host.adapters if host is not None else None
        for v in adapters.served() if adapters is not None else []:  # vLLM's cards: root the folder, parent the base
            cards.append(ModelCard(id=v.name, created=int(v.loaded_at), root=v.path, max_model_len=server.max_model_len,
                                   parent=server.model_name, version=None, adapter_version=v.version_id))
        return ModelList(cards)
