"""Server settings: one dataclass, every field a `tessera serve` flag and a `TESSERA_*` variable.

A flag wins over the environment, which wins over the default. `tessera serve --help`
prints every field with its help, its variable (and older aliases of it) and its default.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from models.lora import LORA_KERNELS
from models.projection import QUANTIZATIONS
from runtime.backend import ATTENTION_BACKENDS
from runtime.execution_plan import LINEAR_IMPLS
from runtime.config import EngineConfig

ENV_PREFIX = "TESSERA_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_KV_CACHE_GIB = 2.0  # where the device's memory does not size the KV cache (the CPU)


def _setting(default, help: str, aliases: Mapping[str, Mapping[str, object]] | None = None):  # noqa: A002
    """`aliases`: older variables that set the field too, each with its values' meanings (None:
    the default); the field's own variable wins over them."""
    return field(default=default, metadata={"help": help, "aliases": aliases or {}})


@dataclass(slots=True)
class ServerConfig:
    # -- where --------------------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "TCP port to listen on")
    # -- the model ----------------------------------------------------------------------------
    model: str | None = _setting(None, "Hugging Face model folder, or s3://bucket/prefix (downloaded once to "
                                       "model_cache_dir, signature checked before any weight is read), or "
                                       "file://PATH; unset serves the default (demo) model")
    model_cache_dir: str | None = _setting(None, "local copies of object-store models, one folder per listing "
                                                 "(keys, sizes, ETags); default: ~/.cache/tessera/models")
    served_model_name: str | None = _setting(
        None, "model name the API answers to; default: the folder's name, 'demo' for the default model")
    dtype: str = _setting("float32", "weight and activation dtype: float32 or bfloat16")
    quantization: str | None = _setting(
        None, "fp8: the layers' weights quantized to float8 e4m3 at load, a scale per output channel, activations "
              "per token (vLLM's spelling; one device, XLA's products; embedding and head stay in dtype); "
              "default: none")
    tensor_parallel: int = _setting(1, "devices to shard heads, MLP and KV cache over")
    attention: str | None = _setting(
        None, "attention implementation: pallas (the GPU kernel), cpu (the C++ CPU kernel), reference "
              "(XLA, any device) or pallas_interpret (the kernel interpreted, slow); default: pallas on GPUs, "
              "cpu on CPUs (reference if it cannot be built)")
    linear: str | None = _setting(
        None, "weight products: packed (bfloat16 weights packed for the C++ CPU kernel, every row count), cpu "
              "(the C++ kernel for decode-sized products, XLA for prompts) or xla; default: packed for a bfloat16 "
              "model on one CPU whose weights pack, cpu on one CPU, else xla",
        aliases={"TESSERA_CPU_LINEAR": {"0": "xla", "1": None}})
    # -- the engine ---------------------------------------------------------------------------
    max_num_seqs: int = _setting(16, "sequences the engine runs in one step")
    max_model_len: int | None = _setting(None, "prompt plus output tokens per sequence; default: the model's")
    max_num_batched_tokens: int = _setting(512, "token budget of one engine step (prefill chunks + decodes)")
    block_size: int = _setting(16, "tokens per KV cache page")
    gpu_memory_utilization: float = _setting(
        0.9, "fraction of the device's memory for weights, activations and KV cache (vLLM's meaning): on a "
             "device that reports its memory (GPUs) the KV cache takes what is left after the weights and the "
             "largest step's workspace, and jax's pool is set to this fraction (XLA_PYTHON_CLIENT_MEM_FRACTION, "
             "unless set); the CPU keeps kv_cache_memory_gib's size. A hot reload needs room for a second "
             "copy of the weights: lower it for that")
    kv_cache_memory_gib: float | None = _setting(
        None, "memory for the KV cache, GiB, on any device (ignored when num_blocks is set); default: by "
              "gpu_memory_utilization where the device reports its memory, else 2")
    num_blocks: int | None = _setting(None, "KV cache pages; default: sized as kv_cache_memory_gib says")
    enable_prefix_caching: bool = _setting(True, "reuse KV pages of prompt prefixes seen before")
    async_scheduling: bool = _setting(True, "plan and dispatch each engine step while the previous one runs "
                                            "(tokens reach the host one step late); off runs steps in series")
    max_kv_events: int = _setting(10_000, "KV cache events (stored, removed, cleared) kept for consumers; "
                                          "beyond it the oldest are dropped and counted")
    token_buckets: str | None = _setting(None, "comma-separated padded token counts to compile; default: powers of two")
    kv_disk_dir: str | None = _setting(None, "folder of the disk KV tier: cached pages are also kept in host memory "
                                             "and block files there, survive restarts and load back on a prefix "
                                             "hit; unset: the device's cache only")
    kv_host_gib: float = _setting(1.0, "host memory KV tier, GiB (with kv_disk_dir)")
    kv_disk_gib: float = _setting(16.0, "disk KV tier, GiB of block files (with kv_disk_dir)")
    cpu_fallback: str = _setting("auto", "when the accelerator's engine fails: serve small prompts with the same "
                                         "model on the CPU; warm (built at start), lazy (built on failure), off; "
                                         "auto: lazy on an accelerator, off on a CPU")
    cpu_fallback_max_prompt_tokens: int = _setting(256, "largest prompt served on the CPU fallback; larger ones "
                                                        "get 503 with Retry-After while the accelerator is out")
    cpu_fallback_probe_interval_s: float = _setting(10.0, "seconds between probes of a failed accelerator")
    warm_up: bool = _setting(True, "compile every shape bucket before accepting requests")
    compilation_cache_dir: str | None = _setting(None, "persistent XLA compilation cache; default: ~/.cache/tessera/xla")
    # -- LoRA adapters and hot reload (BUILD_NOTES "Multi-LoRA and hot reload") -----------------
    max_loras: int = _setting(0, "LoRA adapters on the device at once (more stay in host memory, swapped in by LRU); "
                                 "0 serves no adapters")
    max_lora_rank: int = _setting(16, "the largest LoRA rank an adapter may have")
    lora_kernel: str | None = _setting(
        None, "LoRA products: pallas (the gathered BGMV/SGMV kernels, GPUs), xla (any device) or pallas_interpret "
              "(the kernels interpreted, slow); default: pallas on GPUs when the model's widths are multiples of 16 "
              "and the max LoRA rank a power of two, else xla")
    lora_modules: str | None = _setting(None, "adapters to load at start-up, e.g. 'sql=/adapters/sql,chat=/a/chat'")
    reload_drain_timeout_s: float = _setting(120.0, "model reload: seconds to wait for running requests to finish "
                                                    "before switching (the old model keeps serving past it)")
    # -- admission and shutdown ---------------------------------------------------------------
    max_queue: int = _setting(64, "requests that may wait beyond max_num_seqs running ones; more get 429")
    drain_timeout_s: float = _setting(30.0, "on SIGTERM, seconds to let in-flight requests finish")
    max_body_bytes: int = _setting(4 * 2**20, "largest request body accepted, bytes; larger gets 413")
    max_prompt_bytes: int = _setting(2 * 2**20, "largest prompt text of one request, UTF-8 bytes (all its prompts, "
                                                "or its messages' text); larger gets 400 before tokenizing")
    max_prompt_tokens: int | None = _setting(None, "largest prompt of one request, tokens (also for /tokenize); "
                                                   "default: only the model's context limits generation")
    tokenizer_workers: int | None = _setting(None, "processes that tokenize and render chat templates off the "
                                                   "event loop; default: one per CPU core")
    # -- slow clients (a connection that sends too slowly is closed; 408 when it is mid-request) ------
    header_timeout_s: float = _setting(10.0, "seconds a client has to send a request's headers, from its first byte")
    body_timeout_s: float = _setting(60.0, "seconds a client has to send a request's body, after its headers")
    idle_timeout_s: float = _setting(5.0, "seconds an idle connection stays open, before its first request and "
                                          "between keep-alive requests")
    # -- logs, traces, debug ------------------------------------------------------------------
    log_level: str = _setting("info", "log level: debug, info, warning or error")
    log_json: bool = _setting(True, "write logs as JSON lines")
    log_file: str | None = _setting(None, "also write logs to this file, rotated by size")
    log_max_bytes: int = _setting(100 * 2**20, "rotate the log file at this size, bytes")
    log_backup_count: int = _setting(5, "rotated log files to keep")
    log_prompts: bool = _setting(False, "show prompt and completion text in logs and /debug/requests (debug only)")
    log_sample_ratio: float = _setting(1.0, "share of access-log lines kept for tenants not listed below")
    log_tenant_sample_ratios: str | None = _setting(None, "per-tenant access-log sampling, e.g. 'acme=0.1,beta=1'")
    otlp_endpoint: str | None = _setting(None, "OpenTelemetry OTLP endpoint for traces; unset: no export")
    debug_requests: int = _setting(256, "recent requests kept for /debug/requests")
    # -- identity and access (TESSERA_API_KEY, never a flag, bootstraps one admin key) ----------
    auth: str = _setting("auto", "auto, on or off; auto: on when TESSERA_API_KEY, a key store or an issuer is set")
    key_store: str | None = _setting(None, "API key store: a file path (one node) or a redis:// URL (replicas)")
    admin_tenant: str = _setting("default", "tenant of the TESSERA_API_KEY admin key")
    oidc_issuer: str | None = _setting(None, "OpenID Connect issuer URL whose bearer JWTs are accepted")
    oidc_audience: str | None = _setting(None, "audience (aud) those tokens must carry; required with oidc_issuer")
    oidc_tenant_claim: str = _setting("tenant", "claim (dotted path) holding the tenant")
    oidc_scopes_claim: str = _setting("scope", "claim holding the scopes (space-separated or a list)")
    oidc_default_tenant: str | None = _setting(None, "tenant for tokens without the tenant claim; unset: refused")
    workload_issuer: str | None = _setting(None, "workload identity issuer (e.g. Kubernetes) for service tokens")
    workload_audience: str | None = _setting(None, "the exact audience service tokens must carry")
    workload_tenant_claim: str = _setting("tenant", "claim holding a service token's tenant, e.g. kubernetes.io.namespace")
    workload_default_tenant: str | None = _setting(None, "tenant for service tokens without the claim; unset: refused")
    workload_scopes: str = _setting("generate", "scopes every valid service token gets, comma-separated")
    jwt_leeway_s: float = _setting(30.0, "clock skew allowed when checking exp and nbf, seconds")
    # -- rate limits (token buckets; requests and tokens per minute) -----------------------------
    redis_url: str | None = _setting(None, "Redis shared by replicas for rate limits; unset: in this process")
    rate_limit_rpm: int | None = _setting(None, "requests per minute per tenant; unset: unlimited")
    rate_limit_tpm: int | None = _setting(None, "tokens (prompt + completion) per minute per tenant")
    tenant_rate_limits: str | None = _setting(None, "per-tenant overrides, e.g. 'acme=600:100000,beta=60:' (RPM:TPM)")
    key_rate_limit_rpm: int | None = _setting(None, "requests per minute per API key or token subject")
    key_rate_limit_tpm: int | None = _setting(None, "tokens per minute per API key or token subject")
    rate_limit_fail: str = _setting("open", "when Redis is unreachable: open (serve unlimited) or closed (503)")
    # -- audit log -----------------------------------------------------------------------------
    audit_file: str | None = _setting(None, "audit log file (JSON lines, mode 0600, rotated by size)")
    audit_max_bytes: int = _setting(100 * 2**20, "rotate the audit file at this size, bytes")
    audit_backup_count: int = _setting(10, "rotated audit files to keep")
    audit_stdout: bool = _setting(False, "also write audit lines to stdout")
    audit_http_url: str | None = _setting(None, "SIEM endpoint receiving audit lines as NDJSON POSTs "
                                                "(TESSERA_AUDIT_HTTP_TOKEN is sent as a bearer token)")
    audit_encrypt_rotated: bool = _setting(False, "encrypt rotated audit files at rest under data keys from --kms")
    # -- trust and policy ----------------------------------------------------------------------
    verify_key: str | None = _setting(None, "ECDSA P-256 public key (PEM): the model must match its signature "
                                            "(model.sig) before any weight is loaded")
    allow_unsigned: bool = _setting(False, "serve a model without a verified signature (development; audited)")
    guardrails: str | None = _setting(None, "guardrail policy per tenant: a JSON or TOML file, or inline JSON")
    trusted_proxies: str | None = _setting(None, "proxies whose X-Forwarded-* headers are believed, e.g. "
                                                 "'10.0.0.0/8,127.0.0.1'; unset: none")
    kms: str | None = _setting(None, "KMS for data keys: local:PATH (a 32-byte key file) or "
                                     "aws-kms:KEY[?region=R&endpoint=URL]")
    # -- admin UI (/ui) --------------------------------------------------------------------------
    ui: bool = _setting(True, "serve the admin web UI under /ui (same auth and scopes as the API)")
    ui_oidc_client_id: str | None = _setting(
        None, "client id the UI logs in with at oidc_issuer (authorization code + PKCE, a public client whose "
              "redirect URI is <server>/ui/login/callback); unset: the UI takes API keys only")
    ui_oidc_scopes: str = _setting("openid read generate", "scopes the UI's OIDC login asks for")
    ui_oidc_resource: str | None = _setting(None, "resource indicator (RFC 8707) the UI's login asks for, "
                                                  "when the issuer needs one to set the token's audience")
    ui_transcripts_dir: str | None = _setting(None, "where playground transcripts are saved (one folder per "
                                                    "caller); default: ~/.local/share/tessera/transcripts")

    # -- scale-out: `tessera worker` and `tessera gateway` (BUILD_NOTES "Scale-out") ----------------
    etcd: str | None = _setting(None, "etcd client endpoint host:port: workers register there, gateways discover them")
    grpc_port: int = _setting(50051, "worker: gRPC port to listen on (0: any free port)")
    advertise_address: str | None = _setting(None, "worker: host:port gateways dial; default: host and grpc_port")
    worker_id: str | None = _setting(None, "worker: its id in the registry; default: the host name, the process id and a random suffix")
    pool: str = _setting("default", "worker: the pool it serves in (weights and drain are per pool, in etcd)")
    region: str = _setting("local", "worker: its region label (a pool per region gives active/active)")
    mig_device: str | None = _setting(None, "worker: GPU or MIG slice UUID to run on (sets CUDA_VISIBLE_DEVICES)")
    lease_ttl_s: float = _setting(2.0, "worker: etcd lease TTL, seconds; its record vanishes this long after a crash")
    grpc_tls_cert: str | None = _setting(None, "PEM certificate: the worker's server certificate, the gateway's "
                                               "client certificate; unset: plaintext gRPC")
    grpc_tls_key: str | None = _setting(None, "PEM private key of grpc_tls_cert")
    grpc_tls_ca: str | None = _setting(None, "PEM CA bundle the peer's certificate must chain to (mutual TLS)")
    route_decode_cost: float = _setting(16.0, "gateway: routing cost of a running request, in prompt tokens")
    route_queue_cost: float = _setting(256.0, "gateway: routing cost of a request queued beyond max_num_seqs, "
                                              "in prompt tokens")
    route_policy: str = _setting("kv", "gateway: kv (cached prefix + load) or round_robin")
    stats_interval_s: float = _setting(0.5, "gateway: seconds between polls of each worker's stats and health")
    stale_after_s: float = _setting(3.0, "gateway: a worker's numbers older than this mark autoscale hints stale")
    autoscale_target: float = _setting(0.75, "gateway: saturation (queue depth, KV pressure) a pool should run at")

    def __post_init__(self):
        _require(1 <= self.port <= 65535 or self.port == 0, "port", self.port, "must be in [0, 65535]")
        _require(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "must be float32 or bfloat16")
        _require(self.tensor_parallel >= 1, "tensor_parallel", self.tensor_parallel, "must be >= 1")
        _require(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "kv_cache_memory_gib",
                 self.kv_cache_memory_gib, "must be > 0")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
                 "must be in (0, 1]")
        _require(self.quantization in (None, *QUANTIZATIONS), "quantization", self.quantization,
                 f"must be one of {', '.join(QUANTIZATIONS)} (or unset)")
        _require(self.max_queue >= 0, "max_queue", self.max_queue, "must be >= 0")
        _require(self.drain_timeout_s >= 0, "drain_timeout_s", self.drain_timeout_s, "must be >= 0")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes, "must be >= 1024")
        _require(self.max_prompt_bytes >= 1, "max_prompt_bytes", self.max_prompt_bytes, "must be >= 1")
        _require(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
                 self.max_prompt_tokens, "must be >= 1")
        _require(self.tokenizer_workers is None or self.tokenizer_workers >= 1, "tokenizer_workers",
                 self.tokenizer_workers, "must be >= 1")
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        _require(self.max_kv_events >= 0, "max_kv_events", self.max_kv_events, "must be >= 0")
        _require(self.kv_host_gib >= 0, "kv_host_gib", self.kv_host_gib, "must be >= 0")
        _require(self.kv_disk_gib > 0, "kv_disk_gib", self.kv_disk_gib, "must be > 0")
        _require(self.cpu_fallback in ("auto", "warm", "lazy", "off"), "cpu_fallback", self.cpu_fallback,
                 "must be auto, warm, lazy or off")
        _require(self.cpu_fallback_max_prompt_tokens >= 0, "cpu_fallback_max_prompt_tokens",
                 self.cpu_fallback_max_prompt_tokens, "must be >= 0")
        _require(self.cpu_fallback_probe_interval_s > 0, "cpu_fallback_probe_interval_s",
                 self.cpu_fallback_probe_interval_s, "must be > 0")
        _require(self.log_level in LOG_LEVELS, "log_level", self.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
        _require(self.attention in (None, *ATTENTION_BACKENDS), "attention", self.attention,
                 f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        _require(self.linear in (None, *LINEAR_IMPLS), "linear", self.linear, f"must be one of {', '.join(LINEAR_IMPLS)}")
        _require(self.lora_kernel in (None, *LORA_KERNELS), "lora_kernel", self.lora_kernel,
                 f"must be one of {', '.join(LORA_KERNELS)}")
        _require(0 <= self.log_sample_ratio <= 1, "log_sample_ratio", self.log_sample_ratio, "must be in [0, 1]")
        _require(0 <= self.grpc_port <= 65535, "grpc_port", self.grpc_port, "must be in [0, 65535]")
        _require(self.lease_ttl_s >= 1, "lease_ttl_s", self.lease_ttl_s, "must be >= 1 (etcd's granularity)")
        _require(self.route_policy in ("kv", "round_robin"), "route_policy", self.route_policy,
                 "must be kv or round_robin")
        _require(bool(self.grpc_tls_cert) == bool(self.grpc_tls_key), "grpc_tls_key", self.grpc_tls_key,
                 "is required with grpc_tls_cert, and only with it")
        _require(0 < self.autoscale_target <= 1, "autoscale_target", self.autoscale_target, "must be in (0, 1]")
        _require(self.stats_interval_s > 0, "stats_interval_s", self.stats_interval_s, "must be > 0")
        _require(self.debug_requests >= 0, "debug_requests", self.debug_requests, "must be >= 0")
        _require(self.reload_drain_timeout_s > 0, "reload_drain_timeout_s", self.reload_drain_timeout_s, "must be > 0")
        self.lora_module_paths()
        self.tenant_sample_ratios()  # parse once, so a malformed value fails at start-up
        self._check_access()
        self.engine_config()

    def _check_access(self) -> None:
        from serving.auth.oidc import check_issuer_url
        from serving.auth.principal import parse_scopes
        from serving.ratelimit.buckets import parse_tenant_limits

        _require(self.auth in ("auto", "on", "off"), "auth", self.auth, "must be auto, on or off")
        _require(self.rate_limit_fail in ("open", "closed"), "rate_limit_fail", self.rate_limit_fail,
                 "must be open or closed")
        for issuer, audience in (("oidc_issuer", "oidc_audience"), ("workload_issuer", "workload_audience")):
            if getattr(self, issuer):
                check_issuer_url(getattr(self, issuer))
                _require(bool(getattr(self, audience)), audience, getattr(self, audience),
                         f"is required with {issuer}")
        for name in ("rate_limit_rpm", "rate_limit_tpm", "key_rate_limit_rpm", "key_rate_limit_tpm"):
            _require(getattr(self, name) is None or getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        _require(self.jwt_leeway_s >= 0, "jwt_leeway_s", self.jwt_leeway_s, "must be >= 0")
        parse_tenant_limits(self.tenant_rate_limits)
        parse_scopes(self.workload_scopes)
        _require(not self.ui_oidc_client_id or bool(self.oidc_issuer), "ui_oidc_client_id", self.ui_oidc_client_id,
                 "needs oidc_issuer")
        self._check_trust()

    def _check_trust(self) -> None:
        """Syntax only: key files, policy files and the KMS are opened at start-up."""
        from serving.forwarded import TrustedProxies

        try:
            TrustedProxies.parse(self.trusted_proxies)
        except ValueError as e:
            raise ValueError(f"trusted_proxies={self.trusted_proxies!r}: {e}") from None
        _require(not self.audit_encrypt_rotated or bool(self.kms), "audit_encrypt_rotated",
                 self.audit_encrypt_rotated, "needs --kms")
        _require(not self.audit_encrypt_rotated or bool(self.audit_file), "audit_encrypt_rotated",
                 self.audit_encrypt_rotated, "needs --audit-file")
        _require(self.kms is None or self.kms.partition(":")[0] in ("local", "aws-kms"), "kms", self.kms,
                 "must be local:PATH or aws-kms:KEY")

    # -- derived settings ---------------------------------------------------------------------

    def engine_config(self) -> EngineConfig:
        buckets = None
        if self.token_buckets:
            try:
                buckets = tuple(int(b) for b in self.token_buckets.split(","))
            except ValueError:
                raise ValueError(f"token_buckets={self.token_buckets!r} must be comma-separated integers") from None
        return EngineConfig(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            # An explicit size wins over the device's memory, as vLLM's --kv-cache-memory does.
            kv_cache_memory_bytes=int((self.kv_cache_memory_gib or DEFAULT_KV_CACHE_GIB) * 2**30),
            gpu_memory_utilization=None if self.kv_cache_memory_gib else self.gpu_memory_utilization,
            quantization=self.quantization,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            async_scheduling=self.async_scheduling,
            max_kv_events=self.max_kv_events,
            token_buckets=buckets,
            attention_backend=self.attention,
            linear=self.linear,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            lora_kernel=self.lora_kernel,
        )

    def lora_module_paths(self) -> dict[str, str]:
        """--lora-modules as name -> folder."""
        modules = {}
        for item in filter(None, (x.strip() for x in (self.lora_modules or "").split(","))):
            name, sep, path = item.partition("=")
            _require(bool(sep and name.strip() and path.strip()), "lora_modules", item, "must be NAME=PATH")
            modules[name.strip()] = path.strip()
        _require(not modules or self.max_loras > 0, "lora_modules", self.lora_modules, "needs --max-loras >= 1")
        return modules

    def tenant_sample_ratios(self) -> dict[str, float]:
        ratios: dict[str, float] = {}
        for item in filter(None, (self.log_tenant_sample_ratios or "").split(",")):
            tenant, sep, value = item.partition("=")
            try:
                ratio = float(value)
            except ValueError:
                ratio = -1.0
            _require(bool(sep and tenant) and 0 <= ratio <= 1, "log_tenant_sample_ratios", item,
                     "must be tenant=ratio pairs with ratios in [0, 1]")
            ratios[tenant.strip()] = ratio
        return ratios

    # -- flags and environment ----------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; an unset flag leaves the field to the environment or the default."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata['help']} [{variables_help(f.name)}; default: {f.default}]"
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                    help=help_text)
            else:
                parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                                    metavar=f.name.upper())

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
                     **overrides) -> ServerConfig:
        """Flags, then `TESSERA_*` variables, then defaults; `overrides` win over all three."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            if args is not None and hasattr(args, f.name):
                values[f.name] = getattr(args, f.name)
            else:
                values.update(_from_environment(f, hints[f.name], environ))
        return cls(**(values | overrides))


def environment_setting(name: str, environ: Mapping[str, str] | None = None):
    """A field's value as the environment sets it (its variable, else an alias), or None: for
    commands that take a few of these settings as flags of their own (`tessera generate`)."""
    f = next(f for f in fields(ServerConfig) if f.name == name)
    return _from_environment(f, typing.get_type_hints(ServerConfig)[name], os.environ if environ is None else environ
                             ).get(name)


def _from_environment(f, hint, environ: Mapping[str, str]) -> dict:
    if env_name(f.name) in environ:
        return {f.name: _parse_env(f.name, environ[env_name(f.name)], hint)}
    for var, values in f.metadata["aliases"].items():
        if var in environ:
            if environ[var] not in values:
                raise ValueError(f"{var}={environ[var]!r} must be one of {', '.join(values)}")
            return {} if values[environ[var]] is None else {f.name: values[environ[var]]}
    return {}


def variables_help(name: str) -> str:
    """The field's variable, and its aliases with what their values mean."""
    aliases = next(f for f in fields(ServerConfig) if f.name == name).metadata["aliases"]
    return "; ".join([env_name(name), *(
        f"alias {var}: " + ", ".join(f"{raw} = {'the default' if value is None else value}" for raw, value in values.items())
        for var, values in aliases.items())])


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(hint) -> type:
    """`int | None` -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_env(name: str, raw: str, hint):
    kind = _base_type(hint)
    if raw == "" and kind is not str and type(None) in typing.get_args(hint):
        return None
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{env_name(name)}={raw!r} must be true or false")
        return lowered in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(name)}={raw!r} must be {kind.__name__}") from None


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")

