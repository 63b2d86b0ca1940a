#!/usr/bin/env bash
# Sets up .venv with llmrun and llama-cpp-python built for this machine's accelerator.
# Idempotent: a second run with nothing changed returns in about a second.
#
#   LLMRUN_ACCEL=cpu|cuda|metal   force a build flavour (default: detected)
#   LLMRUN_WHEEL_CACHE=DIR        where built llama-cpp-python wheels are kept, one folder per flavour
#   PYTHON=python3.x              interpreter for the virtualenv
#   LLMRUN_NO_CHROMIUM=1          do not install Chromium (the chat page's browser tests are then skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH: install Python 3.11+ or set PYTHON=/path/to/python3"

. scripts/llama_accel.sh                 # accel, reason, cmake_args, flavour (shared with build_llama_server.sh)
say "llama.cpp build: $accel ($reason); CMAKE_ARGS=\"$cmake_args\""

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# The chat page's browser tests (tests/test_webui.py) drive Debian's chromium through Playwright; never a browser
# download of Playwright's own. Checked on every run (a file test when installed), installed as root with apt-get.
ensure_chromium() {
  [ "${LLMRUN_NO_CHROMIUM:-}" = 1 ] && { say "LLMRUN_NO_CHROMIUM=1: the browser tests will be skipped"; return; }
  [ -x /usr/bin/chromium ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the browser tests (apt-get, about a minute)"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null && [ -x /usr/bin/chromium ]; then
      say "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    else
      say "could not install chromium with apt-get: the browser tests will fail (install the chromium package, or set LLMRUN_NO_CHROMIUM=1 to skip them)"
    fi
  else
    say "no /usr/bin/chromium, and installing it needs root and apt-get: the browser tests will be skipped" \
        "(install Debian's chromium package to run them)"
  fi
}
ensure_chromium

stamp="$VENV/.llmrun-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/llama_accel.sh | cksum | cut -d' ' -f1)-$flavour-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import llama_cpp, runner' 2>/dev/null; then
  say "up to date ($VENV, llama-cpp-python $LLAMA_CPP_VERSION $flavour)"
  exit 0
fi

"$PY" -m pip install -q --upgrade pip setuptools wheel

cache=${LLMRUN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmrun/wheels}/llama-cpp-python-$LLAMA_CPP_VERSION-$flavour-$pytag
wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  say "building llama-cpp-python $LLAMA_CPP_VERSION for $accel (about 5 minutes on 2 cores; cached afterwards in $cache)"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$tmp"
  mv "$tmp"/llama_cpp_python-*.whl "$cache"/ && rmdir "$tmp"
  wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n1)
else
  say "using cached llama-cpp-python wheel $wheel"
fi
"$PY" -m pip install -q "$wheel"                                   # with its pure-Python dependencies
"$PY" -m pip install -q --force-reinstall --no-deps "$wheel"        # this flavour, even if another was installed
if [ -n "$EXTRAS" ]; then "$PY" -m pip install -q -e ".[$EXTRAS]"; else "$PY" -m pip install -q -e .; fi
"$PY" -c 'import llama_cpp, runner' || die "llama-cpp-python or llmrun does not import after install"
echo "$want" > "$stamp"
say "ready: $VENV (llama-cpp-python $LLAMA_CPP_VERSION, $flavour)"
