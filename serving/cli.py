"""The `tessera` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight and activation dtype")
    p.add_argument("--tensor-parallel", type=int, default=1, help="devices to shard heads and MLP over")


def _build_parser() -> argparse.ArgumentParser:
    from serving.config import ServerConfig, variables_help

    parser = argparse.ArgumentParser(prog="tessera", description="Tessera: LLM inference on JAX/XLA.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the text as it is generated")
    _add_model_flags(gen)
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompts-file", help="JSONL file of prompts to run through the engine at once")
    gen.add_argument("--max-num-seqs", type=int, default=16, help="sequences the engine runs together")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    for name in ("attention", "linear"):  # the execution plan's two choices, as `tessera serve` takes them
        gen.add_argument("--" + name, help=f"as `tessera serve --{name}` [{variables_help(name)}; default: by device]")
    gen.add_argument("--quantization", choices=["fp8"], help="as `tessera serve --quantization`; default: none")

    conv = sub.add_parser("convert", help="convert a checkpoint to Tessera's orbax layout for faster loads")
    conv.add_argument("--model", required=True, help="Hugging Face model folder")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])

    serve = sub.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve the OpenAI-compatible HTTP API. Every setting is a flag and a TESSERA_* environment "
                    "variable; a flag wins over the variable, which wins over the default. SIGTERM drains: new "
                    "requests get 503 while in-flight ones finish (up to --drain-timeout-s).",
    )
    ServerConfig.add_arguments(serve)
    worker = sub.add_parser(
        "worker", help="serve the engine over gRPC to gateways, registered in etcd",
        description="Load the model as `tessera serve` does and serve it over gRPC (Generate, Abort, Stats, "
                    "KvEvents, grpc.health.v1) on --grpc-port; with --etcd, register under a lease. Takes "
                    "serve's settings; the scale-out ones are marked 'worker:'. SIGTERM leaves the registry, "
                    "then drains.")
    ServerConfig.add_arguments(worker)
    gateway = sub.add_parser(
        "gateway", help="the HTTP API in front of the workers registered in etcd",
        description="The OpenAI API, auth, rate limits and guardrails of `tessera serve`, without an engine: "
                    "requests go to the workers found in etcd (--etcd), by KV-aware cost within pools chosen "
                    "by weight. Takes serve's settings; the scale-out ones are marked 'gateway:'.")
    ServerConfig.add_arguments(gateway)

    _add_client(sub, "complete", "stream one completion from a server").add_argument("prompt", help="prompt text")
    chat = _add_client(sub, "chat", "chat with a server interactively, streaming the answers")
    chat.add_argument("--system", help="system message that starts the conversation")
    chat.add_argument("--transcript", help="append every message to this file as JSON lines")
    models = _add_client(sub, "models", "list the models a server serves; or keygen, sign, verify a model folder",
                         sampling=False)
    from ops.model_signing import add_commands

    add_commands(models.add_subparsers(dest="models_command", required=False,
                                       title="model signing (no subcommand: list a server's models)"))
    _add_client(sub, "health", "check that a server is alive and ready (exit 1 if not ready)", sampling=False)
    _add_identity_commands(sub)
    _add_ui_commands(sub)
    _add_replay_command(sub)
    return parser


def _add_ui_commands(sub) -> None:
    top = _add_client(sub, "top", "a live table of a server's health figures (the admin UI's Health page)",
                      sampling=False)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    top.add_argument("--iterations", type=int, help="stop after this many updates (default: until Ctrl-C)")
    play = sub.add_parser("playback", help="replay a transcript or captured SSE log at its recorded token timing")
    play.add_argument("file", help="a transcript (JSON lines, as `tessera chat --transcript` writes) or an SSE log")
    play.add_argument("--speed", type=float, default=1.0, help="playback speed, 0.1 to 16 (2 = twice as fast)")
    transcripts = sub.add_parser("transcripts", help="the transcripts the admin UI's playground saved for you")
    transcripts_sub = transcripts.add_subparsers(dest="transcripts_command", required=True)
    _add_client(transcripts_sub, "list", "list your saved transcripts, newest first", sampling=False)
    show = _add_client(transcripts_sub, "show", "print a saved transcript (by id) or a local transcript file",
                       sampling=False)
    show.add_argument("transcript", help="a transcript id from `tessera transcripts list`, or a file")
    show.add_argument("--jsonl", action="store_true", help="print the JSON lines as stored")


def _replay_module():
    """The trace replay lives in perf/, which a source checkout has and the wheel does not."""
    root = str(Path(__file__).resolve().parents[1])
    if (Path(root) / "perf" / "replay").is_dir() and root not in sys.path:
        sys.path.append(root)
    import perf.replay.cli

    return perf.replay.cli


def _add_replay_command(sub) -> None:
    replay = sub.add_parser("replay", help="replay a request trace against a server and report latency percentiles",
                            description="Replay an Azure or Mooncake trace against a server or gateway with the "
                                        "trace's arrival times; report TTFT, TPOT, ITL, E2E latency, throughput and "
                                        "goodput (JSON, Markdown, PNG); --compare fails on a regression.")
    try:
        _replay_module().add_arguments(replay)
    except ImportError:  # installed from the wheel: listed, and says why it cannot run
        replay.add_argument("rest", nargs=argparse.REMAINDER)


def _replay(args: argparse.Namespace) -> int:
    try:
        module = _replay_module()
    except ImportError as e:
        raise ValueError(f"replay needs perf/ from a Tessera source checkout ({e})") from None
    return module.run(args)


def _add_identity_commands(sub) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys on a running server (scope admin)")
    key_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = _add_client(key_sub, "create", "create an API key; the key is printed once, alone on the last line",
                         sampling=False)
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--scopes", required=True, help="comma-separated: admin, read, generate, adapter-manager")
    create.add_argument("--expires-in", help="lifetime, e.g. 30d, 12h, 90m (default: no expiry)")
    create.add_argument("--name", help="a label shown in listings")
    create.add_argument("--rpm", type=int, help="the key's own requests-per-minute limit")
    create.add_argument("--tpm", type=int, help="the key's own tokens-per-minute limit")
    listing = _add_client(key_sub, "list", "list API keys (never the keys themselves)", sampling=False)
    listing.add_argument("--tenant", help="only this tenant's keys")
    _add_client(key_sub, "revoke", "revoke an API key", sampling=False).add_argument("key_id", help="the key's id")
    adapters = sub.add_parser("adapters", help="load, unload and list LoRA adapters on a running server")
    adapter_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    load = _add_client(adapter_sub, "load", "load a PEFT LoRA adapter folder (on the server's disk) under a name "
                                            "(scope adapter-manager)", sampling=False)
    load.add_argument("name", help="the model name requests will use")
    load.add_argument("path", help="the adapter folder, as the server sees it")
    _add_client(adapter_sub, "unload", "stop serving an adapter (scope adapter-manager)",
                sampling=False).add_argument("name", help="the adapter's name")
    _add_client(adapter_sub, "list", "adapters, their slots, hits and load times (scope read)", sampling=False)
    _add_client(sub, "whoami", "show the subject, tenant and scopes the server sees for your credentials",
                sampling=False)

    login = sub.add_parser("login", help="log in with OpenID Connect; tokens are cached (0600) and refreshed",
                           description="Log in with OpenID Connect: the authorization-code flow with PKCE on a "
                                       "127.0.0.1 redirect, or the device flow. Tokens are cached in "
                                       "TESSERA_TOKEN_CACHE (default ~/.config/tessera/tokens.json, mode 0600) "
                                       "and refreshed when they expire; client commands send them when "
                                       "TESSERA_API_KEY is not set.")
    login.add_argument("--issuer", required=True, help="the issuer URL")
    login.add_argument("--client-id", required=True, help="the client registered for the CLI (a public client)")
    login.add_argument("--scopes", default=None, help="scopes to ask for (default: openid offline_access generate read)")
    login.add_argument("--flow", choices=["auto", "browser", "device"], default="auto",
                       help="auto: the device flow on a headless machine when offered, else the browser")
    login.add_argument("--resource", help="resource indicator (RFC 8707) for the access token's audience")
    sub.add_parser("logout", help="forget the cached login tokens")


def _add_client(sub, name: str, help_text: str, sampling: bool = True) -> argparse.ArgumentParser:
    from serving.client import DEFAULT_URL

    p = sub.add_parser(name, help=help_text, description=f"{help_text}. Sends TESSERA_API_KEY as a bearer token, else the token `tessera login` cached.")
    p.add_argument("--url", default=os.environ.get("TESSERA_URL", DEFAULT_URL),
                   help=f"server URL [TESSERA_URL; default: {DEFAULT_URL}]")
    if sampling:
        p.add_argument("--model", help="model name (default: the server's)")
        p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
        p.add_argument("--seed", type=int, help="random seed for sampling")
    return p


def _sampling_body(args: argparse.Namespace) -> dict:
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.model:
        body["model"] = args.model
    if args.seed is not None:
        body["seed"] = args.seed
    return body


def _serve(args: argparse.Namespace) -> int:
    from serving.config import ServerConfig
    from serving.server import serve

    from ops.kms import KMSError
    from ops.model_signing import ModelSignatureError
    from serving.model_store import ModelStoreError

    try:
        return serve(ServerConfig.from_sources(args))
    except ModelSignatureError as e:  # names the changed, extra or missing file
        print(f"tessera serve: refused to load the model: {e}", file=sys.stderr)
        return 2
    except ModelStoreError as e:  # names the object
        print(f"tessera serve: cannot fetch the model: {e}", file=sys.stderr)
        return 2
    except KMSError as e:
        print(f"tessera serve: error: {e}", file=sys.stderr)
        return 2


def _worker(args: argparse.Namespace) -> int:
    from serving.config import ServerConfig
    from serving.worker import worker_main

    return worker_main(ServerConfig.from_sources(args))


def _gateway(args: argparse.Namespace) -> int:
    from serving.config import ServerConfig
    from serving.gateway import gateway_main

    return gateway_main(ServerConfig.from_sources(args))


def _models_signing(args: argparse.Namespace) -> int:
    from ops.model_signing import run_command

    return run_command(args.models_command, args, prefix=f"tessera models {args.models_command}: ")


def _client_command(args: argparse.Namespace) -> int:
    from serving import admin_client, client

    command = f"keys {args.keys_command}" if args.command == "keys" else args.command
    command = f"transcripts {args.transcripts_command}" if args.command == "transcripts" else command
    command = f"adapters {args.adapters_command}" if args.command == "adapters" else command
    try:
        if args.command == "transcripts" and args.transcripts_command == "show" and Path(args.transcript).is_file():
            from serving import ui_client

            return ui_client.show_transcript(args.url, args.transcript, args.jsonl)  # a local file: no server
        admin_client.require_scope(args.url, command)
        if args.command in ("top", "transcripts"):
            return _ui_command(args)
        if args.command == "keys":
            return _keys_command(args)
        if args.command == "adapters":
            return _adapters_command(args)
        if args.command == "whoami":
            me = admin_client.whoami(args.url) or {}
            print("\n".join(f"{k}: {','.join(v) if isinstance(v, list) else v}" for k, v in me.items()))
            return 0
        if args.command == "complete":
            client.complete(args.url, args.prompt, _sampling_body(args))
            return 0
        if args.command == "chat":
            transcript = Path(args.transcript) if args.transcript else None
            return client.chat(args.url, _sampling_body(args), system=args.system, transcript=transcript)
        if args.command == "models":
            return client.models(args.url)
        return client.health(args.url)
    except client.ClientError as e:
        print(f"tessera {command}: error: {e}", file=sys.stderr)
        return 1


def _ui_command(args: argparse.Namespace) -> int:
    from serving import ui_client

    if args.command == "top":
        return ui_client.top(args.url, args.interval, args.iterations)
    if args.transcripts_command == "list":
        return ui_client.list_transcripts(args.url)
    return ui_client.show_transcript(args.url, args.transcript, args.jsonl)


def _playback(args: argparse.Namespace) -> int:
    from serving import ui_client
    from serving.ui.transcripts import TranscriptError

    try:
        return ui_client.playback(Path(args.file), args.speed)
    except TranscriptError as e:
        print(f"tessera playback: error: {args.file}: {e}", file=sys.stderr)
        return 2


def _keys_command(args: argparse.Namespace) -> int:
    from serving import admin_client

    if args.keys_command == "create":
        admin_client.create_key(args.url, args.tenant, args.scopes, expires_in=args.expires_in, name=args.name,
                                rpm=args.rpm, tpm=args.tpm)
        return 0
    if args.keys_command == "list":
        return admin_client.list_keys(args.url, args.tenant)
    return admin_client.revoke_key(args.url, args.key_id)


def _adapters_command(args: argparse.Namespace) -> int:
    from serving import admin_client

    if args.adapters_command == "load":
        return admin_client.load_adapter(args.url, args.name, args.path)
    if args.adapters_command == "unload":
        return admin_client.unload_adapter(args.url, args.name)
    return admin_client.list_adapters(args.url)


def _login(args: argparse.Namespace) -> int:
    from serving.auth.login import DEFAULT_SCOPES, LoginError, login

    try:
        entry = login(args.issuer, args.client_id, scopes=args.scopes or DEFAULT_SCOPES, flow=args.flow,
                      resource=args.resource)
    except LoginError as e:
        print(f"tessera login: error: {e}", file=sys.stderr)
        return 1
    print(f"logged in to {entry['issuer']}; scopes: {entry.get('scope') or 'as granted'}", file=sys.stderr)
    return 0


def _logout(args: argparse.Namespace) -> int:
    from serving.auth.tokens import forget_tokens

    print("logged out" if forget_tokens() else "not logged in", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from runtime.compile_cache import enable_compilation_cache
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams
    from serving.config import environment_setting

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt and --prompts-file")
    defaults = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    enable_compilation_cache()
    _warn_if_bfloat16_on_cpu(args.dtype)
    config = EngineConfig(max_num_seqs=args.max_num_seqs,
                          attention_backend=args.attention or environment_setting("attention"),
                          linear=args.linear or environment_setting("linear"),
                          quantization=args.quantization or environment_setting("quantization"))
    engine = Engine.from_model_dir(args.model, args.dtype, config, tensor_parallel=args.tensor_parallel)
    if args.prompts_file is not None:
        return _generate_many(engine, Path(args.prompts_file), defaults)
    prompt: str | list[int] = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request(prompt, SamplingParams(**defaults), request_id="cli")
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write("".join(o.text for o in out.outputs))
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _warn_if_bfloat16_on_cpu(dtype: str) -> None:
    import jax

    if dtype == "bfloat16" and jax.default_backend() == "cpu":
        print(
            "tessera: warning: bfloat16 on the CPU backend is emulated by XLA and ~10x slower than "
            "float32 (see perf/results/engine_cpu.md); use --dtype float32 on CPU",
            file=sys.stderr,
        )


_PROMPT_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                  "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "n")


def _generate_many(engine, path: Path, defaults: dict) -> int:
    """Every line of a JSONL file is a prompt ({"prompt": text} or {"prompt_token_ids": [...]},
    optional "id" and sampling fields); all run through the engine at once. Prints one JSON
    line per prompt, in file order."""
    import json

    from runtime.request import SamplingParams

    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"] if "prompt" in item else item["prompt_token_ids"]
            fields = {**defaults, **{k: item[k] for k in _PROMPT_FIELDS if k in item}}
            for key in ("stop", "stop_token_ids"):
                if key in fields:
                    fields[key] = (fields[key],) if isinstance(fields[key], str) else tuple(fields[key])
            request = engine.make_request(prompt, SamplingParams(**fields), request_id=str(item.get("id", number)))
        except (KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: {e}") from e
        engine.add(request)
        ids.append(request.request_id)
    done = engine.run_to_completion()
    for request_id in ids:
        for index, out in sorted(done[request_id].items()):
            print(json.dumps({"id": request_id, "index": index, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}, ensure_ascii=False))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from models.loader import convert_checkpoint

    seconds = convert_checkpoint(args.model, args.out, args.dtype)
    print(f"converted {args.model} -> {args.out} ({args.dtype}) in {seconds:.2f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ops.startup import pause_collector, resume_collector

    pause_collector()  # serve and worker resume it once their imports are done; the others now
    try:
        args = _build_parser().parse_args(argv)
        if args.command not in ("serve", "worker"):
            resume_collector(freeze=False)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        handler = {"generate": _generate, "convert": _convert, "serve": _serve, "worker": _worker,
                   "gateway": _gateway, "login": _login, "logout": _logout,
                   "playback": _playback, "replay": _replay}.get(args.command, _client_command)
        if args.command == "models" and args.models_command:
            handler = _models_signing
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as e:  # config, checkpoint, tokenizer and parameter errors
            print(f"tessera {args.command}: error: {e}", file=sys.stderr)
            return 2
    finally:
        resume_collector(freeze=False)  # an early end (bad flags, a refused setting) leaves it as it found it


if __name__ == "__main__":
    sys.exit(main())
