"""What the server is told at start: where to listen, who may call it, how much work it accepts, and what it
serves. Plain frozen values, filled by `llmrun serve` (or a test). ModelCard (what is said about a model) lives
in runner.app.models, where the model index reads it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from runner.app.models import ModelCard

__all__ = ["ServerConfig", "ModelCard"]

DEFAULT_PORT = 8080
DEFAULT_QUEUE = 64
DEFAULT_BODY_LIMIT = 1024 * 1024       # 1 MiB; larger request bodies get 413
DEFAULT_GRACE_S = 30.0                 # SIGTERM: how long in-flight requests may take to finish
# Tokens a request may generate when it sets no limit (OpenAI max_tokens / max_completion_tokens absent, Ollama
# num_predict absent): a backstop, so that a generation nobody reads any more ends on its own. A request raises
# it by asking for more (up to the context); Ollama's num_predict -1 and -2 ask for the whole context.
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    queue: int = DEFAULT_QUEUE         # requests waiting beyond the engine's slots; more get 429
    api_key: str | None = None         # Bearer token; None = no authentication
    cors_origins: tuple[str, ...] = () # CORS off unless given
    max_body_bytes: int = DEFAULT_BODY_LIMIT
    grace_seconds: float = DEFAULT_GRACE_S
    retry_after_s: int = 1             # Retry-After on 429 / 503
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # when a request sets none; None = until the context is full
    responses_kept: int = 1000         # /v1/responses kept in memory for previous_response_id (least recent out)
    responses_kept_bytes: int = 64 * 1024 * 1024   # ... and at most this much of their text

    @property
    def local_only(self) -> bool:
        """Whether only this machine can reach the server (a loopback address)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:      # a host name: it may resolve to anything
            return False

    @property
    def exposed_without_key(self) -> bool:
        """Listening beyond this machine with no API key: anyone who reaches it may call it."""
        return not self.local_only and not self.api_key
