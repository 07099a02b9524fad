"""Measure the shipped models: held-out perplexity per domain, out-of-corpus perplexity, routing structure.

Held-out sets (the EVAL side of moescope's fixed hash split, never trained on):
code = ``humaneval,python-stdlib``, math = ``gsm-symbolic:4000`` (unseen GSM8K templates), prose = ``wiki``.

Out-of-corpus sets (text from none of the training corpora):
- ``news``: gensim's Lee background corpus (Australian news articles, all 300; prose);
- ``python-license``: the interpreter's LICENSE.txt (legal prose; the stdlib corpus reads only .py files);
- ``zen-of-python``: the text the `this` module prints (the stdlib file holds it ROT13-encoded);
- ``click-source``: the .py files of the installed `click` package (code; site-packages is not in the
  stdlib corpus).

Each set is one stream (documents each followed by eos) cut into windows of 257 tokens with stride
256, capped at MAX_TOKENS; perplexity is exp(mean next-token NLL), and bits per byte divides the
summed NLL by the UTF-8 bytes of the predicted tokens (eos counted as one byte), which makes sets
with different tokenizer compression comparable.

For comparison, the same measurement on the first MAX_TOKENS of each domain's TRAIN side
(``train_side``) shows the generalisation gap.

Routing (MoE models only), recorded with forward hooks on the routers during the same passes: per
layer and domain, each expert's share of the top-k slots; the busiest share (uniform = 1/8 = 0.125);
the total-variation distance between the code, math and prose load vectors, next to a noise floor (the
distance between the even and odd windows of one domain); and for tiny-varmoe the share of slots sent
to the large experts and the mean active intermediate size per token.

Routing targets (MoE models only; `training.targets`): busiest expert over its fair share, dead
experts and code-vs-prose total-variation distance per layer, measured with moescope's own capture and
``analyze`` on the eval split.

Results go into ``weights/<name>/metrics.json`` (keys ``eval``, ``routing``, ``targets``) and a printed
table. ``eval.check`` is the perplexity of the first CHECK_WINDOWS windows per held-out domain, which the
tests re-measure.

Examples
--------
    python -m training.evaluate --model all
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR, shipped_model_path
from training.router_tap import n_routed_experts, tap_routers
from training.texts import held_out_texts, out_of_corpus_texts

SEQ_LEN = 256
MAX_TOKENS = 65_536  # per set: 256 windows
BATCH = 16
CHECK_WINDOWS = 8  # per held-out domain: the perplexity the default test run re-measures


# ---------------------------------------------------------------- measurement


def windows(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Windows of up to SEQ_LEN + 1 tokens with stride SEQ_LEN over the eos-joined stream, capped."""
    eos = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream = torch.tensor([t for enc in encs for t in (*enc.ids, eos)][: MAX_TOKENS + 1], dtype=torch.long)
    return [stream[i : i + SEQ_LEN + 1] for i in range(0, len(stream) - 1, SEQ_LEN)]


def token_bytes(tokenizer) -> torch.Tensor:
    """(V,) UTF-8 bytes each token stands for: byte-level tokens have one character per byte; specials 1."""
    lengths = torch.ones(len(tokenizer), dtype=torch.long)
    for token, idx in tokenizer.get_vocab().items():
        if token not in tokenizer.all_special_tokens:
            lengths[idx] = len(token)
    return lengths


@torch.inference_mode()
def measure(model, wins: list[torch.Tensor], nbytes: torch.Tensor) -> tuple[dict, list[torch.Tensor] | None]:
    """Perplexity and bits/byte of `wins`; per-layer (n_windows, E) expert slot counts for MoE models."""
    n_experts = n_routed_experts(model.config)
    total_nll, total_tokens, total_bytes, counts = 0.0, 0, 0, []
    with tap_routers(model) as recorded:
        for start in range(0, len(wins), BATCH):
            group = wins[start : start + BATCH]
            for batch in _same_length(group):  # (b, t+1); only the last window may be shorter
                logits = model(input_ids=batch[:, :-1]).logits.float()  # (b, t, V)
                targets = batch[:, 1:]
                total_nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                total_tokens += targets.numel()
                total_bytes += int(nbytes[targets].sum())
                if n_experts:
                    b, t = targets.shape  # ids of each layer: (b * t, k) -> (b, E) counts per window
                    per_layer = [torch.cat(r.ids).view(b, t * r.ids[0].shape[-1]) for r in recorded]
                    counts.append(torch.stack([F.one_hot(ids, n_experts).sum(1) for ids in per_layer]))
                for r in recorded:
                    r.clear()
    result = {
        "tokens": total_tokens,
        "bytes": total_bytes,
        "nll": round(total_nll / total_tokens, 4),
        "ppl": round(math.exp(total_nll / total_tokens), 2),
        "bits_per_byte": round(total_nll / total_bytes / math.log(2), 4),
    }
    return result, (torch.cat(counts, dim=1) if counts else None)  # (L, n_windows, E)


