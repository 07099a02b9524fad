"""In .venv-vllm: vLLM's own routed experts and moescope's recorder on the same requests (tests/serve).

    python own_routes.py MODEL_FOLDER OUT.json
Asks vLLM for its routed experts (`enable_return_routed_experts`, which needs its V2 model runner) while
moescope's recorder (recording/vllm_worker.py, what `--backend vllm` installs) is on; writes both, per request,
to OUT.json. Exits 3 with vLLM's reason on one line where this vLLM build cannot return routed experts.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the recorder's functions reach the worker by reference
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # what vLLM's routed-experts capture needs
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np  # noqa: E402
from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from moescope.adapters.discover import find_moe_layers  # noqa: E402
from moescope.recording import vllm_worker  # noqa: E402
from moescope.trace.block import Sequence  # noqa: E402
from moescope.recording.options import CaptureSettings  # noqa: E402
from moescope.recording.loading import model_skeleton  # noqa: E402
from moescope.recording.vllm_backend import block_from_vllm  # noqa: E402
from moescope.trace.formats.vllm import read_request_outputs  # noqa: E402


def main(model: str, out: str) -> int:
    args = dict(model=model, enable_return_routed_experts=True, enforce_eager=True, dtype="float32",
                max_model_len=512, enable_prefix_caching=False, seed=0)
    try:
        EngineArgs(**args).create_engine_config()  # vLLM validates the routed-experts request here
    except Exception as err:  # vLLM raises pydantic/Value errors; the reason is all the test needs
        print(" ".join(str(err).split())[:400])
        return 3
    llm = LLM(**args)
    layers = [layer.decoder_layer for layer in find_moe_layers(model_skeleton(model, False))]
    llm.collective_rpc(vllm_worker.install, args=(layers, False))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, n).tolist() for n in (1, 7, 33, 120)]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(max_tokens=5, temperature=0.0), use_tqdm=False)
    chunk = [Sequence(i, p, "t", "t", str(i), "") for i, p in enumerate(prompts)]
    ours = block_from_vllm(chunk, outputs, llm.collective_rpc(vllm_worker.take)[0], CaptureSettings(generate=5))
    theirs = read_request_outputs(outputs).block
    with open(out, "w") as f:
        json.dump({name: {"seq_id": b.seq_id.tolist(), "pos": b.pos.tolist(), "ids": b.topk_ids.tolist()}
                   for name, b in (("moescope", ours), ("vllm", theirs))}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
