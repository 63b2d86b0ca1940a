"""What a model is, before anything runs:

- `gguf`: the GGUF header reader, local or over HTTP Range (raises only GGUFError);
- `layout`: per-tensor bytes and types, from a header or from llama.cpp's quant recipes (data per architecture);
- `catalog`: the model catalog (configs/models.toml) and openness cards;
- `synth`: shape-true synthetic GGUFs for tests and benchmarks.
"""
