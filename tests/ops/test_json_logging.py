"""JSON access lines: prompts redacted unless switched on, per-tenant sampling, rotation."""

import asyncio
import io
import json
import logging
import stat
from pathlib import Path

import pytest
import structlog

from ops.logging import access_log, configure_logging, get_logger, is_sampled, redact, reset_logging
from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams

PROMPT = "Summarise my medical record: patient Jane Roe, diagnosis confidential"


@pytest.fixture
def captured():
    """configure(**kw) -> the stream that receives every log line."""
    stream = io.StringIO()

    def configure(**kw):
        configure_logging(stream=stream, **kw)
        return stream

    yield configure
    reset_logging()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def _access(request_id="r1", tenant="acme", status=200, **kw):
    fields = dict(method="POST", path="/v1/completions", prompt_tokens=14, completion_tokens=3, ttft_s=0.25, e2e_s=1.5)
    return access_log(request_id=request_id, tenant=tenant, status=status, **{**fields, **kw})


def test_access_line_redacts_prompt_and_completion_by_default(captured):
    stream = captured()
    assert _access(prompt=PROMPT, completion="Jane Roe has", user_agent="openai-python/2.0")
    (line,) = lines(stream)
    assert line == {
        "event": "access", "logger": "tessera.access", "level": "info", "timestamp": line["timestamp"],
        "request_id": "r1", "tenant": "acme", "method": "POST", "path": "/v1/completions", "status": 200,
        "prompt_tokens": 14, "completion_tokens": 3, "ttft_s": 0.25, "e2e_s": 1.5, "user_agent": "openai-python/2.0",
        "prompt": f"[redacted, {len(PROMPT)} chars]", "completion": "[redacted, 12 chars]",
    }
    assert "Jane" not in stream.getvalue()


def test_other_events_with_user_text_are_redacted_too(captured):
    stream = captured(level="DEBUG")
    get_logger("tessera.serving").debug("chat", messages=[{"role": "user", "content": PROMPT}], prompt=PROMPT)
    (line,) = lines(stream)
    assert line["prompt"] == f"[redacted, {len(PROMPT)} chars]"
    assert line["messages"] == redact([{"role": "user", "content": PROMPT}])
    assert "Jane" not in stream.getvalue()


def test_prompts_are_logged_when_switched_on(captured):
    stream = captured(log_prompts=True)
    _access(prompt=PROMPT, completion="Jane Roe has")
    (line,) = lines(stream)
    assert (line["prompt"], line["completion"]) == (PROMPT, "Jane Roe has")


def test_a_served_request_leaves_no_prompt_or_completion_text_in_the_logs(captured, checkpoint):
    """Everything logged at DEBUG while a real request runs (engine, jax, access line)."""
    stream = captured(level="DEBUG")
    engine = Engine.from_model_dir(checkpoint("llama"), config=EngineConfig(
        block_size=4, num_blocks=32, max_num_seqs=2, max_num_batched_tokens=16, token_buckets=(16,)))
    front = AsyncEngine(engine)

    async def serve():
        return [o async for o in front.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                                request_id="served-1")]

    try:
        outputs = asyncio.run(serve())
    finally:
        front.shutdown()
    completion = "".join(o.outputs[0].text for o in outputs)
    t = outputs[-1].timings
    _access("served-1", prompt=PROMPT, completion=completion, prompt_tokens=t.num_prompt_tokens,
            completion_tokens=t.num_generation_tokens, ttft_s=t.ttft_seconds, e2e_s=t.e2e_seconds)
    text = stream.getvalue()
    assert len(completion) > 5 and completion not in text
    for word in ("Summarise", "Jane", "Roe", "diagnosis", "confidential"):
        assert word not in text
    access = [x for x in lines(stream) if x["event"] == "access"]
    assert [(x["prompt_tokens"], x["completion_tokens"]) for x in access] == [(t.num_prompt_tokens, 6)]


def test_stdlib_records_come_out_as_json(captured):
    stream = captured(level="WARNING")
    logging.getLogger("jax._src.xla_bridge").warning("no GPU found, %s", "falling back to cpu")
    logging.getLogger("runtime.engine").info("dropped: below WARNING")
    (line,) = lines(stream)
    assert (line["event"], line["level"], line["logger"]) == ("no GPU found, falling back to cpu", "warning",
                                                              "jax._src.xla_bridge")


def test_sampling_ratio_zero_drops_access_lines_but_keeps_errors(captured):
    stream = captured(tenant_sample_ratios={"noisy": 0.0}, default_sample_ratio=1.0)
    logged = [_access(f"n{i}", tenant="noisy") for i in range(20)]
    logged += [_access("n-err", tenant="noisy", status=503), _access("n-bad", tenant="noisy", status=400)]
    logged += [_access(f"q{i}", tenant="quiet") for i in range(3)]
    assert logged == [False] * 20 + [True] * 5
    assert [(x["request_id"], x["status"]) for x in lines(stream)] == [
        ("n-err", 503), ("n-bad", 400), ("q0", 200), ("q1", 200), ("q2", 200)]


def test_sampling_ratio_keeps_that_share_and_the_same_requests_each_time(captured):
    captured(default_sample_ratio=0.25)
    ids = [f"req-{i}" for i in range(2000)]
    kept = {i for i in ids if is_sampled(i, "any")}
    assert 440 <= len(kept) <= 560  # 500 expected; the draw is a hash of the id
    assert kept == {i for i in ids if is_sampled(i, "any")}
    with pytest.raises(ValueError, match="'x' is 1.5"):
        configure_logging(tenant_sample_ratios={"x": 1.5})


def test_log_file_rotates_at_the_size_limit(tmp_path, captured):
    path = tmp_path / "access.log"
    configure_logging(log_file=str(path), max_bytes=2000, backup_count=2)
    for i in range(60):
        _access(f"rot-{i:03d}", prompt=PROMPT)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["access.log", "access.log.1", "access.log.2"]  # older ones dropped
    assert all(0 < (tmp_path / f).stat().st_size <= 2000 for f in files)
    ids = [json.loads(x)["request_id"] for f in ("access.log.2", "access.log.1", "access.log")
           for x in Path(tmp_path / f).read_text().splitlines()]
    assert ids == [f"rot-{i:03d}" for i in range(60 - len(ids), 60)]  # the newest lines, in order, none lost
    assert "Jane" not in "".join(Path(tmp_path / f).read_text() for f in files)



def test_log_files_are_private_like_the_audit_file(tmp_path, captured):
    """Logs name tenants, key ids and addresses: 0600 for the live file, the rotated ones, and a
    file an older run left readable to others."""
    old = tmp_path / "server.log"
    old.write_text("")
    old.chmod(0o644)
    configure_logging(log_file=str(old), max_bytes=600, backup_count=1)
    for i in range(10):
        _access(f"mode-{i}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.log", "server.log.1"]
    assert [stat.S_IMODE(p.stat().st_mode) for p in sorted(tmp_path.iterdir())] == [0o600, 0o600]
    fresh = tmp_path / "new" / "fresh.log"
    fresh.parent.mkdir()
    configure_logging(log_file=str(fresh))
    _access("mode-fresh")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600

def test_reset_restores_the_root_logger(captured):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    captured(level="DEBUG")
    assert len(root.handlers) == len(handlers) + 1 and root.level == logging.DEBUG
    captured(level="INFO")  # configuring again replaces, never stacks
    assert len(root.handlers) == len(handlers) + 1
    reset_logging()
    assert root.handlers == handlers and root.level == level
    assert structlog.is_configured() is False
