#!/usr/bin/env bash
# System libraries FineTune needs. On Linux: OpenBLAS, so MLX's CPU matmuls skip the wheel's
# reference BLAS (~40x slower). Idempotent; a no-op on macOS (Metal/Accelerate).
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
lib=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
[ "$(uname -m)" = "aarch64" ] && lib=/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0
[ -e "$lib" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "WARNING: no apt-get; install OpenBLAS (pthread build) yourself or MLX training on CPU will be slow" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq libopenblas0-pthread libgfortran5 >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq libopenblas0-pthread libgfortran5 >/dev/null; }
echo "installed OpenBLAS for MLX: $lib"
