"""Every error llmrun raises, in one place.

    LlmrunError                      base; `.hint` says what would be right
    ├── UsageError (ValueError)      a bad argument or option value
    │   └── GrammarError             a grammar (GBNF, or one made from a JSON schema) llama.cpp rejects
    ├── ConfigError (ValueError)     a bad catalog / hardware profile / settings file
    ├── HardwareError                the machine could not be probed
    ├── GGUFError (ValueError)       a GGUF file or header is malformed, truncated or unsupported
    ├── UnknownModelError (KeyError) a model name not in the catalog (with close matches)
    ├── DoesNotFitError              nothing / this configuration does not fit the hardware
    ├── FetchError                   download problems
    │   ├── HubUnreachableError      offline or the hub cannot be reached
    │   ├── HubAuthError             401/403: gated or private, needs HF_TOKEN
    │   ├── RemoteNotFoundError      404: repo, revision or file missing
    │   ├── ChecksumMismatchError    downloaded bytes do not match the expected sha256
    │   ├── DiskSpaceError           not enough free disk for the pull
    │   ├── LicenseNotAcceptedError  the model's licence must be accepted first
    │   └── PullCancelledError       a pull stopped on request (what was downloaded is kept for the next pull)
    ├── ModelNotLocalError           a model is not in the local store
    ├── ConflictError                a model cannot change now: in use, being pulled or deleted, or has copies
    ├── EngineError                  llama.cpp failed to load or run a model
    │   └── ContextOverflowError     a prompt longer than the context window
    ├── ServerError                  the HTTP server could not start
    │   └── CapacityError            no room for a model now: the models holding the memory are busy (retry)
    └── ClusterError                 RPC workers unreachable or incompatible

Foreign errors (NVML, huggingface_hub, llama.cpp, HTTP) are translated into these once, at the boundary
module that talks to the foreign library, always with `raise ... from e`. The CLI prints `message` and
`hint`; the server maps classes to HTTP statuses in one table.
"""

from __future__ import annotations


class LlmrunError(Exception):
    """Base class. `hint` is an optional next step for the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LlmrunError, ValueError):
    """`field`, when set, names the request field at fault (the server's `param`: `tools[0].function.name`)."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, field: str | None = None):
        super().__init__(message, hint=hint)
        self.field = field


class GrammarError(UsageError):
    pass


class ConfigError(LlmrunError, ValueError):
    exit_code = 2


class HardwareError(LlmrunError):
    pass


class GGUFError(LlmrunError, ValueError):
    pass


class UnknownModelError(LlmrunError, KeyError):
    exit_code = 2

    def __init__(self, name: str, close_matches: list[str] | tuple[str, ...] = (), *, hint: str | None = None):
        msg = f"unknown model {name!r}"
        if close_matches:
            msg += "; did you mean: " + ", ".join(close_matches) + "?"
        super().__init__(msg, hint=hint or "`llmrun list --available` shows every model in the catalog")
        self.name = name
        self.close_matches = tuple(close_matches)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class DoesNotFitError(LlmrunError):
    exit_code = 3


class FetchError(LlmrunError):
    pass


class HubUnreachableError(FetchError):
    pass


class HubAuthError(FetchError):
    pass


class RemoteNotFoundError(FetchError):
    pass


class ChecksumMismatchError(FetchError):
    pass


class DiskSpaceError(FetchError):
    pass


class LicenseNotAcceptedError(FetchError):
    pass


class PullCancelledError(FetchError):
    pass


class ModelNotLocalError(LlmrunError):
    pass


class ConflictError(LlmrunError):
    pass


class EngineError(LlmrunError):
    pass


class ContextOverflowError(EngineError):
    pass


class ServerError(LlmrunError):
    pass


class CapacityError(ServerError):
    """A model fits the memory budget, but not now: the loaded models that hold the room are busy. Retry after
    `retry_after_s` seconds (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class ClusterError(LlmrunError):
    pass
