"""`llmrun serve`: an OpenAI- and Ollama-compatible HTTP server over one engine. FastAPI and uvicorn are
imported only when a server is made."""

from runner.server.config import ModelCard, ServerConfig  # noqa: F401


def create_app(*args, **kwargs):
    from runner.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
