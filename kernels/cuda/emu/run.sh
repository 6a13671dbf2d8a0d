#!/usr/bin/env bash
# Runs the CUDA kernels on the CPU under emulation (cuda_emu.h) against the CPU kernels'
# results. Needs only g++ (C++20) and cargo; no CUDA toolkit, driver or GPU.
#   bash kernels/cuda/emu/run.sh
# (`cargo test -p chorus-kernels --features cuda` runs the same check.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo run -q -p chorus-kernels --example nvfp4_emu_cases -- "$work/cases"
g++ -std=c++20 -O2 -ffp-contract=off -fno-strict-aliasing -pthread -Wall -Wextra -Wno-unknown-pragmas \
    -Wno-unused-parameter -o "$work/emu" "$here/emu_main.cpp"
"$work/emu" "$work/cases"
