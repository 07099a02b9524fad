"""vLLM's own routed experts (`--enable-return-routed-experts`) -> a trace.

Where vLLM defines the layout:
- `vllm/outputs.py`: `CompletionOutput.routed_experts: np.ndarray | None  # [seq_len,layer_num,topk]`. In vLLM 0.32
  it covers the prompt (from `SamplingParams.routed_experts_prompt_start`, default 0) and the generated
  tokens but the last, which is never fed back; earlier releases put the prompt's rows in
  `RequestOutput.prompt_routed_experts` [prompt_len, layer_num, topk] and only the generated tokens' in
  `routed_experts` (docs.vllm.ai/en/latest/api/vllm/outputs/).
- `vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`: layer_num is every decoder layer
  (`get_total_num_hidden_layers`), in a buffer of zeros that only MoE layers overwrite; ids are logical
  experts (captured before EPLB's remapping), uint8 for up to 256 experts, else uint16 (int32 in the docs).
- `vllm/entrypoints/openai/completion/protocol.py` (`CompletionResponseChoice`) and `chat_completion/protocol.py`:
  over HTTP, `choices[i].routed_experts` is base64 of the array's `.npy` bytes (`np.load(io.BytesIO(
  base64.b64decode(s)))`), next to `choices[i].token_ids` and `prompt_token_ids` (per choice for completions,
  per response for chat) when the request sets `return_token_ids`. A response-level `prompt_routed_experts`
  (older servers) and nested JSON lists are read too.

So a request's rows are the last R tokens that were fed of prompt + generated[:-1]: they start at position
prompt_len + max(generated - 1, 0) - R. Decoder layers whose every row is all zeros are dense layers and
dropped (with k >= 2 no router picks expert 0 twice). With k = 1 such a layer may also be an MoE layer that
routed every token to expert 0: it is still left out, but said on stderr and in the manifest
(`capture.dense_or_expert0_layers`); `--moe-layers` names the MoE decoder layers and keeps exactly those.
vLLM does not return gate weights.

Files: a `.jsonl` of HTTP responses (one per line), or a `.npz` in the replay layout (formats/replay.py:
`routed_experts_<id>` [T, layers, k] with `token_ids_<id>` [T]), which is vLLM's per-request array.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError
from moescope.trace.formats.dense import Imported, check_ids, token_block


def routes_of(value, where: str) -> np.ndarray | None:
    """One request's routed experts as int64 [R, layers, k] (None: absent, or no rows): an array, base64 `.npy`
    text or nested lists."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError):
            raise ImportFormatError(f"{where}: routed_experts is not base64 of a .npy array") from None
    try:
        array = np.asarray(value)
    except ValueError:
        raise ImportFormatError(f"{where}: routed_experts is not a [tokens, layers, k] array") from None
    if array.size == 0 and array.ndim < 3:  # `[]`: no routed token (a one-token completion's generated part)
        return None
    if array.ndim != 3 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ImportFormatError(f"{where}: routed_experts must be integer [tokens, layers, k], got {array.dtype} "
                                f"{list(array.shape)}")
    return array.astype(np.int64)


def _token_ids(value, what: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                                              for t in value):
        raise ImportFormatError(f"{where}: {what} must be a list of token ids (send requests with "
                                "return_token_ids=true)")
    return value


def request_rows(prompt: list[int], generated: list[int], routes: np.ndarray, where: str) -> dict:
    """The trace rows of one request: routes [R, layers, k] of the last R fed tokens of prompt + generated[:-1]."""
    fed = prompt + generated[:-1]
    start = len(fed) - routes.shape[0]
    if start < 0 or start > len(prompt):
        raise ImportFormatError(f"{where}: {routes.shape[0]} routed tokens for a request of {len(prompt)} prompt and "
                                f"{len(generated)} generated tokens (expected at most {len(fed)}, covering the "
                                "generated ones)")
    pos = np.arange(start, len(fed))
    return {"pos": pos, "token_id": np.asarray(fed, np.int64)[start:], "generated": pos >= len(prompt),
            "routes": routes}


def moe_mask(routes: np.ndarray, source: str, moe_layers: list[int] | None) -> tuple[np.ndarray, list[str], dict]:
    """routes [T, layers, k] -> (MoE decoder layers bool [layers], lines for stderr, manifest notes)."""
    n_layers, k = routes.shape[1:]
    if moe_layers is not None:
        bad = [layer for layer in moe_layers if not 0 <= layer < n_layers]
        if bad or not moe_layers:
            raise ImportFormatError(f"{source}: --moe-layers {bad or moe_layers} not among the {n_layers} decoder layers "
                                    "of routed_experts")
        return np.isin(np.arange(n_layers), moe_layers), [], {}
    moe = (routes != 0).any(axis=(0, 2))  # [layers]: a dense layer's rows stay zero
    if not moe.any():
        raise ImportFormatError(f"{source}: every routed expert is 0; the server did not capture routing"
                                + (" (or, top-1, routed every token to expert 0: give --moe-layers)" if k == 1 else ""))
    zero = np.flatnonzero(~moe).tolist()
    if k > 1 or not zero:
        return moe, [], {}
    said = [f"{source}: decoder layer(s) {zero} routed every token to expert 0 or are dense layers (top-1 routing "
            "cannot tell them apart); left out as dense: give --moe-layers to keep them"]
    return moe, said, {"dense_or_expert0_layers": zero}


