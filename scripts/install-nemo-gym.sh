#!/usr/bin/env bash
# Installs NeMo Gym 0.7.0 and the resources servers Chorus is tested against (mcqa,
# structured_outputs, reasoning_gym, math_with_judge, example_single_tool_call) into a
# virtualenv (default ~/.cache/chorus-nemo-gym), for tests/nemo_gym_real.rs
# (CHORUS_TEST_NEMO_GYM_PYTHON=VENV/bin/python) and for running those servers by hand.
# 1.2 GB; about a minute with pip's cache warm.
#
#   scripts/install-nemo-gym.sh [VENV]
#
# nemo-gym declares Python >= 3.13.14 but runs on any 3.13 (pyenv's 3.13.0 here), so pip is
# told to ignore that bound. Its core dependencies go in first, less those the resources
# servers never import (mlflow, datasets, pyarrow, the sandbox and vLLM extras); ray is only
# asked for its version, so its plain wheel does.
set -euo pipefail
venv="${1:-$HOME/.cache/chorus-nemo-gym}"
python="${PYTHON:-python3.13}"
if ! "$python" -V >/dev/null 2>&1; then
  # pyenv keeps each version under its own prefix: take a 3.13 from there.
  for p in "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
    if [ -x "$p" ]; then python="$p"; fi
  done
fi
if ! "$python" -V >/dev/null 2>&1; then
  echo "install-nemo-gym: no Python 3.13 ($python); NeMo Gym needs 3.13: set PYTHON=/path/to/python3.13" >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "openai==2.44.0" "anthropic<=0.109.2" tqdm pydantic pydantic_core devtools \
  "packaging>=24.2" fastapi "mcp>=1.28.1,<2" "anyio>=4.15.1" itsdangerous uvicorn httptools uvloop \
  hydra-core omegaconf rich "scipy>=1.14.1" "aiohttp>=3.14.4" "yappi>=1.7.6" ray "jinja2>=3.1" \
  psutil "orjson>=3.11.6" "urllib3>=2.8.0" "PyJWT>=2.15.1" "sqlparse>=0.6.0" \
  "python-multipart>=0.0.27" wandb pandas "GitPython>=3.1.61" pydot
$pip install -q --no-deps --ignore-requires-python nemo-gym==0.7.0
# What the servers under test import beyond the core.
$pip install -q tiktoken "reasoning-gym>=0.1.19" "math-verify==0.8.0" \
  "openapi-schema-validator==0.6.3" "tomli-w==1.2.0" "xmltodict==1.0.2"
"$venv/bin/python" -c "import nemo_gym, resources_servers; print('nemo-gym', '$venv', list(resources_servers.__path__)[0])"
