"""Reloading the base model in a running server: POST /admin/models/reload and SIGHUP share this.

The new folder passes the same signature gate as at start-up (`check_trust`) before any weight
is read; the engine then loads it beside the served model and switches between steps
(runtime/model_reload.py). One reload at a time; every outcome is an audit line
(`model.reload`), and a failure leaves the old model serving.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from ops.audit import audit_event
from runtime.model_reload import ModelReloadError
from serving.errors import APIError
from serving.state import ServerState

log = logging.getLogger(__name__)
_lock = asyncio.Lock()


@dataclass(frozen=True)
class Reloaded:
    model_path: str
    version: int
    load_seconds: float
    switch_seconds: float


def served_folder(server: ServerState) -> str:
    from serving.default_model import resolve_model

    return str(resolve_model(server.config.model))


async def reload_model(server: ServerState, model_path: str | None, *, actor: str, request_id: str | None = None,
                       source: str | None = None) -> Reloaded:
    """Check, load, drain and switch; APIError (400 bad folder or signature, 409 busy, 503 not
    drained in time, 501 an engine that cannot reload) otherwise."""
    from ops.model_signing import ModelSignatureError
    from serving.server import check_trust

    host = server.adapter_host
    if host is None:
        raise APIError(501, "this engine cannot reload its model in place", code="reload_unsupported")
    if _lock.locked():
        raise APIError(409, "a model reload is already under way", code="reload_in_progress")
    folder = model_path or served_folder(server)
    audit = dict(actor=actor, object=f"model:{server.model_name}", request_id=request_id, source=source,
                 model=Path(folder).name)
    async with _lock:
        try:
            if not Path(folder).is_dir():
                raise ModelReloadError(f"{folder} is not a folder")
            await asyncio.to_thread(check_trust, server.config, folder)
            version, load_s, switch_s = await host.reload_model(folder, server.config.reload_drain_timeout_s)
        except (ModelReloadError, ModelSignatureError) as e:
            audit_event("model.reload", "failure", reason=str(e), **audit)
            raise APIError(400, f"the model was not reloaded: {e}", param="model_path",
                           code="model_reload_failed") from None
        except TimeoutError as e:
            audit_event("model.reload", "failure", reason=str(e), **audit)
            raise APIError(503, f"the model was not reloaded: {e}", code="model_reload_timeout") from None
    audit_event("model.reload", "success", version=version, load_seconds=round(load_s, 3),
                switch_seconds=round(switch_s, 3), **audit)
    log.info("model reloaded from %s: version %d (load %.2fs, drain and switch %.2fs)", folder, version, load_s,
             switch_s)
    return Reloaded(folder, version, load_s, switch_s)


async def reload_on_signal(server: ServerState) -> None:
    """SIGHUP: reload the served folder; a failure is logged and audited, the old model serves on."""
    try:
        await reload_model(server, None, actor="signal:SIGHUP")
    except APIError as e:
        log.error("SIGHUP reload failed: %s", e.message)
