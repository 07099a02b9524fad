"""Ray as an optional extra: clear one-line errors for a missing Ray or a bad address, and no Ray import
anywhere on the in-process paths."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import moescope
from moescope.cli.main import main

SRC = Path(moescope.__file__).parent


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "t"
    return moescope.capture("moescope:tiny-moe", "wiki", out=out, progress=False,
                            options=moescope.CaptureOptions(max_tokens=64)).folder


def test_nothing_outside_distributed_imports_ray_at_module_level():
    """Lazy imports inside functions are how the --ray branches reach Ray; a module-level one would make
    every in-process run import it."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if "distributed" in path.relative_to(SRC).parts:
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(SRC)}: {n}" for n in names
                          if n.split(".")[0] == "ray" or n.startswith("moescope.distributed")]
    assert offenders == []


@pytest.mark.parametrize("command", ["capture", "analyze"])
def test_ray_not_installed_is_one_line(command, small_trace, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra looks like to import
    argv = (["capture", "moescope:tiny-moe", "--data", "wiki", "--max-tokens", "64", "--out", str(tmp_path / "o")]
            if command == "capture" else ["analyze", str(small_trace), "--out", str(tmp_path / "o")])
    assert main([*argv, "--ray"]) == 2
    assert capsys.readouterr().err.strip() == "error: --ray needs Ray: pip install 'moescope[ray]' (or run scripts/setup.sh)"
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "nothing answers there"),  # a closed port: refused at once, not after Ray's minutes of retries
    ("no-port", "not a Ray address"),
    ("host:99999", "not a Ray address"),
])
def test_a_bad_ray_address_is_one_line(address, says, small_trace, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'moescope[ray]')")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process")
    for argv in (["capture", "moescope:tiny-moe", "--data", "wiki", "--max-tokens", "64", "--out", str(tmp_path / "c")],
                 ["analyze", str(small_trace), "--out", str(tmp_path / "a")]):
        assert main([*argv, "--ray", address, "--no-progress"] if argv[0] == "capture" else [*argv, "--ray", address]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: ") and says in err and "\n" not in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "a").exists()
    assert not ray.is_initialized()


def test_an_output_url_is_never_made_into_a_local_folder(s3, tmp_path, monkeypatch, capsys):
    """Path('s3://b/t') would be the relative folder 's3:/b/t': URLs go to their store (a moto S3 server here)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    capture = ["capture", "moescope:tiny-moe", "--data", "wiki", "--max-tokens", "64", "--seq-len", "32", "--no-progress"]
    assert main([*capture, "--out", "s3://no-such-bucket-anywhere/traces/t"]) == 2
    assert "no such bucket" in capsys.readouterr().err
    assert main([*capture, "--out", f"file://{tmp_path}/t"]) == 0
    assert moescope.open_trace(tmp_path / "t").complete and moescope.open_trace(f"file://{tmp_path}/t").n_tokens == 64
    assert main([*capture, "--out", f"{s3}/t"]) == 0 and moescope.open_trace(f"{s3}/t").n_tokens == 64
    assert list(work.iterdir()) == []
