"""The inference engine: llama.cpp through llama-cpp-python's low-level API.

- `types`: the engine contract (`Engine`, `Generation`) and its values (`SamplingParams`, `ChatMessage`, `Tools`,
  `ToolCall`, `Delta`, `Completion`, `EngineStats`, `Embeddings`); no llama_cpp import;
- `generation`: `GenerationHandle` (the one implementation of `Generation`) and the per-request output pipeline
  (stop strings, tool calls, logprobs);
- `tools`, `tool_stream`: tool calling per chat-template family, and the streaming parser of calls;
- `grammar`: GBNF grammars from JSON schemas (llama.cpp's converter, imported lazily);
- `batching`: `LlamaEngine`, continuous batching over one llama.cpp context, and `start_engine`;
- `steps`: `StepClock`, the engine thread's Python time per decode step (microseconds);
- `embedding`: embeddings on the engine thread, on a second context created on first use;
- `native`: the llama.cpp boundary (load, tokenize, samplers); llama.cpp failures become EngineError here;
- `ggml`: the one ctypes loader of libggml (device registry, buffer types, RPC registration);
- `template`: chat templates (the GGUF's Jinja template with tools, or Llama 2's format);
- `buffers`, `report`: llama.cpp's logged buffer sizes, and their comparison with the estimate.

Importing this package imports nothing; `batching`, `embedding`, `native` and `ggml` import llama_cpp.
"""
