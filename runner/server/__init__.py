"""`llmrun serve`: the HTTP faces over one native path.

- `app`: the FastAPI app (`create_app`): middleware, the error table, /health, /metrics;
- `native`: the one generation path both APIs share (admission, submit, stream, cancel);
- `openai_api` (+ `openai_shapes`), `responses_api` (+ `responses_shapes`, `response_store`: OpenAI's Responses
  API), `anthropic_api` (Anthropic's Messages API), `ollama_api`: thin adapters that only translate shapes;
- `embeddings_api`, `tokens_api`: /v1/embeddings, /api/embed(dings) over `Engine.embed`; llama-server's /tokenize,
  /detokenize, /apply-template;
- `manage_api`: model management in Ollama's shapes (/api/pull with NDJSON progress, /api/delete, /api/copy);
- `common`, `errors`, `metrics`, `config`, `lifecycle`: shared state, the status table, Prometheus metrics,
  frozen settings, bind/serve/SIGTERM;
- `webui`: the chat page at `/` (the plain files in `ui/`, shipped as package data, no build step);
- `status`: `GET /llmrun/status`, the machine (probed once) and the loaded model's buffers for the page.

Importing this package imports nothing; `app` imports FastAPI.
"""