def _same_length(group: list[torch.Tensor]) -> list[torch.Tensor]:
    full = [w for w in group if len(w) == len(group[0])]
    rest = [w[None] for w in group[len(full) :] if len(w) > 1]
    return [torch.stack(full), *rest]


# ---------------------------------------------------------------- routing structure


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return round(0.5 * (p - q).abs().sum().item(), 4)


def routing_summary(counts: dict[str, torch.Tensor], top_k: int, expert_sizes: list[int] | None) -> dict:
    """counts: domain -> (L, n_windows, E) slot counts. Loads, busiest shares, domain distances."""
    share = {d: (c.sum(1) / c.sum((1, 2))[:, None]).double() for d, c in counts.items()}  # (L, E), rows sum to 1
    layers = []
    for layer in range(next(iter(share.values())).shape[0]):
        row = {
            "load": {d: [round(x, 4) for x in s[layer].tolist()] for d, s in share.items()},
            "busiest_share": {d: round(s[layer].max().item(), 4) for d, s in share.items()},
            "tv_distance": {a + "-" + b: _tv(share[a][layer], share[b][layer])
                            for a, b in (("code", "prose"), ("code", "math"), ("math", "prose"))},
            "tv_noise_floor": {},  # same domain, even vs odd windows: what sampling alone gives
        }
        for d in ("code", "prose"):
            c = counts[d][layer].double()  # (n_windows, E)
            even, odd = c[0::2].sum(0), c[1::2].sum(0)
            row["tv_noise_floor"][d] = _tv(even / even.sum(), odd / odd.sum())
        if expert_sizes is not None:
            sizes = torch.tensor(expert_sizes, dtype=torch.double)  # (E,)
            large = sizes > sizes.min()
            row["large_expert_share"] = {d: round(s[layer][large].sum().item(), 4) for d, s in share.items()}
            # per token: top_k * sum_e share_e * size_e (uniform routing gives top_k * mean size)
            row["mean_active_intermediate"] = {d: round(top_k * (s[layer] * sizes).sum().item(), 1)
                                               for d, s in share.items()}
        layers.append(row)
    return {"layers": layers}


# ---------------------------------------------------------------- driver


