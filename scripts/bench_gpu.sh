#!/usr/bin/env bash
# mlx-sora against the real Open-Sora 1.2 PyTorch code on an NVIDIA GPU (H100 class), or on CPU.
#
# Makes a virtual environment with MLX's CUDA backend (mlx[cuda12]) and a CUDA build of torch, gets
# the Open-Sora source at commit 8d132d7, and runs scripts/bench_vs_torch.py twice: bfloat16,
# and float32 with MLX_ENABLE_TF32=0 (torch with TF32 off too), each side in its own process; the
# STDiT3 step (17 and 68 frames), the VAE decode (17 frames) and the T5-XXL-width encoder, plus the
# per-operation table of one block pair. The tables go to stdout and to --out (markdown).
#
#   scripts/bench_gpu.sh                       # on the GPU machine
#   scripts/bench_gpu.sh --cpu --quick         # the same path end to end on a CPU, small sizes
#
# Options:
#   --cpu                CPU wheels (mlx[cpu] + the mkl wheel as BLAS, torch CPU), float32 only
#   --quick              2 STDiT3 blocks, 64x64, 1 T5 layer at width 512, 1 repeat: a smoke run
#   --venv DIR           the environment to create or reuse (default: $BENCH_DIR/venv-gpu or venv-cpu,
#                        BENCH_DIR = $MLX_SORA_BENCH_DIR or ~/.cache/mlx-sora-bench)
#   --opensora-src DIR   an Open-Sora checkout at 8d132d7 (default: downloaded into $BENCH_DIR)
#   --out FILE           where the tables go (default: $BENCH_DIR/results-gpu.md or results-cpu.md)
#   --torch-index URL    pip index of the torch build (default: pytorch.org's cu126 wheels, with --cpu its
#                        CPU wheels; "" = plain `pip install torch`)
#   --torch SPEC         the torch requirement (default: torch), e.g. "torch==2.13.0+cpu"
#   --no-install         use the venv as it is
#   any other argument is passed to bench_vs_torch.py (e.g. --parts stdit --frames 17)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
QUICK=()
VENV=""
SRC="${OPENSORA_SRC:-}"
OUT=""
TORCH_INDEX="unset"
INSTALL=1
TORCH_SPEC=torch
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --quick) QUICK=(--quick) ;;
    --venv) VENV="$2"; shift ;;
    --opensora-src) SRC="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --torch-index) TORCH_INDEX="$2"; shift ;;
    --torch) TORCH_SPEC="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) PASS+=("$1") ;;
  esac
  shift
done
BENCH_DIR="${MLX_SORA_BENCH_DIR:-$HOME/.cache/mlx-sora-bench}"
mkdir -p "$BENCH_DIR"
VENV="${VENV:-$BENCH_DIR/venv-$MODE}"
if [[ $TORCH_INDEX == unset ]]; then
  TORCH_INDEX="https://download.pytorch.org/whl/$([[ $MODE == gpu ]] && echo cu126 || echo cpu)"
fi
TORCH_FROM=(); [[ -n "$TORCH_INDEX" ]] && TORCH_FROM=(--index-url "$TORCH_INDEX")
OUT="${OUT:-$BENCH_DIR/results-$MODE.md}"
PY="$VENV/bin/python"

if [[ $MODE == gpu ]] && ! command -v nvidia-smi >/dev/null; then
  echo "error: no nvidia-smi: this needs an NVIDIA GPU (use --cpu to run the CPU path)" >&2
  exit 2
fi

if [[ $INSTALL == 1 ]]; then
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q -U pip
  "$PY" -m pip install -q "$TORCH_SPEC" "${TORCH_FROM[@]}"
  if [[ $MODE == gpu ]]; then
    "$PY" -m pip install -q "mlx[cuda12]>=0.32"
  else
    "$PY" -m pip install -q "mlx[cpu]>=0.32"
    if [[ $(uname -m) == x86_64 ]]; then "$PY" -m pip install -q mkl; fi  # MLX's CPU BLAS (mlx_sora.runtime.blas)
  fi
  # the project without its dependency list (its mlx[cpu] pin would fight mlx[cuda12]), then what runs
  "$PY" -m pip install -q --no-deps -e "$REPO"
  "$PY" -m pip install -q numpy safetensors sentencepiece huggingface_hub tqdm av ftfy beautifulsoup4 \
    protobuf "transformers>=4.44" "diffusers>=0.30" einops rotary-embedding-torch
fi

if [[ -z "$SRC" ]]; then
  SRC="$BENCH_DIR/Open-Sora-8d132d7"
  if [[ ! -f "$SRC/opensora/models/stdit/stdit3.py" ]]; then
    mkdir -p "$SRC"
    curl -fsSL https://github.com/hpcaitech/Open-Sora/archive/8d132d7.tar.gz | tar -xz -C "$SRC" --strip-components=1
  fi
fi

{
  echo "# mlx-sora vs Open-Sora 1.2 (PyTorch), $MODE, $(date -u +%Y-%m-%d)"
  echo
  if [[ $MODE == gpu ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
  fi
  echo "python: $("$PY" -c 'import sys, mlx.core as mx, torch; print(sys.version.split()[0], "mlx", mx.__version__, "torch", torch.__version__)')"
  echo
} > "$OUT"

run() {  # title, then env assignments and bench_vs_torch.py arguments
  local title="$1"; shift
  echo "## $title" | tee -a "$OUT"
  env "$@" "${QUICK[@]}" "${PASS[@]}" 2>&1 | tee -a "$OUT.log" | sed -n '/^machine:/,$p' | tee -a "$OUT"
  echo | tee -a "$OUT"
}

BENCH=("$PY" "$REPO/scripts/bench_vs_torch.py" --opensora-src "$SRC" --device "$MODE" --repeats 3)
if [[ $MODE == gpu ]]; then
  run "bfloat16" "${BENCH[@]}" --dtype bfloat16 --threads 8
  run "float32, MLX_ENABLE_TF32=0 (torch: TF32 off)" MLX_ENABLE_TF32=0 "${BENCH[@]}" --dtype float32 --threads 8
else
  run "float32 (CPU)" "${BENCH[@]}" --dtype float32
fi
echo "tables: $OUT (full output: $OUT.log)"
