"""Training Tessera's demo model (models/demo/) from a corpus a package registry ships.

The stages, each a small module, run in order by `python -m models.demo_training.train`:

    corpus.py     Jane Austen's six novels from Debian's r-cran-janeaustenr package -> cleaned
                  chapters, a held-out split, chat-format examples built from the prose
    rdata.py      reads the character vectors out of that package's R lazy-load database
    tokenizer.py  a byte-level BPE tokenizer trained with `tokenizers` on the training split
    train.py      the optax training loop over models/llama.py's modules (causal forward)
    export.py     the Hugging Face folder: config.json, model.safetensors, tokenizer files
    evaluate.py   held-out perplexity against a unigram baseline, and sample outputs
"""
