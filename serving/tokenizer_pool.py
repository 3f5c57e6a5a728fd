"""Tokenizing, detokenizing and chat templating off the event loop: worker processes, one per core.

Processes, not threads: the `tokenizers` library releases the GIL while it splits text, but
turning a multi-megabyte prompt's result into Python objects and freeing it holds the GIL for
150-400 ms (measured on the 2-core development machine, 4 MiB of text, 1.4M tokens), and chat
templates render in Python: in threads, either would stall every other request on the event
loop. A worker hands back token ids as a compact `array` (one buffer to pickle); the caller
checks their count before it makes a Python list of them.

Small inputs (up to `INLINE_CHARS` characters of text or `INLINE_IDS` ids) are handled in
place: the round trip to a worker costs more than their work (well under a millisecond of the
loop), and the soak (perf/soak_prefix_cache.py) lost ~20% of its requests per second to it.

Workers are spawned (never forked: the server process runs jax and the engine's threads),
load a pickled copy of the tokenizer once, run at a lower CPU priority than the serving
process and with one tokenizer thread each (the pool is the parallelism). One pool serves
every app built around the same tokenizer in a process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
import weakref
from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)
WORKER_NICE = 5  # below the event loop and the engine: a huge prompt must not slow everyone else
INLINE_CHARS = 1024  # ~1 ms of tokenizing at the ~1 MB/s measured here
INLINE_IDS = 1024

_pools: weakref.WeakKeyDictionary[Tokenizer, TokenizerPool] = weakref.WeakKeyDictionary()


class TokenizerUnavailable(RuntimeError):
    """A worker died (the pool is replaced); the request may be retried."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TokenizerPool:
    def __init__(self, tokenizer: Tokenizer, workers: int | None = None):
        self.tokenizer, self.workers = tokenizer, workers or default_workers()
        self._executor = self._new_executor()

    @classmethod
    def shared(cls, tokenizer: Tokenizer, workers: int | None = None) -> TokenizerPool:
        pool = _pools.get(tokenizer)
        if pool is None:
            pool = _pools[tokenizer] = cls(tokenizer, workers)
        return pool

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_load, initargs=(self.tokenizer,))

    def start(self) -> None:
        """Spawn the workers now, so the first request does not wait for them; from a thread:
        the parent waits while each child's interpreter starts and reads the pickled tokenizer
        through a pipe (0.13 s for the demo's 113 kB on the idle 2-core machine, more for a
        real vocabulary), and the server's start-up need not."""
        executor = self._executor
        threading.Thread(target=lambda: [executor.submit(os.getpid) for _ in range(self.workers)],
                         name="tokenizer-pool-start", daemon=True).start()

    async def encode(self, text: str, add_special_tokens: bool = True) -> array:
        return await self._run(len(text) <= INLINE_CHARS, _encode, text, add_special_tokens)

    async def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                          template_kwargs: Mapping[str, Any] | None) -> tuple[str, array]:
        """The chat template's text and its token ids (the template writes its own special tokens).
        Raises ChatTemplateError or TypeError (a kwarg the template refuses) as the template does."""
        small = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)) <= INLINE_CHARS
        return await self._run(small, _render_chat, list(messages), add_generation_prompt,
                               dict(template_kwargs or {}))

    async def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return await self._run(len(ids) <= INLINE_IDS, _decode, list(ids), skip_special_tokens)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens included), as /tokenize's `token_strs`."""
        return await self._run(len(ids) <= INLINE_IDS // 16, _token_texts, list(ids))

    async def _run(self, inline: bool, fn, *args):
        if inline:
            return fn(*args, tokenizer=self.tokenizer)
        executor = self._executor
        try:
            return await asyncio.wrap_future(executor.submit(fn, *args))
        except BrokenProcessPool:
            if self._executor is executor:  # the first to notice replaces it
                log.error("a tokenizer worker died; starting new ones")
                self._executor = self._new_executor()
            raise TokenizerUnavailable("a tokenizer worker stopped while handling the request") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- in the workers ---------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None


def _load(tokenizer: Tokenizer) -> None:
    global _tokenizer
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizer first runs in parallel
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.nice(WORKER_NICE)
    _tokenizer = tokenizer
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="exit-with-server", daemon=True).start()


def _exit_with(parent: int) -> None:
    """A server killed (SIGKILL, a crash) never shuts its pool down, and a worker waiting for
    work never notices: its task queue holds a writing end of its own pipe. Each killed server
    left its workers behind for good; now they go within a second (reparented: a new parent)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _ids(ids: list[int]) -> array:
    return array("l", ids)


# Each takes the tokenizer to use in place (small inputs); in a worker, the one it loaded.

def _encode(text: str, add_special_tokens: bool, tokenizer: Tokenizer | None = None) -> array:
    return _ids((tokenizer or _tokenizer).encode(text, add_special_tokens=add_special_tokens))


def _render_chat(messages: list, add_generation_prompt: bool, template_kwargs: dict,
                 tokenizer: Tokenizer | None = None) -> tuple[str, array]:
    tokenizer = tokenizer or _tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
    return text, _ids(tokenizer.encode(text, add_special_tokens=False))


def _decode(ids: list[int], skip_special_tokens: bool, tokenizer: Tokenizer | None = None) -> str:
    return (tokenizer or _tokenizer).decode(ids, skip_special_tokens=skip_special_tokens)


def _token_texts(ids: list[int], tokenizer: Tokenizer | None = None) -> list[str]:
    tokenizer = tokenizer or _tokenizer
    return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
