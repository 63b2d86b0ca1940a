"""The one ctypes loader of llama.cpp's ggml libraries, as llama-cpp-python ships them: opened once, by the exact
file names libllama.so loaded (`libggml.so.0`, not `libggml.so`: the wheel ships both as separate copies, and a
second copy would hold a second, empty backend registry), with every signature llmrun calls declared, and only
for a ggml version whose C API was read and tested (`VERIFIED_GGML`: ctypes checks no signature).

Users: the engine (keep MoE experts in host memory: the CPU device's buffer type) and the cluster (RPC workers:
the worker's server loop, registering remote devices). llama.cpp aborts the process when an RPC worker it is
told about cannot be reached, so `register_rpc_servers` must only be given workers just probed
(runner.cluster.rpc does), or be called in a process that may die.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from runner.core.errors import EngineError

# ggml versions whose headers (ggml-backend.h, ggml-rpc.h) we read and whose bindings the tests exercise
VERIFIED_GGML = {"0.25.3": "0c1e570"}
DEV_TYPE_CPU = 0                     # enum ggml_backend_dev_type


def lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("llama-cpp-python is not installed", hint="run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@dataclass(frozen=True)
class Libs:
    base: ctypes.CDLL                # libggml-base: devices, buffer types, registry lookups
    ggml: ctypes.CDLL                # libggml: the backend registry
    rpc: ctypes.CDLL | None          # libggml-rpc, None when this build has no RPC backend
    version: str                     # "0.25.3 (0c1e570)"


@functools.lru_cache(maxsize=1)
def libs() -> Libs:
    """The libraries, loaded and declared once per process. EngineError when missing or of an unchecked version."""
    import llama_cpp  # noqa: F401  (loads libllama.so, and with it the libggml.so.0 we must share)

    d = lib_dir()
    try:
        base = ctypes.CDLL(str(d / "libggml-base.so.0"))
        ggml = ctypes.CDLL(str(d / "libggml.so.0"))
    except OSError as e:
        raise EngineError(f"llama.cpp's ggml libraries cannot be opened: {e}", hint="run `make setup`") from e
    try:
        rpc: ctypes.CDLL | None = ctypes.CDLL(str(d / "libggml-rpc.so.0"))
    except OSError:
        rpc = None
    c_void_p, c_char_p, c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    try:
        base.ggml_version.restype = c_char_p
        base.ggml_commit.restype = c_char_p
        version = base.ggml_version().decode()
        commit = base.ggml_commit().decode()
        ggml.ggml_backend_dev_count.restype = c_size_t
        ggml.ggml_backend_dev_get.argtypes = [c_size_t]
        ggml.ggml_backend_dev_get.restype = c_void_p
        ggml.ggml_backend_dev_by_name.argtypes = [c_char_p]
        ggml.ggml_backend_dev_by_name.restype = c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_by_type.restype = c_void_p
        ggml.ggml_backend_reg_by_name.argtypes = [c_char_p]
        ggml.ggml_backend_reg_by_name.restype = c_void_p
        ggml.ggml_backend_register.argtypes = [c_void_p]
        ggml.ggml_backend_register.restype = None
        for name, restype in (("ggml_backend_dev_name", c_char_p), ("ggml_backend_dev_description", c_char_p),
                              ("ggml_backend_dev_type", ctypes.c_int), ("ggml_backend_dev_buffer_type", c_void_p)):
            fn = getattr(base, name)
            fn.argtypes, fn.restype = [c_void_p], restype
        base.ggml_backend_dev_memory.argtypes = [c_void_p, ctypes.POINTER(c_size_t), ctypes.POINTER(c_size_t)]
        base.ggml_backend_dev_memory.restype = None
        base.ggml_backend_reg_get_proc_address.argtypes = [c_void_p, c_char_p]
        base.ggml_backend_reg_get_proc_address.restype = c_void_p
        base.ggml_backend_reg_dev_count.argtypes = [c_void_p]
        base.ggml_backend_reg_dev_count.restype = c_size_t
        if rpc is not None:
            rpc.ggml_backend_rpc_start_server.argtypes = [c_char_p, c_char_p, c_size_t, c_size_t, c_void_p]
            rpc.ggml_backend_rpc_start_server.restype = None
            rpc.ggml_backend_rpc_get_device_memory.argtypes = [c_char_p, ctypes.c_uint32, ctypes.POINTER(c_size_t),
                                                                ctypes.POINTER(c_size_t)]
            rpc.ggml_backend_rpc_get_device_memory.restype = None
    except AttributeError as e:
        raise EngineError(f"llama.cpp's libraries lack a function llmrun binds: {e}",
                          hint="install the pinned llama-cpp-python (0.3.36): run `make setup`") from e
    if VERIFIED_GGML.get(version) != commit.removesuffix("-dirty")[:7]:
        raise EngineError(f"llama.cpp ggml {version} ({commit}) is not a version llmrun's ggml binding was "
                          "checked against; its C signatures may differ",
                          hint="verified: " + ", ".join(f"ggml {v} ({c})" for v, c in VERIFIED_GGML.items()))
    return Libs(base, ggml, rpc, f"{version} ({commit})")


@dataclass(frozen=True)
class Device:
    name: str                        # "CPU", "CUDA0", ...
    description: str
    is_cpu: bool
    free_bytes: int
    total_bytes: int


def devices() -> list[Device]:
    """The devices llama.cpp sees in this process (RPC devices included once registered)."""
    lib = libs()
    out = []
    for i in range(lib.ggml.ggml_backend_dev_count()):
        dev = lib.ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(lib.base.ggml_backend_dev_name(dev).decode(),
                          (lib.base.ggml_backend_dev_description(dev) or b"").decode(),
                          lib.base.ggml_backend_dev_type(dev) == DEV_TYPE_CPU, free.value, total.value))
    return out


def device_handle(name: str) -> int:
    """The ggml_backend_dev_t of the device called `name` (0 when there is none)."""
    return libs().ggml.ggml_backend_dev_by_name(name.encode()) or 0


def cpu_buffer_type() -> int:
    """The CPU device's buffer type (host memory), for tensor buffer-type overrides."""
    lib = libs()
    cpu = lib.ggml.ggml_backend_dev_by_type(DEV_TYPE_CPU)
    if not cpu:
        raise EngineError("llama.cpp has no CPU device")
    return lib.base.ggml_backend_dev_buffer_type(cpu)


