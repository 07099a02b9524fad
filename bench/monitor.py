"""What `moescope.RoutingMonitor` checking at every step costs a training loop, against the same loop unmonitored.

    python bench/monitor.py [--model moescope:tiny-moe] [--steps 8] [--reps 5]

One run = --steps optimizer steps (forward, backward, AdamW) on batches of --batch-size x --seq-len tokens;
the monitored run calls `monitor.step()` after each, with every=1 (a check at every step: the worst case).
Both start from the same weights (restored before each run) and run interleaved, rep by rep. Prints the
time per step and the monitor's added share of it, median (min–max) over reps, paired per rep.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _timing import Spread, interleave, paired_ratios, verdict

import moescope
from moescope.recording.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moescope:tiny-moe")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    model.train()
    start = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, len(tokenizer), (args.batch_size, args.seq_len), generator=g) for _ in range(args.steps)]

    def run(monitor: moescope.RoutingMonitor | None):
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if monitor is not None:
                monitor.step()

    def monitored():
        with moescope.RoutingMonitor(model, every=1) as monitor:
            run(monitor)

    times = interleave({"plain": lambda: run(None), "monitor": monitored}, args.reps)
    per_step = [1000 * t / args.steps for t in times["plain"]]
    print(f"model: {args.model}; {args.steps} steps of {args.batch_size}x{args.seq_len} per run, {args.reps} interleaved reps, "
          f"{args.threads} threads; figures: median (min–max) over reps")
    ratio = paired_ratios(times["monitor"], times["plain"])
    added = Spread(ratio.median - 1, ratio.lo - 1, ratio.hi - 1, ratio.n).text("+.1%")
    print(f"plain training step {Spread.of(per_step).text('.1f')} ms; monitor at every step adds {added} "
          f"of the step time ({verdict(ratio)})")


if __name__ == "__main__":
    main()
