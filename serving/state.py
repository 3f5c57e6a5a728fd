"""What every handler needs: the engine, the settings, admission, recent requests, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from runtime.adapters import AdapterHost
from runtime.engine_client import EngineClient
from serving.admission import Admission
from serving.config import ServerConfig
from serving.errors import APIError
from serving.in_flight import InFlight
from serving.records import RecentRequests
from serving.response_store import ResponseStore
from serving.tokenizer_pool import TokenizerPool


@dataclass
class ServerState:
    engine: EngineClient
    """The engine, seen only through its protocol (in-process or remote)."""
    config: ServerConfig
    model_name: str
    owns_engine: bool = False
    """Shut the engine down with the app (it was built for it)."""
    metrics: Any | None = None
    guardrails: Any | None = None
    """`serving.guardrails.Guardrails` from --guardrails; None: no guardrails."""
    cluster: Any | None = None
    """`tessera gateway`'s view of its workers (serving/gateway.py `GatewayEngine`: `loads()` for
    the autoscale hints); None in `tessera serve`, whose one engine is the whole cluster."""
    started: float = field(default_factory=time.time)
    admission: Admission = field(init=False)
    recent: RecentRequests = field(init=False)
    in_flight: InFlight = field(default_factory=InFlight)
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses' previous_response_id
    """Generation requests holding a seat, for the admin UI's Live page."""

    def __post_init__(self):
        self.recent = RecentRequests(self.config.debug_requests, with_text=self.config.log_prompts)
        self.admission = Admission(self.engine.max_num_seqs, self.config.max_queue,
                                   self.recent.mean_e2e_s)
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def tokenizer_pool(self) -> TokenizerPool:
        """Worker processes for tokenizing and templating (started on first use; one per tokenizer)."""
        return TokenizerPool.shared(self.tokenizer, self.config.tokenizer_workers)

    @property
    def sampling_defaults(self) -> dict:
        """The model's generation_config.json sampling fields, for fields a request leaves out."""
        return self.engine.generation_defaults

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def adapter_host(self) -> AdapterHost | None:
        """The engine's adapters and model reload, when it has them (in-process engines do)."""
        return self.engine if isinstance(self.engine, AdapterHost) else None

    def check_model(self, name: str | None) -> None:
        self.adapter_for(name)

    def adapter_for(self, name: str | None) -> str:
        """The LoRA adapter a request's `model` selects ("" for the base model); 404 model_not_found
        for a name that is neither."""
        if name is None or name == self.model_name:
            return ""
        host = self.adapter_host
        adapters = host.adapters if host is not None else None
        if adapters is not None and any(v.name == name for v in adapters.served()):
            return name
        raise model_not_found(name, self.model_name)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def engine_running(self) -> bool:
        return self.engine.health().running


def model_not_found(name: str, base: str) -> APIError:
    return APIError(404, f"the model `{name}` does not exist; this server serves `{base}` and the LoRA adapters "
                         "listed by /v1/models", param="model", code="model_not_found")
