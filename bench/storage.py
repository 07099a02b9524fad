"""Capture and analyze into a local folder against the same on an S3 server on loopback (moto), interleaved.

    python bench/storage.py [--tokens 8192] [--analyze-tokens 40000] [--reps 5]

Needs moto[server] (the dev extra). The server runs in a child process on a free 127.0.0.1 port, as the tests
start it (tests/s3_server.py). Ways, each rep writing a fresh folder / prefix:
  capture   moescope.capture of the shipped tiny-moe (loaded once) over the built-in wiki prose (--tokens,
            shards of --shard-tokens): forward passes + parts + manifest commits (+ lease on S3)
  commit    the writer alone: the captured shards' tables committed again into a fresh folder / prefix
            (encoding, part writes or PUTs, manifest commits, fsyncs or lease checks), no forward pass
  analyze   the default analysis suite (no model) over a synthetic DeepSeek-like trace of --analyze-tokens
            tokens (analysis/synthetic.py), written once to each place; results to the same kind of place
Prints tokens/s for each, median (min–max) over the reps, and S3 time over local time paired per rep. moto
is a Python server on the same 2 cores as the client: it measures the protocol's extra requests and copies,
not a real object store's bandwidth or latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from _timing import compare_line, header, interleave

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="capture: tokens per run (default 8192)")
    parser.add_argument("--shard-tokens", type=int, default=2048, help="capture: tokens per shard (default 2048)")
    parser.add_argument("--analyze-tokens", type=int, default=40_000, help="analyze: synthetic trace tokens (default 40000)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", default="capture,commit,analyze", help="which to run (default all three)")
    args = parser.parse_args()

    import moescope
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.pipeline.analyze import analyze_trace
    from moescope.recording.loading import load_model
    from moescope.trace.schema import TABLES
    from moescope.trace.writer import TraceWriter
    from s3_server import start_server

    server, scratch = start_server(), Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    os.environ.update(server.env)  # the ordinary AWS variables: what a user sets
    try:
        bucket = f"s3://{server.new_bucket('bench')}"
        options = moescope.CaptureOptions(max_tokens=args.tokens, shard_tokens=args.shard_tokens, seq_len=256,
                                          batch_size=8)

        model, tokenizer = load_model("moescope:tiny-moe", device="cpu", dtype="float32")  # loaded once, not timed

        def capture_into(root):
            return lambda: moescope.capture(model, "wiki", tokenizer=tokenizer, out=f"{root}/{uuid.uuid4().hex}",
                                            options=options, progress=False)

        steps = args.steps.split(",")
        if "capture" in steps:
            print(f"capture: {args.tokens} tokens of tiny-moe, shards of {args.shard_tokens}; " + header(args.reps))
            times = interleave({"local": capture_into(scratch), "s3": capture_into(bucket)}, args.reps)
            print(compare_line("local folder", times["local"], times["local"], work=args.tokens))
            print(compare_line("s3 (moto)", times["s3"], times["local"], work=args.tokens))

        source = moescope.open_trace(capture_into(scratch)().folder)  # the shards to re-commit (not timed)
        parts = [({name: source._read(shard["files"][name]) for name in TABLES}, shard) for shard in source.manifest["shards"]]
        header_fields = {k: v for k, v in source.manifest.items() if k not in ("shards", "complete", "stats")}

        def commit_into(root):
            def run():
                with TraceWriter(f"{root}/{uuid.uuid4().hex}", header_fields) as writer:
                    for tables, shard in parts:
                        writer.write_shard(tables, seq_id_min=shard["seq_id_min"], seq_id_max=shard["seq_id_max"])
                    writer.finish()
            return run

        if "commit" in steps:
            print(f"\ncommit: the same {len(parts)} shards' tables re-committed, no forward pass; " + header(args.reps))
            times = interleave({"local": commit_into(scratch), "s3": commit_into(bucket)}, args.reps)
            print(compare_line("local folder", times["local"], times["local"], work=source.n_tokens))
            print(compare_line("s3 (moto)", times["s3"], times["local"], work=source.n_tokens))
        if "analyze" not in steps:
            return

        spec = SyntheticSpec(n_layers=26, n_experts=64, top_k=6)
        for root in (scratch, bucket):
            write_synthetic_trace(f"{root}/synthetic", spec, args.analyze_tokens, 16384, seed=0)

        def analyze_from(root):
            return lambda: analyze_trace(f"{root}/synthetic", f"{root}/res-{uuid.uuid4().hex}", use_model=False)

        print(f"\nanalyze: {args.analyze_tokens} tokens x {spec.n_layers} layers, {spec.n_experts} experts top-{spec.top_k}; "
              + header(args.reps))
        times = interleave({"local": analyze_from(scratch), "s3": analyze_from(bucket)}, args.reps)
        print(compare_line("local folder", times["local"], times["local"], work=args.analyze_tokens))
        print(compare_line("s3 (moto)", times["s3"], times["local"], work=args.analyze_tokens))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
