"""Capture overhead and trace size, all ways measured in one process on the same model and batches.

    python bench/capture.py [--model moescope:tiny-moe] [--batches 16] [--reps 5]

Two cases, each with its ways interleaved rep by rep so machine noise hits each alike:
  large (--batches batches of --batch-size x --seq-len):
    plain      model forward pass only (the baseline)
    headless   the forward without the LM head over all positions (logits_to_keep=1): what moescope.capture
               runs when nothing needs the logits, so moescope against it is moescope's own cost
    moescope   moescope.capture: hooks + trace written to Parquet (included in the time)
    router     forward with output_router_logits=True, top-k taken from the logits (no writing), headless too
    nnsight    nnsight tracing of every router's output (if nnsight is installed)
  small (one batch of --batch-size x --seq-len): plain and headless forwards against a whole moescope.capture
    of it, where the fixed cost (trace folder, fsyncs, three Parquet tables, manifest) is not spread over many
    batches.
Prints tokens/s and overhead over plain, each as median (min–max) over the reps (overheads paired per rep),
and bytes per (token, MoE layer) of the trace against the same routing exported as JSONL.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
from pathlib import Path

import torch
from _timing import compare_line, header, interleave

import moescope
from moescope.adapters.discover import find_moe_layers


def make_model(name: str | None):
    if name:
        from moescope.recording.loading import load_model

        model, tokenizer = load_model(name, device="cpu", dtype="float32")
        return model, tokenizer.vocab_size
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=8192, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.3)
    return model, config.vocab_size


def make_ids(model_name: str | None, vocab: int, n_batches: int, batch: int, seq: int) -> torch.Tensor:
    """Real corpus tokens when a shipped model (and so its tokenizer) is used, else random ids."""
    if model_name:
        from transformers import AutoTokenizer

        from moescope.corpora import load_corpus
        from moescope.recording.loading import resolve_model_path

        tok = AutoTokenizer.from_pretrained(resolve_model_path(model_name))
        stream: list[int] = []
        for doc in load_corpus("humaneval,gsm-symbolic,wiki", split="eval"):
            stream += tok(doc.text, add_special_tokens=False)["input_ids"]
            if len(stream) >= n_batches * batch * seq:
                break
        stream = (stream * (1 + n_batches * batch * seq // max(len(stream), 1)))[: n_batches * batch * seq]
        return torch.tensor(stream).reshape(n_batches * batch, seq)
    return torch.randint(1, vocab, (n_batches * batch, seq), generator=torch.Generator().manual_seed(0))


_RUNS = itertools.count()  # numbers the capture folders


def run_plain(model, ids, batch, **kwargs):
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i : i + batch], use_cache=False, **kwargs)


def run_router_logits(model, ids, batch):
    kept = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            out = model(input_ids=ids[i : i + batch], use_cache=False, output_router_logits=True, logits_to_keep=1)
            for logits in out.router_logits:
                w, e = logits.float().softmax(-1).topk(2, dim=-1)
                kept.append((e.to(torch.int16), (w / w.sum(-1, keepdim=True)).half()))
    return kept


def run_nnsight(model, ids, batch):
    from nnsight import NNsight

    wrapped = NNsight(model)
    gates = [layer.block_path + "." + layer.spec.router_attr for layer in find_moe_layers(model)]
    kept = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            saved = []
            with wrapped.trace(input_ids=ids[i : i + batch], use_cache=False):
                for path in gates:  # execution order
                    module = wrapped
                    for part in path.split("."):
                        module = module[int(part)] if part.isdigit() else getattr(module, part)
                    saved.append(module.output.save())
            kept.append([(s[2].to(torch.int16), s[1].half()) for s in saved])
    return kept


def run_moescope(model, ids, batch, parent: Path, name: str):
    """A whole capture into a new folder under `parent` (each run its own: deleting the previous run's trace
    would be timed as the capture's; all are deleted at the end)."""
    return moescope.capture(model, input_ids=ids, out=parent / f"{name}-{next(_RUNS)}", progress=False,
                            options=moescope.CaptureOptions(batch_size=batch))


def _print_table(times: dict[str, list[float]], n_tokens: int) -> None:
    for name, ts in times.items():
        print(compare_line(name, ts, times["plain"], work=n_tokens))
    for name in ("moescope", "router_logits"):
        if name in times:
            print(compare_line(f"{name}/headless", times[name], times["headless"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a Qwen3-MoE built from a config (5 M params)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--small-reps", type=int, default=15, help="reps of the one-batch case (cheap, and noisier)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, vocab = make_model(args.model)
    ids = make_ids(args.model, vocab, args.batches, args.batch_size, args.seq_len)
    n_tokens = ids.numel()
    work = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    ways = {"plain": lambda: run_plain(model, ids, args.batch_size),
            "headless": lambda: run_plain(model, ids, args.batch_size, logits_to_keep=1),
            "moescope": lambda: run_moescope(model, ids, args.batch_size, work, "trace"),
            "router_logits": lambda: run_router_logits(model, ids, args.batch_size)}
    try:
        import nnsight  # noqa: F401

        ways["nnsight"] = lambda: run_nnsight(model, ids, args.batch_size)
    except ImportError:
        print("nnsight not installed: skipped (pip install nnsight)")
    times = interleave(ways, args.reps)
    model_name = args.model or "Qwen3-MoE from config (hidden 128, 4 layers, 8 experts, top-2)"
    print(f"model: {model_name}; {args.threads} threads; {header(args.reps)}")
    print(f"large: {n_tokens} tokens per run ({args.batches} batches of {args.batch_size}x{args.seq_len})")
    _print_table(times, n_tokens)
    one = ids[: args.batch_size]
    small = interleave({"plain": lambda: run_plain(model, one, args.batch_size),
                        "headless": lambda: run_plain(model, one, args.batch_size, logits_to_keep=1),
                        "moescope": lambda: run_moescope(model, one, args.batch_size, work, "small")}, args.small_reps)
    print(f"small: one batch of {args.batch_size}x{args.seq_len} ({one.numel()} tokens), a whole capture per run, "
          f"{args.small_reps} reps")
    _print_table(small, one.numel())
    last = run_moescope(model, ids, args.batch_size, work, "trace")  # one more, to measure its size
    trace = moescope.open_trace(last.folder)
    cells = trace.n_tokens * trace.n_layers
    trace_bytes = sum(p.stat().st_size for p in Path(last.folder).rglob("*.parquet"))
    from moescope.trace.exchange import export_trace

    export_trace(trace, work / "routing.jsonl", fmt="jsonl")
    jsonl_bytes = (work / "routing.jsonl").stat().st_size
    print(f"trace: {trace_bytes / cells:.2f} bytes per (token, layer) incl. tokens/sequences tables; "
          f"JSONL: {jsonl_bytes / cells:.1f} bytes -> {jsonl_bytes / trace_bytes:.1f}x smaller")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
