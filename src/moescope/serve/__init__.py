"""Serving: live expert load from inside a running vLLM server, and a terminal view of it.

    vllm serve (MOESCOPE_VLLM_METRICS=1)
      the process running the model (vLLM's engine core, or its worker process):
                   vllm_plugin -> load_counter (counts at BaseRouter._compute_routing, recording/vllm_worker.py)
                   -> prometheus_files (prometheus_client's multiprocess files) [-> load table windows]
      API server:  /metrics (prometheus_client MultiProcessCollector over those files)
    moescope top URL -> top.py (scrape, parse, per-layer balancedness, hottest experts, tokens/s)
"""