def evaluate(name: str, folder: Path, sets: dict[str, dict[str, list[str]]]) -> dict:
    """Measure one model folder on every set; returns {"eval": ..., "routing": ...}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    nbytes = token_bytes(tokenizer)
    results: dict[str, dict] = {kind: {} for kind in sets}
    counts = {}
    for kind, texts_by_set in sets.items():
        for set_name, texts in texts_by_set.items():
            results[kind][set_name], set_counts = measure(model, windows(tokenizer, texts), nbytes)
            if kind == "held_out" and set_counts is not None:
                counts[set_name] = set_counts
    check = {set_name: measure(model, windows(tokenizer, texts)[:CHECK_WINDOWS], nbytes)[0]
             for set_name, texts in sets["held_out"].items()}
    out = {"eval": {"seq_len": SEQ_LEN, "max_tokens_per_set": MAX_TOKENS, "dtype": "float32 (from bf16 weights)",
                    **results, "check": {"windows": CHECK_WINDOWS, **check}}}
    if counts:
        from training.targets import measure_targets

        sizes = getattr(model.config, "expert_sizes", None)
        out["routing"] = routing_summary(counts, model.config.num_experts_per_tok, sizes)
        shipped = folder.resolve() == (WEIGHTS_DIR / name).resolve()  # else a folder, e.g. fresh from training
        out["targets"] = measure_targets(name if shipped else str(folder), name)
    return out


def print_table(all_metrics: dict[str, dict]) -> None:
    names = list(all_metrics)
    print(f"{'set':<22}" + "".join(f"{n + ' ppl':>16}{'bpb':>7}" for n in names))
    for kind in all_metrics[names[0]]["eval"]:
        if not isinstance(all_metrics[names[0]]["eval"][kind], dict) or kind == "check":
            continue
        print(f"-- {kind}")
        for set_name in all_metrics[names[0]]["eval"][kind]:
            cells = [all_metrics[n]["eval"][kind][set_name] for n in names]
            label = f"{set_name} ({cells[0]['tokens']} tok)"
            print(f"{label:<22}" + "".join(f"{c['ppl']:>16.2f}{c['bits_per_byte']:>7.3f}" for c in cells))
    for name, metrics in all_metrics.items():
        if "routing" not in metrics:
            continue
        n_experts = len(next(iter(metrics["routing"]["layers"][0]["load"].values())))
        print(f"\nrouting of {name} (held-out sets; uniform busiest share = {1 / n_experts:.4f})")
        for i, row in enumerate(metrics["routing"]["layers"]):
            busiest = " ".join(f"{d}={v:.3f}" for d, v in row["busiest_share"].items())
            tv = " ".join(f"{k}={v:.3f}" for k, v in row["tv_distance"].items())
            floor = " ".join(f"{k}={v:.3f}" for k, v in row["tv_noise_floor"].items())
            line = f"  layer {i}: busiest {busiest} | TV {tv} | noise {floor}"
            if "large_expert_share" in row:
                line += " | large share " + " ".join(f"{d}={v:.3f}" for d, v in row["large_expert_share"].items())
                line += " | active I " + " ".join(f"{d}={v:.0f}" for d, v in row["mean_active_intermediate"].items())
            print(line)
        full = metrics["targets"]["full"]
        print(f"targets of {name} (moescope capture + analyze, {full['corpus']}, {full['max_tokens']} tokens): "
              + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in full["met"].items()))
        for row in full["layers"]:
            print(f"  MoE layer {row['layer']}: busiest/fair {row['busiest_over_fair']:.2f}, dead {row['dead']}, "
                  f"TV code-prose {row['tv_code_prose']:.3f}")


# Held-out perplexity of the release before issue 17 (~1 M training tokens, same tokenizer and windows);
# tiny-varmoe re-measured with its RoPE frequencies initialised (issue 12.6; the README had 260.3 / 147.1 / 578.1).
# tiny-dsv3 is new: it is set against tiny-moe's (same hidden size, depth, vocabulary and expert parameters).
PREVIOUS_HELD_OUT_PPL = {"tiny-moe": {"code": 170.7, "math": 107.7, "prose": 450.0},
                         "tiny-dense": {"code": 181.4, "math": 113.1, "prose": 467.9},
                         "tiny-varmoe": {"code": 181.98, "math": 104.92, "prose": 469.98}}
PREVIOUS_HELD_OUT_PPL["tiny-dsv3"] = PREVIOUS_HELD_OUT_PPL["tiny-moe"]
MODEL_WHAT = {"tiny-moe": "Qwen3-MoE, 8 experts × 256, top-2",
               "tiny-dense": "Qwen3 dense twin, MLP 512 (same active params per token)",
               "tiny-varmoe": "custom PyTorch MoE, experts 4 × 448 + 4 × 64, top-2",
               "tiny-dsv3": "DeepSeek-V3: MLA, dense layer 0, 16 experts × 128, top-3 of 2 of 4 groups, 1 shared"}


def model_tables(all_metrics: dict[str, dict]) -> str:
    """The two shipped-model tables of docs/models.md (perplexity now (before); routing targets), from metrics.json."""
    lines = ["| model | what | params | code | math | prose | news (unseen) | click sources (unseen) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in all_metrics.items():
        held, unseen, before = m["eval"]["held_out"], m["eval"]["out_of_corpus"], PREVIOUS_HELD_OUT_PPL[name]
        cells = [f"{held[d]['ppl']:.1f} ({before[d]:.1f})" for d in ("code", "math", "prose")]
        cells += [f"{unseen[d]['ppl']:.1f}" for d in ("news", "click-source")]
        lines.append(f"| `{name}` | {MODEL_WHAT[name]} | {m['parameters'] / 1e6:.1f} M | " + " | ".join(cells) + " |")
    lines += ["", "| model | MoE layers | busiest expert / fair share, per layer | dead experts | "
              "TV code vs prose, per layer |", "|---|---|---|---|---|"]
    for name, m in all_metrics.items():
        if "targets" not in m:
            continue
        rows = m["targets"]["full"]["layers"]
        per_layer = lambda key, fmt: ", ".join(format(r[key], fmt) for r in rows)  # noqa: E731
        lines.append(f"| `{name}` | {len(rows)} | {per_layer('busiest_over_fair', '.2f')} | "
                     f"{sum(r['dead'] for r in rows)} | {per_layer('tv_code_prose', '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Held-out and out-of-corpus perplexity and routing structure of the shipped models.",
        epilog="examples:\n  python -m training.evaluate --model all\n"
               "  python -m training.evaluate --model tiny-moe --weights /tmp/shipped",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=[*SHIPPED_MODELS, "all"], default="all")
    parser.add_argument("--weights", type=Path, default=None, help="folder holding <name>/ (default: package weights)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # two threads crawl when another process holds a core (see train.py)
    sets = {"held_out": held_out_texts(), "out_of_corpus": out_of_corpus_texts(),
            "train_side": held_out_texts("train")}
    names = list(SHIPPED_MODELS) if args.model == "all" else [args.model]
    all_metrics = {}
    for name in names:
        folder = (args.weights / name) if args.weights else shipped_model_path(name)
        measured = evaluate(name, folder, sets)
        path = folder / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {"model": name}
        metrics.update(measured)
        path.write_text(json.dumps(metrics, indent=1) + "\n")
        all_metrics[name] = metrics
    print_table(all_metrics)
    if args.model == "all":
        print("\ndocs/models.md tables:\n" + model_tables(all_metrics))


if __name__ == "__main__":
    main()
