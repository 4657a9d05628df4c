#!/usr/bin/env bash
# What mlx-sora does on this Mac, in one report: the platform (chip, macOS, memory, MLX, Metal), the
# test suite (the default run and `pytest -m gpu`, the parity set on Metal), a demo generation with
# its peak footprint, and MLX on Metal against torch on MPS (scripts/bench_vs_torch.py --device gpu,
# bfloat16 and float32). No Mac has run this script yet: its report is what the README waits for.
#
#   scripts/check_mac.sh                          # everything (the benchmark needs torch, the Open-Sora source)
#   scripts/check_mac.sh --quick                  # the benchmark at small sizes (minutes instead of an hour)
#   scripts/check_mac.sh --dry-run                # print what would run, run nothing (any OS)
#
# Options:
#   --python PY          the Python with mlx-sora installed (default: python3; `pip install -e ".[test]"`)
#   --out FILE           the report (default: ./mlx-sora-mac-report.md; the full output goes to FILE.log)
#   --opensora-src DIR   an Open-Sora checkout at 8d132d7 for the benchmark (default: $OPENSORA_SRC, else
#                        downloaded into ~/.cache/mlx-sora-bench)
#   --quick              bench_vs_torch.py --quick
#   --no-tests / --no-demo / --no-bench   leave a part out
#   --dry-run            print the commands instead of running them
#   -h, --help           this text
# Each part that cannot run says why and what to install; the others still run. Exit status: 0 when
# every part that ran passed, 1 otherwise, 2 for bad options.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="python3"
OUT="$PWD/mlx-sora-mac-report.md"
SRC="${OPENSORA_SRC:-}"
QUICK=()
DRY_RUN=0
DO_TESTS=1
DO_DEMO=1
DO_BENCH=1

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) [[ $# -ge 2 ]] || { echo "error: --python needs a path" >&2; exit 2; }; PY="$2"; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "error: --out needs a file" >&2; exit 2; }; OUT="$2"; shift ;;
    --opensora-src) [[ $# -ge 2 ]] || { echo "error: --opensora-src needs a folder" >&2; exit 2; }; SRC="$2"; shift ;;
    --quick) QUICK=(--quick) ;;
    --no-tests) DO_TESTS=0 ;;
    --no-demo) DO_DEMO=0 ;;
    --no-bench) DO_BENCH=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ $DRY_RUN == 0 && "$(uname -s)" != Darwin ]]; then
  echo "error: this is $(uname -s), not macOS: check_mac.sh reports on a Mac (--dry-run shows what it runs)" >&2
  exit 2
fi

LOG="$OUT.log"
DEMO="$(dirname "$OUT")/mlx-sora-mac-demo.mp4"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mlx-sora-check.XXXXXX")" || { echo "error: cannot make a temporary folder" >&2; exit 2; }
trap 'rm -rf "$WORK"' EXIT  # (ours: made just above)
FAILED=()
if [[ $DRY_RUN == 0 ]]; then
  : > "$OUT"
  : > "$LOG"
fi

report() {  # a line of the report (and of the terminal)
  if [[ $DRY_RUN == 1 ]]; then echo "$*"; else echo "$*" | tee -a "$OUT"; fi
}

