"""Send completions to a vLLM server with the openai client; print what came back as one JSON line.

Runs in .venv-vllm (openai is vLLM's dependency, not moescope's), started by the tests and the bench:
    python send_requests.py '{"url": ..., "model": ..., "prompts": [[ids], ...], "max_tokens": [n, ...]}'
prompts are token-id lists (sent as such, so the routed tokens are exactly known); decoding is greedy.
With "repeat_seconds": S it keeps sending the list until S seconds have passed.
"""

import json
import sys
import time

from openai import OpenAI


def main() -> None:
    spec = json.loads(sys.argv[1])
    client = OpenAI(base_url=spec["url"] + "/v1", api_key="unused", max_retries=0, timeout=600)
    results, started = [], time.monotonic()
    while True:
        for prompt, n in zip(spec["prompts"], spec["max_tokens"]):
            response = client.completions.create(model=spec["model"], prompt=prompt, max_tokens=n, temperature=0.0,
                                                 extra_body={"return_token_ids": True})
            choice = response.choices[0].model_dump()
            results.append({"prompt_token_ids": choice["prompt_token_ids"], "token_ids": choice["token_ids"]})
        if time.monotonic() - started >= spec.get("repeat_seconds", 0):
            break
    print(json.dumps(results))


if __name__ == "__main__":
    main()
