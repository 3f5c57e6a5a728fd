"""FP8 weights against the unquantized model: top-1 agreement and logit error, teacher-forced.

    python perf/fp8_agreement.py [--model models/demo] [--dtypes float32,bfloat16] [--out perf/results/fp8_agreement_cpu.md]

Both models score the same token windows with the serving modules' causal forward
(`models/forward.py` `sequence_logits`, no KV cache): at every position, does the FP8 model's
most likely next token equal the reference's, and how far apart are the logits (max and mean
absolute difference, and the max over the reference's largest logit magnitude). The demo model
(trained on Austen, `models/demo`) reads English text here; `perf/gpu_serve_bench.py` calls
`agreement` on random-weight models of real shapes, where near-flat logits make top-1 a
harsher test.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.forward import sequence_logits  # noqa: E402
from models.loader import LoadedModel, lay_out, load_model  # noqa: E402
from models.projection import WeightLayout  # noqa: E402

FP8_LAYOUT = WeightLayout("xla", fused=True, quantization="fp8")
# English in the demo model's domain: Pride and Prejudice's opening (public domain), then prose
# written for this check.
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. Mrs. Bennet was quite certain that the young "
    "gentleman would dine with them before the end of the week, and she said so to her husband, who only smiled "
    "and returned to his book. Elizabeth walked out the next morning with her sister, and they talked of the ball, "
    "of the officers, and of the letter which had come from London. \"I cannot think,\" said Jane, \"that he meant "
    "any harm by it; he is always so very agreeable, and his manners are so easy.\" Her sister was not persuaded. "
    "They returned to the house by the lane, where Mr. Collins was waiting at the gate with a great deal to say "
    "about his patroness, and the dinner, and the number of windows in the drawing room at Rosings. Miss Bingley "
    "wrote to her brother every day, and every letter spoke of Netherfield, of the weather, and of nothing at all. "
    "The family were much surprised, a week afterwards, to hear that Mr. Darcy had left the country without taking "
    "leave of any one, and Lydia declared that she had never liked him, and that he was the proudest man in the "
    "world. Her mother was of the same opinion, and said so at every dinner for a month. In the spring Elizabeth "
    "went into Kent to visit her friend, who had married Mr. Collins in the winter and was now mistress of a small "
    "house near the park. She found her friend very comfortable, and very busy with her poultry and her parish, and "
    "not at all unhappy, though she could not always listen to her husband without a blush. Lady Catherine asked "
    "them to dine twice in every week, and gave her opinion on every subject, and found fault with the furniture, "
    "and told Elizabeth that she ought to practise the piano forte every day in the housekeeper's room. Colonel "
    "Fitzwilliam came with his cousin at Easter, and was a great addition to the party; he talked very pleasantly "
    "of Kent and of the country, of travelling and of staying at home, of new books and of music. His cousin said "
    "very little, but he looked at Elizabeth a great deal, and she could not tell whether he admired her or only "
    "found something in her to disapprove. When at last he spoke, it was to ask whether she did not think the "
    "evening very fine, and whether she would not walk in the garden before the carriage came."
)


def text_windows(model_dir: str | Path, length: int, count: int) -> np.ndarray:
    """`count` windows of `length` tokens of TEXT, one after another, [count, length]."""
    from models.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(model_dir).encode(TEXT, add_special_tokens=False)
    if len(ids) < length * count:
        raise ValueError(f"TEXT is {len(ids)} tokens, fewer than {count} windows of {length}")
    return np.asarray(ids[: length * count], np.int32).reshape(count, length)


def agreement(reference: LoadedModel, quantized: LoadedModel, tokens: np.ndarray) -> dict:
    """Teacher-forced comparison over every position of `tokens` [batch, seq]."""
    import jax.numpy as jnp

    batch = jnp.asarray(tokens, jnp.int32)
    want = np.asarray(sequence_logits(reference.graphdef, reference.state, batch))
    got = np.asarray(sequence_logits(quantized.graphdef, quantized.state, batch))
    diff = np.abs(got - want)
    return dict(
        positions=int(tokens.size), top1_agreement=float(np.mean(want.argmax(-1) == got.argmax(-1))),
        max_abs_logit_error=float(diff.max()), mean_abs_logit_error=float(diff.mean()),
        max_rel_logit_error=float(diff.max() / np.abs(want).max()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="reference dtypes, comma-separated")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import os

    import jax

    lines = [f"# FP8 weights against the unquantized model ({args.model})", "",
             f"`python perf/fp8_agreement.py --out {args.out}`: {jax.devices()[0].platform} ({platform.machine()}, "
             f"{os.cpu_count()} threads, load average {os.getloadavg()[0]:.2f}), jax {jax.__version__}. "
             f"Teacher-forced over {args.count * args.length} positions ({args.count} windows of {args.length} "
             "tokens of the script's English TEXT); fp8: e4m3 weights with a scale per output channel, activations "
             "per token (models/fp8.py); embedding and head unquantized.", "",
             "| reference | weights | fp8 weights | top-1 agreement | max abs logit error | mean | max / largest logit |",
             "|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        reference = load_model(args.model, dtype)
        quantized = lay_out(reference, FP8_LAYOUT)
        r = agreement(reference, quantized, text_windows(args.model, args.length, args.count))
        ref_bytes, fp8_bytes = (sum(x.nbytes for x in jax.tree.leaves(m.state)) for m in (reference, quantized))
        lines.append(f"| {dtype} | {ref_bytes:,} B | {fp8_bytes:,} B | {r['top1_agreement']:.2%} "
                     f"({round(r['top1_agreement'] * r['positions'])}/{r['positions']}) | {r['max_abs_logit_error']:.4f} | "
                     f"{r['mean_abs_logit_error']:.4f} | {r['max_rel_logit_error']:.4f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