run() {  # run a command, its output to the terminal and the log; its exit status returned
  if [[ $DRY_RUN == 1 ]]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
    return 0
  fi
  echo "\$ $*" >> "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

part() {  # part TITLE COMMAND...: run it (its output also in $WORK/part.out) and record the verdict
  local title="$1"; shift
  local status
  run "$@" | tee "$WORK/part.out"
  status=${PIPESTATUS[0]}
  [[ $DRY_RUN == 1 ]] && return 0
  if [[ $status == 0 ]]; then
    report "- $title: passed"
  else
    report "- $title: FAILED (exit $status; see $LOG)"
    FAILED+=("$title")
  fi
  return "$status"
}

skip() { report "- $1: not run: $2"; }

have_python_module() { [[ $DRY_RUN == 1 ]] || "$PY" -c "import $1" > /dev/null 2>&1; }

cd "$REPO" || { echo "error: cannot enter $REPO" >&2; exit 2; }
report "# mlx-sora on a Mac: $(date -u +%Y-%m-%d)"
report ""
report "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"

# ------------------------------------------------------------------ the platform
report ""
report "## Platform"
if [[ $DRY_RUN == 1 ]]; then
  run sw_vers -productVersion
  run sysctl -n machdep.cpu.brand_string hw.memsize
  run "$PY" -c "import mlx.core as mx; print(mx.__version__, mx.metal.is_available(), mx.device_info())"
else
  report "- macOS $(sw_vers -productVersion 2>/dev/null || echo '(sw_vers missing)'), $(uname -m)"
  report "- chip: $(sysctl -n machdep.cpu.brand_string 2>/dev/null || echo unknown), memory: $(( $(sysctl -n hw.memsize 2>/dev/null || echo 0) / 1073741824 )) GiB"
  if ! command -v "$PY" > /dev/null 2>&1; then
    report "- python: $PY not found; give one with --python"
    exit 1
  fi
  report "- python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  if ! "$PY" -c "import mlx.core, mlx_sora" > /dev/null 2>&1; then
    report "- mlx-sora (or MLX) is not installed for $PY; install it first: $PY -m pip install -e \"${REPO}[test]\""
    exit 1
  fi
  report "- MLX: $("$PY" -c 'import mlx.core as mx; print(mx.__version__, "Metal available:", mx.metal.is_available(), "default device:", mx.default_device())')"
  report "- GPU: $("$PY" -c 'import mlx.core as mx; i = mx.device_info(); print(i.get("device_name"), i.get("architecture"), "recommended working set", round(i.get("max_recommended_working_set_size", 0) / 2**30, 1), "GiB")' 2>&1 | tail -1)"
  report "- memory as mlx-sora measures it: $("$PY" -c 'from mlx_sora.runtime import memory as m; o = m.os_memory(); print(o.measure, round(m.process_memory() / 2**20), "MiB now; available", round(m.available_memory() / 2**30, 1), "GiB")' 2>&1 | tail -1)"
fi

# ------------------------------------------------------------------ the tests
report ""
report "## Tests"
if [[ $DO_TESTS == 0 ]]; then
  skip "test suite" "--no-tests"
elif ! have_python_module pytest; then
  skip "test suite" "pytest is missing: $PY -m pip install -e \"${REPO}[test]\""
else
  part "test suite (python -m pytest -q)" "$PY" -m pytest -q -p no:cacheprovider
  [[ $DRY_RUN == 0 ]] && report "  $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$WORK/part.out" | tail -1)"
  part "parity on the default device, Metal (python -m pytest -q -m gpu)" "$PY" -m pytest -q -m gpu -p no:cacheprovider
  [[ $DRY_RUN == 0 ]] && report "  $(grep -E 'passed|failed' "$WORK/part.out" | tail -1)"
fi

# ------------------------------------------------------------------ a demo generation
report ""
report "## Demo generation"
if [[ $DO_DEMO == 0 ]]; then
  skip "demo" "--no-demo"
else
  part "python -m mlx_sora.generate --prompt \"a red circle moving left\"" \
    "$PY" -m mlx_sora.generate --prompt "a red circle moving left" --output "$DEMO"
  if [[ $DRY_RUN == 0 ]]; then
    grep -E '^compute:|^(text encoding|denoising|decoding) |^process |^wrote ' "$WORK/part.out" | awk '!seen[$0]++' \
      | sed 's/^/    /' | tee -a "$OUT"
  fi
fi

# ------------------------------------------------------------------ MLX on Metal against torch on MPS
report ""
report "## MLX (Metal) against torch (MPS): scripts/bench_vs_torch.py --device gpu"
if [[ $DO_BENCH == 0 ]]; then
  skip "benchmark" "--no-bench"
elif ! have_python_module torch; then
  skip "benchmark" "torch is missing: $PY -m pip install torch"
elif [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.backends.mps.is_available() else 1)"; then
  skip "benchmark" "this torch has no MPS backend (torch.backends.mps.is_available() is False)"
elif ! have_python_module einops || ! have_python_module rotary_embedding_torch; then
  skip "benchmark" "the reference's imports are missing: $PY -m pip install einops rotary-embedding-torch"
else
  if [[ -z "$SRC" ]]; then
    SRC="$HOME/.cache/mlx-sora-bench/Open-Sora-8d132d7"
    if [[ ! -f "$SRC/opensora/models/stdit/stdit3.py" ]]; then
      run mkdir -p "$SRC"
      if ! run bash -c "curl -fsSL https://github.com/hpcaitech/Open-Sora/archive/8d132d7.tar.gz | tar -xz -C '$SRC' --strip-components=1"; then
        SRC=""
      fi
    fi
  fi
  if [[ -z "$SRC" || ( $DRY_RUN == 0 && ! -f "$SRC/opensora/models/stdit/stdit3.py" ) ]]; then
    skip "benchmark" "no Open-Sora source at 8d132d7 (download failed); give one with --opensora-src DIR"
  else
    for dtype in bfloat16 float32; do
      part "bench_vs_torch.py --device gpu --dtype $dtype ${QUICK[*]:-}" \
        "$PY" scripts/bench_vs_torch.py --device gpu --dtype "$dtype" --opensora-src "$SRC" --repeats 3 ${QUICK[@]+"${QUICK[@]}"}
      [[ $DRY_RUN == 0 ]] && sed -n '/^machine:/,$p' "$WORK/part.out" | tee -a "$OUT"
    done
  fi
fi

report ""
if [[ $DRY_RUN == 1 ]]; then
  echo "(dry run: nothing was run)"
  exit 0
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  report "Failed: ${FAILED[*]}"
  echo "report: $OUT (full output: $LOG)"
  exit 1
fi
report "Every part that ran passed."
echo "report: $OUT (full output: $LOG)"
