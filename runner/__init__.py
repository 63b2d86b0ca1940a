"""llmrun: a local LLM runner with a hardware-aware launcher.

Modules, in dependency order (an arrow never points back):
    errors, units, settings  (leaf helpers)
    hardware, gguf, catalog  -> estimate -> plan -> fetch -> engine -> chat / server / cluster -> cli
"""

__version__ = "0.1.0"
