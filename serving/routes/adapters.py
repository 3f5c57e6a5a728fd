"""LoRA adapters as vLLM serves them (POST /v1/load_lora_adapter, /v1/unload_lora_adapter, scope
adapter-manager), their state (GET /debug/adapters, read), and the base model's hot reload
(POST /admin/models/reload, admin)."""

from __future__ import annotations

import asyncio

from litestar import Controller, Request, get, post

from models.lora import AdapterError
from ops.audit import audit_event
from runtime.adapters import AdapterManager, AdapterNotFound, AdapterVersion
from serving.adapter_source import adapter_folder
from serving.auth.guard import needs, principal_of
from serving.auth.principal import ADAPTER_MANAGER, ADMIN, READ
from serving.errors import bad_request
from serving.hot_reload import reload_model
from serving.middleware import request_record
from serving.protocol.adapters import (
    AdapterDebug,
    LoadLoraAdapterRequest,
    LoraAdapterInfo,
    ReloadModelRequest,
    ReloadModelResponse,
    UnloadLoraAdapterRequest,
)
from serving.routes.common import ERROR_RESPONSES
from serving.state import ServerState, model_not_found


class LoraAdaptersController(Controller):
    path = "/v1"
    tags = ["Adapters"]
    opt = needs(ADAPTER_MANAGER)

    @post("/load_lora_adapter", operation_id="loadLoraAdapter", status_code=200, responses=ERROR_RESPONSES,
          summary="Load a PEFT LoRA adapter from a folder and serve it as a model named lora_name (a loaded "
                  "name is replaced; requests running on it finish on the old weights)")
    async def load(self, request: Request, data: LoadLoraAdapterRequest, server: ServerState) -> LoraAdapterInfo:
        host, _ = _adapters(server)
        name = data.lora_name.strip()
        if not name or name == server.model_name:
            raise bad_request(f"lora_name must be a non-empty name other than the base model's `{server.model_name}`",
                              "lora_name")
        try:
            folder = await asyncio.to_thread(adapter_folder, server.config, name, data.lora_path)
            version = await host.load_adapter(name, folder)
        except AdapterError as e:
            _audit(request, "adapter.load", "failure", name, reason=str(e))
            raise bad_request(f"the adapter `{name}` was not loaded: {e}", "lora_path", "invalid_adapter") from None
        _audit(request, "adapter.load", "success", name, version=version.version_id,
               load_seconds=round(version.load_seconds, 4))
        return _info(version)

    @post("/unload_lora_adapter", operation_id="unloadLoraAdapter", status_code=200, responses=ERROR_RESPONSES,
          summary="Stop serving an adapter: new requests get 404, running ones finish")
    async def unload(self, request: Request, data: UnloadLoraAdapterRequest, server: ServerState) -> LoraAdapterInfo:
        host, _ = _adapters(server)
        try:
            version = host.unload_adapter(data.lora_name)
        except AdapterNotFound:
            raise model_not_found(data.lora_name, server.model_name) from None
        _audit(request, "adapter.unload", "success", data.lora_name, version=version.version_id)
        info = _info(version)
        info.status = "unloaded"
        return info


class AdapterDebugController(Controller):
    path = "/debug/adapters"
    tags = ["Operations"]
    opt = needs(READ)

    @get(operation_id="debugAdapters", summary="Adapter slots: each version held, its slot, hits, last use, load time")
    async def adapters(self, server: ServerState) -> AdapterDebug:
        host = server.adapter_host
        adapters = host.adapters if host is not None else None
        if adapters is None:
            return AdapterDebug(max_loras=0, max_lora_rank=0, free_slots=0, adapters=[])
        return AdapterDebug(**adapters.snapshot())


class ModelReloadController(Controller):
    path = "/admin/models"
    tags = ["Administration"]
    opt = needs(ADMIN)

    @post("/reload", operation_id="reloadModel", status_code=200, responses=ERROR_RESPONSES,
          summary="Load the model folder (default: the served one) beside the served model, verify its "
                  "signature, then switch between steps once running requests finish; a failure leaves the "
                  "old model serving")
    async def reload(self, request: Request, server: ServerState, data: ReloadModelRequest | None = None
                     ) -> ReloadModelResponse:
        caller = principal_of(request)
        done = await reload_model(server, data.model_path if data else None, actor=caller.subject,
                                  request_id=request_record(request.scope).request_id,
                                  source=request.client.host if request.client else None)
        return ReloadModelResponse(server.model_name, done.model_path, done.version, round(done.load_seconds, 4),
                                   round(done.switch_seconds, 4))


def _adapters(server: ServerState):
    host = server.adapter_host
    adapters: AdapterManager | None = host.adapters if host is not None else None
    if adapters is None:
        raise bad_request("this server serves no LoRA adapters: start it with --max-loras N", code="lora_disabled")
    return host, adapters


def _info(version: AdapterVersion) -> LoraAdapterInfo:
    return LoraAdapterInfo(version.name, version.version_id, version.path, version.adapter.rank,
                           list(version.adapter.targets), round(version.load_seconds, 4))


def _audit(request: Request, action: str, outcome: str, name: str, **details) -> None:
    caller = principal_of(request)
    audit_event(action, outcome, actor=caller.subject, tenant=caller.tenant, key_id=caller.key_id,
                object=f"adapter:{name}", request_id=request_record(request.scope).request_id,
                source=request.client.host if request.client else None, adapter=name, **details)
