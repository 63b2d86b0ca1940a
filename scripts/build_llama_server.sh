#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` and `llama-bench` from the llama.cpp that the pinned llama-cpp-python sdist
# vendors (the version scripts/setup.sh installs), for the same accelerator scripts/setup.sh picks, so that
# scripts/bench_serve.py and scripts/bench_engine.py compare llmrun with the C++ server on the same llama.cpp.
# The sdist comes from PyPI through pip (no other network); cmake builds only these two targets, Release,
# statically linked. The binaries are cached under the user cache with a stamp: a second run prints where they are
# in about a second. The last line of output is the folder that holds both binaries.
#
#   LLMRUN_ACCEL=cpu|cuda|metal   force a build flavour (default: detected, as in scripts/setup.sh)
#   LLMRUN_LLAMA_SERVER_CACHE=DIR where builds are kept (default: ~/.cache/llmrun/llama-server), one folder per
#                                 version and flavour
#   CMAKE_BUILD_PARALLEL_LEVEL=N  compile jobs (default: the number of cores)
#   PYTHON=python3.x              interpreter whose pip downloads the sdist (default: .venv/bin/python, else python3)
#   --force                       rebuild even when the cached build is up to date
#   --check                       only print the folder when the cached build is up to date; exit 3 otherwise
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[llama-server] %s\n' "$*" >&2; }
die() { printf '[llama-server] error: %s\n' "$*" >&2; exit 1; }

force=0
check=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    --check) check=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (expected --force, --check or --help)" ;;
  esac
done

LLAMA_CPP_VERSION=$(sed -n 's/^LLAMA_CPP_VERSION=//p' scripts/setup.sh)
[ -n "$LLAMA_CPP_VERSION" ] || die "no LLAMA_CPP_VERSION= line in scripts/setup.sh"
. scripts/llama_accel.sh                 # accel, reason, cmake_args, flavour: the same choice as scripts/setup.sh

command -v cmake >/dev/null || die "no 'cmake' on PATH: install cmake 3.21+ (e.g. 'pip install cmake' or your package manager)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work: set PYTHON to an interpreter with pip"

root=${LLMRUN_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmrun/llama-server}
dest="$root/$LLAMA_CPP_VERSION-$flavour"
bin="$dest/bin"
stamp="$dest/.stamp"
static_args="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
want="$LLAMA_CPP_VERSION $flavour $cmake_args $static_args"   # what the binaries depend on

if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ]; then
  say "up to date: llama.cpp from llama-cpp-python $LLAMA_CPP_VERSION, $flavour"
  echo "$bin"
  exit 0
fi
[ "$check" = 0 ] || { say "not built yet for $LLAMA_CPP_VERSION-$flavour: run scripts/build_llama_server.sh"; exit 3; }

jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)}
say "building llama-server and llama-bench from llama-cpp-python $LLAMA_CPP_VERSION's llama.cpp: $accel ($reason),"
say "  $jobs jobs, about 8 minutes on 2 cores; cached afterwards in $dest"
mkdir -p "$root"
work=$(mktemp -d "$root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$work/sdist" \
  || die "could not download the llama-cpp-python $LLAMA_CPP_VERSION sdist from PyPI"
sdist=$(ls "$work"/sdist/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz 2>/dev/null) \
  || die "pip did not leave llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz in $work/sdist"
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || die "the sdist has no vendor/llama.cpp/CMakeLists.txt"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
t0=$(date +%s)
# shellcheck disable=SC2086  # cmake_args and static_args are word lists
cmake -S "$src" -B "$work/build" "${generator[@]}" $static_args $cmake_args > "$work/configure.log" 2>&1 \
  || { tail -n 40 "$work/configure.log" >&2; die "cmake configure failed (log above)"; }
CMAKE_BUILD_PARALLEL_LEVEL=$jobs cmake --build "$work/build" --config Release --target llama-server llama-bench \
  > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "build failed (log above)"; }

built="$work/build/bin"
[ -x "$built/llama-server" ] && [ -x "$built/llama-bench" ] || die "the build left no llama-server/llama-bench in $built"
"$built/llama-server" --version >/dev/null 2>&1 || die "the built llama-server does not run ('$built/llama-server --version')"

rm -rf "$dest"
mkdir -p "$bin"
cp "$built/llama-server" "$built/llama-bench" "$bin/"
"$bin/llama-server" --version > "$dest/version.txt" 2>&1 || true
echo "$want" > "$stamp"
say "built in $(( $(date +%s) - t0 )) s (configure and compile, without the download)"
say "llama-server: $bin/llama-server"
say "llama-bench:  $bin/llama-bench"
echo "$bin"
