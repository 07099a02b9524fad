#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv from pinned dependencies.
# Idempotent: a second run only checks that everything is installed. Needs nothing but python3 (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.moescope-setup-$(cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: a CPU build where one is available locally, never an unpinned (multi-GB CUDA) one
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps -e .
rm -f .venv/.moescope-setup-*
touch "$stamp"
echo "moescope: .venv ready ($(.venv/bin/python -c 'import moescope, torch, transformers; print("moescope", moescope.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'))"
