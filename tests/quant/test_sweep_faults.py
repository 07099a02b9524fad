"""Quantization sweeps under faults: SIGKILL at random points resumes at the next configuration and ends in
the uninterrupted results; an exception in the middle of a configuration leaves the weights bit-identical;
two sweeps into one folder at once: the second is refused with a clear message."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from moescope.cli.main import main
from moescope.quant import run_quant_sweep
from moescope.quant import sweep as sweep_module
from moescope.quant.formats import QuantConfigError
from quant_models import ByteTokenizer, documents, qwen3_moe
from warm_cli import wait_until

SWEEP_ARGS = ["--bits", "2,4,8", "--targets", "router,experts", "--max-tokens", "256", "--seq-len", "64", "--batch-size", "4",
              "--device", "cpu", "--no-progress"]


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    """--data for a small text file whose eval split (what quant measures on) holds a few hundred bytes."""
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an it are were which this be".split()
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(200)))
    return ["--data", str(path)]


def _finished(out) -> int:
    """Whole lines in results.jsonl (a torn last line has no newline yet)."""
    try:
        return (out / "results.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _log_ids(out) -> list[str]:
    """Config ids of the whole lines in results.jsonl."""
    try:
        data = (out / "results.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line)["config"]["config_id"] for line in data[: data.rfind(b"\n") + 1].splitlines()]


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _results(out) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    configs = pd.read_parquet(out / "configs.parquet").drop(columns=["seconds"])
    per_layer = pd.read_parquet(out / "per_layer.parquet")
    return configs, per_layer, _without_timings(json.loads((out / "summary.json").read_text()))


def kill_sweep(cli, argv, out, *, kills: int, seed: int) -> list[str]:
    """SIGKILL the sweep `kills` times at random points (after a random number of finished configurations,
    plus a random delay), then rerun it to the end."""
    rng = random.Random(seed)
    history = []
    for attempt in range(kills):
        before = _finished(out)
        target = before + rng.randint(0, 2)  # 0: killed before it finishes a configuration
        run = cli.start(argv)
        if wait_until(lambda: _finished(out) >= target, run):
            run.finished(rng.uniform(0, 0.1))
            run.kill()
        status = run.wait()
        history.append(f"kill {attempt}: configs {before}->{_finished(out)}, exit {status}")
        assert status in (-9, 0), (history, run.log.read_text()[-3000:])
        assert _finished(out) >= before, history
        assert len(set(_log_ids(out))) == len(_log_ids(out)), history  # no configuration is logged twice
        if status == 0:
            return history
    status, log = cli.run(argv)
    history.append(f"final run: exit {status}")
    assert status == 0, (history, log[-3000:])
    return history


def test_sweep_killed_resumes_at_the_next_configuration(warm_cli, tiny_model_dir, corpus, tmp_path):
    status, log = warm_cli.run(["quant", tiny_model_dir, *corpus, *SWEEP_ARGS, "--out", tmp_path / "reference"])
    assert status == 0, log
    history = kill_sweep(warm_cli, ["quant", tiny_model_dir, *corpus, *SWEEP_ARGS, "--out", tmp_path / "killed"],
                         tmp_path / "killed", kills=3, seed=8)
    print("\n".join(history))  # pytest -s shows where each kill landed
    assert sum("exit -9" in h for h in history) >= 2, history
    assert any(h.endswith("exit -9") and not h.split("->")[1].startswith("0,") for h in history), history  # mid-sweep
    # every configuration ran to its line exactly once, in the planned order: each rerun took up the next one
    assert _log_ids(tmp_path / "killed") == _log_ids(tmp_path / "reference"), history
    killed, reference = _results(tmp_path / "killed"), _results(tmp_path / "reference")
    pd.testing.assert_frame_equal(killed[0], reference[0])
    pd.testing.assert_frame_equal(killed[1], reference[1])
    assert killed[2] == reference[2]


@pytest.mark.slow
def test_shipped_model_sweep_survives_many_kills(warm_cli, tmp_path):
    args = ["--data", "wiki", *SWEEP_ARGS, "--per-layer", "--dense-model", "moescope:tiny-dense"]
    status, log = warm_cli.run(["quant", "moescope:tiny-moe", *args, "--out", tmp_path / "reference"])
    assert status == 0, log
    history = kill_sweep(warm_cli, ["quant", "moescope:tiny-moe", *args, "--out", tmp_path / "killed"],
                         tmp_path / "killed", kills=10, seed=3)
    print("\n".join(history))
    assert sum("exit -9" in h for h in history) >= 6, history
    assert sum(h.endswith("exit -9") and not h.split("->")[1].startswith("0,") for h in history) >= 3, history
    assert _log_ids(tmp_path / "killed") == _log_ids(tmp_path / "reference"), history
    killed, reference = _results(tmp_path / "killed"), _results(tmp_path / "reference")
    pd.testing.assert_frame_equal(killed[0], reference[0])
    pd.testing.assert_frame_equal(killed[1], reference[1])
    assert killed[2] == reference[2]


BUDGET = dict(max_tokens=400, seq_len=64, batch_size=4, progress=False, targets=("router", "experts"), bits=(2, 4))


def test_exception_in_the_middle_of_a_configuration_leaves_weights_bit_identical(tmp_path, monkeypatch):
    model = qwen3_moe()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    seen = {"configs": 0, "quantized_when_raised": None}
    real_local = sweep_module.local_deltas

    def count_configs(*args, **kwargs):  # runs inside the patched-weights context of each configuration
        seen["configs"] += 1
        return real_local(*args, **kwargs)

    def fail_in_third(module, args):  # the end-to-end forward pass of the third configuration, mid-model
        if seen["configs"] == 3:
            seen["quantized_when_raised"] = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
            raise RuntimeError("injected fault in layer 1")

    monkeypatch.setattr(sweep_module, "local_deltas", count_configs)
    handle = model.model.layers[1].register_forward_pre_hook(fail_in_third)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_quant_sweep(model, ByteTokenizer(), documents(8, 50), out=tmp_path / "cut", **BUDGET)
    handle.remove()
    assert seen["quantized_when_raised"] is True  # the fault hit while the third configuration's weights were patched
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.dtype == before[name].dtype, name
        assert p.data_ptr() == storage[name], name  # the original storage itself is back
    assert len(_log_ids(tmp_path / "cut")) == 2  # two finished, the third left no line
    monkeypatch.setattr(sweep_module, "local_deltas", real_local)
    resumed = run_quant_sweep(model, ByteTokenizer(), documents(8, 50), out=tmp_path / "cut", **BUDGET)
    full = run_quant_sweep(qwen3_moe(), ByteTokenizer(), documents(8, 50), out=tmp_path / "full", **BUDGET)
    assert (resumed.ran, resumed.skipped) == (2, 2)
    pd.testing.assert_frame_equal(resumed.configs.drop(columns="seconds"), full.configs.drop(columns="seconds"))


def test_second_sweep_into_the_same_folder_is_refused(warm_cli, tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    long_sweep = ["quant", tiny_model_dir, *corpus, *SWEEP_ARGS, "--per-layer", "--scheme", "rtn-asym,rtn-sym,nf4,fp4",
                  "--targets", "router,experts,attention,all", "--out", out]
    first = warm_cli.start(long_sweep)
    try:
        assert wait_until(lambda: _finished(out) >= 1, first), first.log.read_text()[-3000:]
        code = main(["quant", str(tiny_model_dir), *corpus, *SWEEP_ARGS, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "being written by another moescope quant sweep" in err and str(out) in err
        assert not first.finished(), "the first sweep ended before the second was tried: the test proved nothing"
    finally:
        first.kill()
    assert first.wait() == -9
    with pytest.raises(QuantConfigError, match="another model, corpus"):  # the lock died with its owner
        run_quant_sweep(qwen3_moe(), ByteTokenizer(), documents(8, 50), out=out, **BUDGET)
    assert all(isinstance(json.loads(line), dict) for line in (out / "results.jsonl").read_text().splitlines())
