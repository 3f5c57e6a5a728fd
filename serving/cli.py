"""The `tessera` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight and activation dtype")
    p.add_argument("--tensor-parallel", type=int, default=1, help="devices to shard heads and MLP over")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera: LLM inference on JAX/XLA.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the text as it is generated")
    _add_model_flags(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")

    conv = sub.add_parser("convert", help="convert a checkpoint to Tessera's orbax layout for faster loads")
    conv.add_argument("--model", required=True, help="Hugging Face model folder")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    return parser


def _generate(args: argparse.Namespace) -> int:
    from models.detokenizer import IncrementalDetokenizer
    from models.loader import load_model
    from models.sharding import make_mesh
    from models.tokenizer import Tokenizer
    from runtime.generate import SamplingParams, generate_ids

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    tokenizer = Tokenizer.from_dir(args.model)
    model = load_model(
        args.model, args.dtype, mesh=make_mesh(args.tensor_parallel), max_token_id=tokenizer.max_token_id
    )
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    eos = tokenizer.eos_token_ids | frozenset(model.cfg.eos_token_ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    for token in generate_ids(model, prompt_ids, params, eos):
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from models.loader import convert_checkpoint

    seconds = convert_checkpoint(args.model, args.out, args.dtype)
    print(f"converted {args.model} -> {args.out} ({args.dtype}) in {seconds:.2f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = {"generate": _generate, "convert": _convert}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint, tokenizer and parameter errors
        print(f"tessera {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
