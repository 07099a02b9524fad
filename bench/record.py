"""What `moescope.record` adds to each forward call of the user's own code, against the same calls unrecorded.

    python bench/record.py [--model moescope:tiny-moe] [--reps 9]

Cases (each interleaved rep by rep with its plain twin, the whole `with moescope.record(...)` block timed,
so committing the trace at its end is included):
  generate   model.generate on 8 left-padded prompts of 16-64 tokens, 32 new tokens (a prefill + 31 decoding
             steps with a KV cache per run)
  forward    32 separate forward calls of 1 x 64 tokens (use_cache=False)
Prints the added milliseconds per forward call of the model, median (min–max) over reps, paired per rep.
"""

from __future__ import annotations

import argparse

import torch
from _timing import Spread, interleave

import moescope
from moescope.recording.loading import load_model


def prompts(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(16, 64, batch).long()
    ids = torch.zeros(batch, 64, dtype=torch.long)
    mask = torch.zeros(batch, 64, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 64 - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, 64 - n:] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moescope:tiny-moe")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    ids, mask = prompts(8, len(tokenizer))
    singles = [torch.randint(3, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(32)]
    model.generation_config.eos_token_id = None  # every run makes the same 32 calls

    def generate():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)

    def forwards():
        with torch.inference_mode():
            for x in singles:
                model(input_ids=x, use_cache=False)

    def recorded(fn):
        def run():
            with moescope.record(model, tokenizer=tokenizer):
                fn()
        return run

    print(f"model: {args.model}; {args.reps} interleaved reps, {args.threads} threads; figures: median (min–max) over reps")
    for name, fn, calls in (("generate", generate, 32), ("forward", forwards, 32)):
        times = interleave({"plain": fn, "record": recorded(fn)}, args.reps)
        added = [1000 * (r - p) / calls for r, p in zip(times["record"], times["plain"])]
        plain_ms = [1000 * p / calls for p in times["plain"]]
        print(f"{name:<9} {calls} calls per run: plain {Spread.of(plain_ms).text('.2f')} ms per call, "
              f"record adds {Spread.of(added).text('+.3f')} ms per call")


if __name__ == "__main__":
    main()
