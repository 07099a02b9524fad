"""What the serving tests share: the vLLM environment, a server of moescope:tiny-moe, the openai client there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from moescope.models import shipped_model_path
from moescope.serve.server_process import VllmServer

ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = Path(os.environ.get("MOESCOPE_VLLM_ENV", ROOT / ".venv-vllm"))
SEND = Path(__file__).with_name("send_requests.py")
MODEL = shipped_model_path("tiny-moe")


def vllm_python() -> Path:
    """.venv-vllm's python, or skip saying why there is none."""
    python = VLLM_ENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM environment at {VLLM_ENV}: run bash scripts/setup-vllm.sh")
    probe = subprocess.run([python, "-c", "import vllm, openai"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"vLLM does not import in {VLLM_ENV}: {probe.stderr.strip().splitlines()[-1]}")
    return python


def start_server(log: Path, *, plugin: bool, env: dict[str, str] | None = None, eager: bool = True,
                 wait: bool = True) -> VllmServer:
    """A (ready, with `wait`) server of moescope:tiny-moe (float32, eager), with moescope's plugin on or off."""
    env = {"OMP_NUM_THREADS": "2", **(env or {})}
    if plugin:
        env["MOESCOPE_VLLM_METRICS"] = "1"
    else:
        env.pop("MOESCOPE_VLLM_METRICS", None)
    server = VllmServer(vllm_python(), MODEL, name="tiny-moe", env=env, log=log, eager=eager)
    if wait:
        server.wait_ready()
    return server


def send(server: VllmServer, prompts: list[list[int]], max_tokens: list[int], repeat_seconds: float = 0.0) -> list[dict]:
    """Completions of `prompts` (token ids) through the openai client in .venv-vllm: prompt and generated ids."""
    spec = {"url": server.url, "model": server.name, "prompts": prompts, "max_tokens": max_tokens,
            "repeat_seconds": repeat_seconds}
    result = subprocess.run([vllm_python(), SEND, json.dumps(spec)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def send_in_background(server: VllmServer, prompts, max_tokens, seconds: float) -> subprocess.Popen:
    spec = {"url": server.url, "model": server.name, "prompts": prompts, "max_tokens": max_tokens,
            "repeat_seconds": seconds}
    return subprocess.Popen([vllm_python(), SEND, json.dumps(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def post_completion(server: VllmServer, prompt: list[int], max_tokens: int) -> dict:
    """One completion over plain HTTP from this process (no client start-up: for timing-sensitive tests)."""
    import urllib.request

    body = json.dumps({"model": server.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "return_token_ids": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        choice = json.loads(response.read())["choices"][0]
    return {"prompt_token_ids": choice["prompt_token_ids"], "token_ids": choice["token_ids"]}
