"""`moescope demo`: the whole pipeline on the shipped models and built-in corpora, in a few minutes.

    out/traces/tiny-moe      capture of moescope:tiny-moe over code + math + prose (eval split)
    out/traces/tiny-varmoe   the variable-size-expert model, same text (cost per token)
    out/traces/tiny-dsv3     the DeepSeek-V3-style model (sigmoid scores, correction bias, groups, shared expert)
    out/results/<model>/     every analysis: tables + summary.json
    out/quant/               router vs experts quantization sensitivity, MoE against the dense twin
    out/report.html          everything in one page

Steps whose output already exists with the same settings are reused, so an interrupted demo resumes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from moescope.errors import TraceError
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.trace.storage import exists, is_url, location

DEMO_CORPUS = "humaneval,gsm-symbolic,wiki"


def _capture_step(model: str, out, *, max_tokens: int, seq_len: int, progress: bool) -> None:
    from moescope.pipeline.capture import capture_trace
    from moescope.recording.options import CaptureOptions
    from moescope.trace.reader import open_trace

    there = exists(out, "manifest.json")  # out: a Path, or a Location on an object store
    if there:
        try:
            trace = open_trace(out)
        except TraceError:
            trace = None
        if trace is not None and trace.complete and trace.manifest["capture"].get("max_tokens") == max_tokens:
            print(f"  reusing {out}")
            return
    capture_trace(model, DEMO_CORPUS, out=out, overwrite=there and open_trace(out).complete, progress=progress,
            options=CaptureOptions(split="eval", max_tokens=max_tokens, seq_len=seq_len, batch_size=8, device="cpu",
                                   save_logits=True, predict_next_layer=True, output_entropy=True))


def run_demo(out: str | Path, *, max_tokens: int = 24000, seq_len: int = 128, quant_tokens: int = 4096,
             progress: bool = True, steps: tuple[str, ...] = ("capture", "analyze", "quant", "report")) -> dict:
    """Run the demo into `out` (a folder, or an object-store prefix: traces written there directly, results and the
    sweep published as `analyze` and `quant` publish theirs, report.html uploaded); returns {step: output path}."""
    from moescope.pipeline.analyze import analyze_trace
    from moescope.pipeline.summary import print_summary, print_warnings

    markers = ("traces", "results", "quant", "report.html")
    if is_url(out):
        check_output_folder(out, markers=markers, what="demo outputs", remote=True)
        out = location(out)  # a Location: `out / "traces"` names a prefix under it
    else:
        out = prepare_output_folder(out, markers=markers, what="demo outputs")
    outputs: dict[str, str] = {}
    started = time.perf_counter()
    models = ("tiny-moe", "tiny-varmoe", "tiny-dsv3")
    if "capture" in steps:
        for name in models:
            print(f"[demo] capturing moescope:{name} over {DEMO_CORPUS} (eval split, {max_tokens} tokens)")
            _capture_step(f"moescope:{name}", out / "traces" / name, max_tokens=max_tokens, seq_len=seq_len, progress=progress)
            outputs[f"trace:{name}"] = str(out / "traces" / name)
    if "analyze" in steps:
        for name in models:
            print(f"[demo] analysing {name}")
            results = out / "results" / name
            if not is_url(results) and results.exists():
                shutil.rmtree(results)  # derived data: always recomputed from the trace (s3://: replaced when published)
            summary = analyze_trace(out / "traces" / name, results)
            print_summary(summary, limit=12)
            print_warnings(summary)
            outputs[f"results:{name}"] = str(results)
    if "quant" in steps:
        from moescope.pipeline.quant import run_demo_quant

        print("[demo] quantization sensitivity: tiny-moe against its dense twin")
        outputs["quant"] = str(run_demo_quant(out / "quant", max_tokens=quant_tokens, progress=progress))
    if "report" in steps:
        from moescope.reporting import write_report

        report = write_report([out / "results" / name for name in models] + [out / "quant"], out / "report.html")
        outputs["report"] = str(report)
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; outputs under {out}")
    for key, path in outputs.items():
        print(f"  {key:<22} {path}")
    return outputs
