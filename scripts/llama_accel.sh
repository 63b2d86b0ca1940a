# Sourced by scripts/setup.sh and scripts/build_llama_server.sh: which llama.cpp build this machine gets, decided
# the same way for llama-cpp-python and for llama-server/llama-bench, so benchmarks compare like with like.
# Needs say() and die() from the caller. Sets: accel (cpu|cuda|metal), reason, cmake_args, flavour; for cuda it
# also exports CUDACXX and puts nvcc on PATH.
#
#   LLMRUN_ACCEL=cpu|cuda|metal   force a build flavour (default: detected)

find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  for c in /usr/local/cuda/bin/nvcc /opt/cuda/bin/nvcc; do [ -x "$c" ] && { echo "$c"; return; }; done
  return 1
}
have_nvidia_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then return 0; fi
  ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1
}

accel=${LLMRUN_ACCEL:-}
reason=""
if [ -z "$accel" ]; then
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
    accel=metal; reason="Apple Silicon"
  elif have_nvidia_gpu; then
    if nvcc=$(find_nvcc); then accel=cuda; reason="NVIDIA GPU and $nvcc found"
    else accel=cpu; reason="NVIDIA GPU found but no nvcc (install the CUDA toolkit for a GPU build)"; fi
  else
    accel=cpu; reason="no NVIDIA GPU found"
  fi
else
  reason="LLMRUN_ACCEL=$accel"
fi

cmake_args="-DGGML_RPC=ON"
case "$accel" in
  cpu)   flavour_extra=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.features 2>/dev/null || uname -m) | cksum | cut -c1-8) ;;
  cuda)  nvcc=$(find_nvcc) || die "LLMRUN_ACCEL=cuda but no nvcc found"
         export CUDACXX=$nvcc PATH="$(dirname "$nvcc"):$PATH"
         cmake_args="$cmake_args -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native"
         flavour_extra=$( ("$nvcc" --version; nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null) | cksum | cut -c1-8) ;;
  metal) cmake_args="$cmake_args -DGGML_METAL=on"; flavour_extra=$(uname -m) ;;
  *) die "LLMRUN_ACCEL must be cpu, cuda or metal, not '$accel'" ;;
esac
flavour="$accel-rpc-$flavour_extra"