def assemble(requests: list[dict], source: str, doc_ids: list[str], moe_layers: list[int] | None = None) -> Imported:
    """Requests' rows -> one Imported: sequences in order, MoE layers only."""
    shapes = {r["routes"].shape[1:] for r in requests}
    if len(shapes) != 1:
        raise ImportFormatError(f"{source}: requests have different [layers, k] routed-experts shapes {sorted(shapes)}")
    routes = np.concatenate([r["routes"] for r in requests])  # [T, layers, k]
    moe, said, notes = moe_mask(routes, source, moe_layers)
    ids = routes[:, moe].transpose(1, 0, 2)  # [L, T, k]
    check_ids(ids, source)
    block = token_block(
        seq_id=np.repeat(np.arange(len(requests)), [len(r["pos"]) for r in requests]),
        pos=np.concatenate([r["pos"] for r in requests]),
        token_id=np.concatenate([r["token_id"] for r in requests]),
        generated=np.concatenate([r["generated"] for r in requests]),
        topk_ids=ids,
    )
    return Imported(block, source, "vllm", doc_ids=dict(enumerate(doc_ids)),
                    notes={"decoder_layers": np.flatnonzero(moe).tolist(), **notes}, said=tuple(said))


def read_request_outputs(outputs, source: str = "RequestOutput", moe_layers: list[int] | None = None) -> Imported:
    """vLLM `RequestOutput`s (from `LLM.generate` with `enable_return_routed_experts=True`), every completion."""
    requests, doc_ids = [], []
    for i, out in enumerate(outputs):
        prompt = list(out.prompt_token_ids or [])
        prompt_routes = routes_of(getattr(out, "prompt_routed_experts", None), f"{source}[{i}]")
        for choice in out.outputs:
            where = f"{source}[{i}].outputs[{choice.index}]"
            routes = routes_of(choice.routed_experts, where)
            parts = [r for r in (prompt_routes, routes) if r is not None]
            if not parts:
                raise ImportFormatError(f"{where}: no routed experts (start vLLM with enable_return_routed_experts)")
            requests.append(request_rows(prompt, list(choice.token_ids), np.concatenate(parts), where))
            doc_ids.append(f"{out.request_id}:{choice.index}")
    if not requests:
        raise ImportFormatError(f"{source}: no requests")
    return assemble(requests, source, doc_ids, moe_layers)


def read_http_jsonl(path: Path, moe_layers: list[int] | None = None) -> Imported:
    """One completion or chat-completion response per line, as vLLM's HTTP server returns it."""
    requests, doc_ids = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not UTF-8 text") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            response = json.loads(line)
        except (ValueError, RecursionError):
            raise ImportFormatError(f"{where}: not valid JSON") from None
        if not isinstance(response, dict) or not isinstance(response.get("choices"), list) or not response["choices"]:
            raise ImportFormatError(f"{where}: not a vLLM completion response (no choices)")
        prompt_routes = routes_of(response.get("prompt_routed_experts"), where)
        for choice in response["choices"]:
            if not isinstance(choice, dict):
                raise ImportFormatError(f"{where}: a choice is not an object")
            prompt = _token_ids(choice.get("prompt_token_ids", response.get("prompt_token_ids")), "prompt_token_ids", where)
            generated = _token_ids(choice.get("token_ids"), "token_ids", where)
            routes = routes_of(choice.get("routed_experts"), where)
            parts = [r for r in (prompt_routes, routes) if r is not None]
            if not parts:
                raise ImportFormatError(f"{where}: no routed_experts (start vLLM with --enable-return-routed-experts)")
            requests.append(request_rows(prompt, generated, np.concatenate(parts), where))
            doc_ids.append(f"{response.get('id', line_no)}:{choice.get('index', 0)}")
    if not requests:
        raise ImportFormatError(f"{path}: no responses; nothing to import")
    return assemble(requests, str(path), doc_ids, moe_layers)


def read_replay_npz(path: Path, moe_layers: list[int] | None = None) -> Imported:
    """The replay layout (formats/replay.py): per request routed_experts_<id> [T, layers, k], token_ids_<id> [T]."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError) as err:
        raise ImportFormatError(f"{path}: not a readable .npz of arrays ({str(err).splitlines()[0]})") from None
    names = sorted((n.removeprefix("routed_experts_") for n in arrays if n.startswith("routed_experts_")),
                   key=lambda n: (len(n), n))
    if not names:
        raise ImportFormatError(f"{path}: no routed_experts_<request> arrays")
    requests = []
    for name in names:
        where = f"{path}[{name}]"
        routes = routes_of(arrays[f"routed_experts_{name}"], where)
        tokens = arrays.get(f"token_ids_{name}")
        if tokens is None or tokens.ndim != 1 or len(tokens) != len(routes) or not np.issubdtype(tokens.dtype, np.integer):
            raise ImportFormatError(f"{where}: needs token_ids_{name}, one id per routed token")
        generated = arrays.get(f"generated_{name}", np.zeros(len(tokens), bool)).astype(bool)
        if generated.shape != tokens.shape:
            raise ImportFormatError(f"{where}: generated_{name} must have one flag per token")
        requests.append({"pos": np.arange(len(tokens)), "token_id": tokens.astype(np.int64), "generated": generated,
                         "routes": routes})
    return assemble(requests, str(path), names, moe_layers)


def read_vllm(path: str | os.PathLike, *, moe_layers: list[int] | None = None) -> Imported:
    """`moe_layers`: the MoE decoder layers, kept whatever they routed (default: the layers with a non-zero id)."""
    path = Path(path)
    if not path.is_file():
        raise ImportFormatError(f"{path}: " + ("a folder; give a .jsonl or .npz file" if path.is_dir() else "no such file"))
    return read_replay_npz(path, moe_layers) if path.suffix == ".npz" else read_http_jsonl(path, moe_layers)
