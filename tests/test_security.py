"""Security properties, as tests: nothing on a load path unpickles, remote code runs only when asked for, and no
code path touches the network unless the user named a hub model. (HTML escaping of model and user strings is
tested in tests/reporting/test_report.py::test_user_and_model_text_is_escaped.)"""

from __future__ import annotations

import ast
import json
import socket
from pathlib import Path

import pytest
import torch

import moescope
from moescope.cli.main import build_parser, main
from moescope.errors import MoescopeError

SRC = Path(moescope.__file__).parent


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            yield name, node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_source_has_no_pickle_eval_or_remote_code_defaults():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(SRC)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") for n in names):
                    problems.append(f"{where}:{node.lineno}: imports {names}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # no function defaults to remote code
                args = node.args.args[-len(node.args.defaults):] if node.args.defaults else []
                pairs = [*zip(args, node.args.defaults), *zip(node.args.kwonlyargs, node.args.kw_defaults)]
                for arg, default in pairs:  # (a keyword-only argument without a default has None here: callers choose)
                    if arg.arg == "trust_remote_code" and default is not None and \
                            not (isinstance(default, ast.Constant) and default.value is False):
                        problems.append(f"{where}:{node.lineno}: {node.name}(trust_remote_code=...) does not default to False")
        for name, call in _calls(tree):
            if name == "load" and isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch" \
                    and _keyword(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            if name == "load" and getattr(getattr(call.func, "value", None), "id", "") in ("np", "numpy") \
                    and _keyword(call, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{call.lineno}: np.load with allow_pickle")
            if name in ("eval", "exec") and isinstance(call.func, ast.Name):
                problems.append(f"{where}:{call.lineno}: {name}()")
            if _keyword(call, "trust_remote_code") is True:
                problems.append(f"{where}:{call.lineno}: trust_remote_code=True hard-coded")
    assert problems == []


def test_cli_and_api_leave_remote_code_off_unless_asked():
    parser = build_parser()
    for argv in (["capture", "m", "--data", "d", "--out", "o"], ["inspect", "m"]):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True


def _model_folder(tmp_path, tiny_model_dir) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            (folder / item.name).write_bytes(item.read_bytes())
    return folder


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded with code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_never_executes(tmp_path, tiny_model_dir):
    folder = _model_folder(tmp_path, tiny_model_dir)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(MoescopeError):
        from moescope.recording.loading import load_model

        load_model(str(folder), device="cpu")
    assert not marker.exists()


def test_remote_code_in_a_model_folder_runs_only_when_asked(tmp_path, tiny_model_dir, capsys):
    folder = _model_folder(tmp_path, tiny_model_dir)
    marker = tmp_path / "ran"
    (folder / "evil_config.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                           "from transformers import Qwen3MoeConfig as EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not marker.exists()


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or connect is recorded and refused."""
    attempts = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"network blocked by the test ({what})")
        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


def test_shipped_model_pipeline_touches_no_network(no_network, tmp_path, capsys):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i} times" for i in range(80)))
    steps = [
        ["capture", "moescope:tiny-moe", "--data", str(corpus), "--out", str(tmp_path / "t"), "--max-tokens", "256",
         "--seq-len", "32", "--device", "cpu", "--no-progress"],
        ["analyze", str(tmp_path / "t"), "--out", str(tmp_path / "r")],  # loads the model and tokenizer again
        ["quant", "moescope:tiny-moe", "--data", str(corpus), "--out", str(tmp_path / "q"), "--bits", "4",
         "--targets", "router", "--max-tokens", "128", "--seq-len", "32", "--no-progress"],
        ["report", str(tmp_path / "q"), "--out", str(tmp_path / "report.html")],  # (the analysis figures: slow, same code)
    ]
    for argv in steps:
        assert main(argv) == 0, capsys.readouterr().err
    assert no_network == []


def test_an_unknown_hub_id_is_one_clear_error_offline(no_network, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no retries
    code = main(["capture", "no-such-org/no-such-moe-model", "--data", "wiki", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "no-such-org/no-such-moe-model" in err, err
    assert not (tmp_path / "t").exists()
