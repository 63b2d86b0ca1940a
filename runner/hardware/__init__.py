"""What the machine has:

- `types`: `CPU`, `GPU`, `HardwareProfile` (frozen values);
- `probe`: `probe()` reads CPU, RAM (cgroup limits honoured), NVIDIA GPUs (NVML), disk and memory bandwidth, from
  injected `ProbeSources`;
- `profiles`: hardware profiles as TOML files (`load_profile`, `save_profile`, `with_overrides`).
"""
