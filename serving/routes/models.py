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

    @get(operation_id="listModels", summary="The model this server serves")
    async def list_models(self, server: ServerState) -> ModelList:
        root = server.config.model or server.model_name
        return ModelList([ModelCard(id=server.model_name, created=int(server.started), root=root,
                                    max_model_len=server.max_model_len)])
