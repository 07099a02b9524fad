"""A user's own data is used whole by every subcommand unless --split is given; built-in corpora keep their
documented default (quant: the eval split, which the shipped models never trained on)."""

from __future__ import annotations

import json

import pytest

from moescope.cli.main import main
from moescope.corpora import iter_corpus, load_corpus
from moescope.corpora.split import split_of

PROMPTS = [f"Question {i}: what is {i} plus {2 * i}? The answer is {3 * i}." for i in range(20)]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n\n".join(PROMPTS) + "\n")
    return path


def _in_eval() -> int:
    """Prompts on the eval side by the documented rule (a text file's split group is `name#block`), computed here."""
    return sum(split_of("text", f"prompts.txt#{k}") == "eval" for k in range(len(PROMPTS)))


def _quant(model_dir, data, out, *extra):
    argv = ["quant", str(model_dir), "--data", str(data), "--out", str(out), "--bits", "8", "--targets", "router",
            "--max-tokens", "100000", "--seq-len", "128", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())["reference"]["moe"]


def test_quant_uses_the_whole_user_file_unless_split_is_given(capsys, tiny_model_dir, prompts, tmp_path):
    reference = _quant(tiny_model_dir, prompts, tmp_path / "q")
    assert reference["sequences"] == 20  # every prompt (one sequence each), not the ~10 % eval side
    assert reference["tokens_predicted"] == sum(len(p) - 1 for p in PROMPTS)  # byte tokenizer: one token per character
    in_eval = _in_eval()
    assert 0 < in_eval < 20
    assert _quant(tiny_model_dir, prompts, tmp_path / "q-eval", "--split", "eval")["sequences"] == in_eval


def test_capture_uses_the_whole_user_file(capsys, tiny_model_dir, prompts, tmp_path):
    argv = ["capture", str(tiny_model_dir), "--data", str(prompts), "--out", str(tmp_path / "t"), "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert sum(s["files"]["sequences"]["rows"] for s in manifest["shards"]) == 20
    assert [source["split"] for source in manifest["corpus"]["sources"]] == ["all"]  # recorded per source


def test_builtin_corpora_keep_their_default_and_user_data_is_whole(prompts):
    """split=None: each source's default; `builtin_split` is the subcommand's documented one for built-ins."""
    mixed = list(iter_corpus(f"humaneval,{prompts}", split=None, builtin_split="eval"))
    assert [d.text for d in mixed if d.source != "humaneval"] == PROMPTS
    assert {d.doc_id for d in mixed if d.source == "humaneval"} == {d.doc_id for d in load_corpus("humaneval", split="eval")}
    assert len(list(iter_corpus(str(prompts), split="eval", builtin_split="all"))) == _in_eval()  # given: applies to all


def test_quant_reads_builtin_corpora_from_their_eval_split():
    from moescope.quant.sweep import _documents

    got = [d.doc_id for d in _documents("humaneval", None)]
    assert got == [d.doc_id for d in load_corpus("humaneval", split="eval")] and 0 < len(got) < 164
