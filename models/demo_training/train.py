"""Train the demo model from the corpus and write it to models/demo/.

    nice -n 10 python -m models.demo_training.train --seed 0 --out models/demo

Runs every stage: corpus (Debian package, cached in .cache/demo-corpus), tokenizer, token
streams, training, export, evaluation. Same seed, same machine: same weights. The model is
models/llama.py's CausalLM, run through models.forward.sequence_logits (the causal forward
without a KV cache), so the trained modules are the served ones. Float32 throughout: XLA's
CPU backend emulates bfloat16 and is several times slower with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.config import ModelConfig
from models.demo_training.corpus import build_corpus
from models.demo_training.evaluate import evaluate_folder, heldout_loss
from models.demo_training.export import export_checkpoint
from models.demo_training.tokenizer import END_OF_TEXT, IM_END, save_tokenizer, train_tokenizer
from models.forward import sequence_logits
from models.llama import CausalLM
from models.tokenizer import Tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("models/demo"))
    p.add_argument("--cache", type=Path, default=Path(".cache/demo-corpus"), help="where the .deb is kept")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=512, help="training context, also max_position_embeddings")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--skip-eval", action="store_true", help="no perplexity/samples after export")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, eos_ids: list[int]) -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.mlp,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_ids,
    })


def init_state(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Norms at 1; every matrix N(0, 0.02), the two that write into the residual stream
    (o_proj, down_proj) scaled by 1/sqrt(2 * layers) as in GPT-2."""
    graphdef, state = nnx.split(CausalLM(cfg, jnp.float32))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape = var.get_value().shape
        owner = str(path[-2]) if len(path) > 1 else ""  # the module holding the weight: "q_norm", "o_proj", ...
        if owner.endswith("norm"):
            var.set_value(jnp.ones(shape, jnp.float32))
            continue
        std = 0.02 / math.sqrt(2 * cfg.num_layers) if owner in ("o_proj", "down_proj") else 0.02
        var.set_value(std * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
    return graphdef, state


def token_streams(corpus, tokenizer: Tokenizer, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, valid) token arrays. Train: prose chapters (each followed by <|endoftext|>) and
    chat examples rendered with the chat template, shuffled together and concatenated."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    prose = [tokenizer.encode(d) + [eot] for d in corpus.train]
    chat = [tokenizer.encode(tokenizer.apply_chat_template(m), add_special_tokens=False) for m in corpus.chat]
    documents = prose + chat
    random.Random(seed).shuffle(documents)
    train = np.fromiter((t for d in documents for t in d), np.int32)
    valid = np.fromiter((t for d in corpus.valid for t in tokenizer.encode(d) + [eot]), np.int32)
    counts = {
        "prose_tokens": sum(map(len, prose)),
        "chat_tokens": sum(map(len, chat)),
        "chat_examples": len(chat),
        "valid_tokens": int(valid.size),
    }
    return train, valid, counts


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=args.lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731  not the norms
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    )


def mean_loss(graphdef, state, batch):
    """Mean next-token cross-entropy (nats) over batch [rows, seq_len + 1]."""
    logits = sequence_logits(graphdef, state, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def train(args: argparse.Namespace) -> dict:
    started = time.time()
    corpus = build_corpus(args.cache, args.seed)
    backend = train_tokenizer(corpus.train, args.vocab_size)
    save_tokenizer(backend, args.out, args.seq_len)
    tokenizer = Tokenizer.from_dir(args.out)
    train_ids, valid_ids, counts = token_streams(corpus, tokenizer, args.seed)
    eos_ids = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(END_OF_TEXT)]
    cfg = model_config(args, eos_ids)
    graphdef, state = init_state(cfg, args.seed)
    optimizer = make_optimizer(args)
    opt_state = optimizer.init(state)
    num_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"corpus: {counts}; train stream {train_ids.size} tokens; model {num_params} parameters", flush=True)

    @jax.jit
    def step(state, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda s: mean_loss(graphdef, s, batch))(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    window = args.seq_len + 1
    log, prep_seconds = [], time.time() - started
    train_started = time.time()
    for i in range(1, args.steps + 1):
        starts = rng.integers(0, train_ids.size - window, size=args.batch)
        batch = jnp.asarray(np.stack([train_ids[s : s + window] for s in starts]))
        state, opt_state, loss = step(state, opt_state, batch)
        if i % args.log_every == 0 or i == args.steps:
            elapsed = time.time() - train_started
            entry = {"step": i, "loss": round(float(loss), 4), "seconds": round(elapsed, 1),
                     "tokens_per_s": round(i * args.batch * args.seq_len / elapsed)}
            if i % args.eval_every == 0 or i == args.steps:
                entry["valid_loss"] = round(heldout_loss(graphdef, state, valid_ids, args.seq_len), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.time() - train_started

    export_checkpoint(args.out, cfg, state, eos_ids, tokenizer.token_to_id(END_OF_TEXT))
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": counts | {"train_stream_tokens": int(train_ids.size)},
        "parameters": int(num_params),
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "prep_seconds": round(prep_seconds, 1),
        "train_seconds": round(train_seconds, 1),  # the loop, validation passes included
        "machine": f"{os.cpu_count()} CPU cores, {jax.default_backend()}",
        "log": log,
    }
    log_file = args.out / "training_log.json"
    log_file.write_text(json.dumps(report, indent=2) + "\n")  # kept even if the evaluation fails
    if not args.skip_eval:
        report["evaluation"] = evaluate_folder(args.out, corpus)
    report["total_seconds"] = round(time.time() - started, 1)
    log_file.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    train(parse_args())
