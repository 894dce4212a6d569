"""Offline tiny models, tokenizers and text for tests, the demo and benchmarks.

Nothing here touches the network: the corpus is generated from a small story grammar, the
tokenizer is a byte-level BPE trained on it, and models are trained for seconds on CPU.

    path = make_tiny_model("/tmp/tiny", arch="llama", hidden=64, layers=2, train_steps=200)
    # → a Hugging Face model folder (config, safetensors, tokenizer): --model_args pretrained=/tmp/tiny
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

_NAMES = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Lucy", "Tim", "Sue", "Jack", "Zoe"]
_ANIMALS = ["cat", "dog", "bird", "fish", "bunny", "frog", "bear", "duck", "mouse", "fox"]
_PLACES = ["park", "garden", "forest", "house", "river", "school", "beach", "farm", "hill", "town"]
_OBJECTS = ["ball", "kite", "box", "hat", "cake", "toy", "book", "cup", "flower", "car"]
_COLORS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft"]
_VERBS = ["play", "run", "jump", "sing", "dance", "swim", "read", "draw"]
_FEEL = ["happy", "sad", "scared", "excited", "tired", "proud", "angry", "surprised"]


def _story(r: random.Random) -> str:
    n1, n2 = r.sample(_NAMES, 2)
    a, p, o, c = r.choice(_ANIMALS), r.choice(_PLACES), r.choice(_OBJECTS), r.choice(_COLORS)
    v, v2, f = r.choice(_VERBS), r.choice(_VERBS), r.choice(_FEEL)
    s = [
        f"Once upon a time, there was a little {a} named {n1}.",
        f"{n1} liked to {v} in the {p}.",
        f"One day, {n1} found a {c} {o} in the {p}.",
        f"{n1} was very {f}.",
        f"{n1} went to {n2} and said, \"Look at my {c} {o}!\"",
        f"{n2} smiled and said, \"Let's {v2} with the {o}.\"",
        f"So {n1} and {n2} played with the {c} {o} all day.",
        f"At the end of the day, {n1} went home and slept.",
    ]
    if r.random() < 0.5:
        s.insert(4, f"The {o} was {c} and {n1} loved it.")
    return " ".join(s)


def make_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic synthetic stories (TinyStories-like), separated by blank lines."""
    r = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        st = _story(r)
        parts.append(st)
        total += len(st) + 2
    return "\n\n".join(parts)


def make_tokenizer(corpus: str | None = None, vocab_size: int = 512, save_dir: str | os.PathLike | None = None):
    """A byte-level BPE tokenizer trained on `corpus` (default: make_corpus()), as a transformers
    PreTrainedTokenizerFast with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus if corpus is not None else make_corpus(100_000, seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split("\n\n"), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf.model_max_length = 2048
    if save_dir is not None:
        hf.save_pretrained(str(save_dir))
    return hf


def _config(arch: str, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_pos: int, tok):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_pos,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=max_pos,
            **ids,
        )
    raise ValueError(f"unknown toy arch {arch!r}; use llama or gpt2")


def train_tokens(tok, corpus: str):
    import torch

    return torch.tensor(tok(corpus)["input_ids"], dtype=torch.long)


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab_size: int = 512,
    max_pos: int = 512,
    train_steps: int = 0,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a tiny Hugging Face causal LM folder (config, model.safetensors, tokenizer).

    train_steps=0 leaves the seeded random initialisation; otherwise the model is trained with
    AdamW on the synthetic story corpus (a few seconds for a few hundred steps), so quantization
    error shows up in its perplexity as it does on real models.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    intermediate = intermediate or 4 * hidden
    torch.manual_seed(seed)
    tok = make_tokenizer(vocab_size=vocab_size)
    cfg = _config(arch, len(tok), hidden, layers, heads, intermediate, max_pos, tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    if train_steps > 0:
        data = train_tokens(tok, make_corpus(max(200_000, train_steps * batch_size * seq_len // 2), seed=seed))
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / train_steps)
        )
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
            batch = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "lmq_toy.json").write_text(
        json.dumps(dict(arch=arch, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                        train_steps=train_steps, seed=seed, dtype=dtype))
    )
    return out


def cached_tiny_model(root: str | os.PathLike | None = None, **kwargs) -> Path:
    """make_tiny_model, memoised on disk by its arguments (root: $LMQ_TOY_CACHE or
    ~/.cache/lm_eval_quant/toy). Safe for concurrent callers (build in a temp dir, rename)."""
    import tempfile

    root = Path(root or os.environ.get("LMQ_TOY_CACHE") or Path.home() / ".cache" / "lm_eval_quant" / "toy")
    key = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:16]
    dest = root / key
    if (dest / "model.safetensors").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    make_tiny_model(tmp, **kwargs)
    try:
        os.rename(tmp, dest)
    except OSError:  # someone else finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def heldout_text(n_chars: int = 20_000, seed: int = 12345) -> str:
    """Story text not seen in training (another seed), for perplexity checks."""
    return make_corpus(n_chars, seed=seed)


def shared_dir() -> Path | None:
    """The project's shared data/models folder (`../shared` beside the checkout, or $LMQ_SHARED),
    or None when absent."""
    env = os.environ.get("LMQ_SHARED")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    cands += [here.parents[1].parent / "shared", here.parents[1] / "shared", Path.cwd().parent / "shared"]
    for c in cands:
        if (c / "data").is_dir() or (c / "models").is_dir():
            return c
    return None