def has_rpc() -> bool:
    lib = libs()
    return lib.rpc is not None and bool(lib.ggml.ggml_backend_reg_by_name(b"RPC"))


_registered: dict[str, int] = {}     # endpoint -> number of devices registered in this process


def registered_rpc_servers() -> tuple[str, ...]:
    return tuple(_registered)


def register_rpc_servers(endpoints: tuple[str, ...] | list[str]) -> int:
    """Add every worker's devices to llama.cpp's backend registry (once per endpoint per process), in order, so the
    next model load splits across them, as llama.cpp's own `--rpc` does. llama.cpp ABORTS THE PROCESS when a
    worker cannot be reached: probe them first (runner.cluster.rpc.register_servers). Returns the number of RPC
    devices now registered."""
    lib = libs()
    if not has_rpc():
        raise EngineError("this llama.cpp build has no RPC backend",
                          hint="reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=ON (`make setup` does)")
    reg = lib.ggml.ggml_backend_reg_by_name(b"RPC")
    add = lib.base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not add:
        raise EngineError("llama.cpp's RPC backend has no ggml_backend_rpc_add_server procedure",
                          hint="install the pinned llama-cpp-python (0.3.36) built with -DGGML_RPC=ON")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)
    for ep in endpoints:
        if ep in _registered:
            continue
        server_reg = add_server(ep.encode())
        if not server_reg:
            raise EngineError(f"RPC worker {ep} offers no device")
        lib.ggml.ggml_backend_register(server_reg)
        _registered[ep] = lib.base.ggml_backend_reg_dev_count(server_reg)
    return sum(_registered.values())
