"""The boundary with llama.cpp (llama-cpp-python's low-level ctypes API): loading a model and a context with
llmrun's RunSettings, tokenizing, detokenizing, sampler chains, MoE expert placement and the log sink. llama.cpp
failures (NULL model or context, bad grammar, decode errors) become EngineError here, once.

Import this module only where a model is really loaded: it imports llama_cpp."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc

from runner.core.errors import EngineError, GGUFError, GrammarError, UsageError
from runner.core.run_settings import RunSettings, kv_type
from runner.engine import ggml
from runner.engine.types import SamplingParams, TokenLogprob, TopLogprob
from runner.model.gguf import read_header

EXPERT_PATTERN = rb"ffn_.*_exps"


# ---------------------------------------------------------------------------------------------------- logs

_backend_ready = False
_init_lock = threading.Lock()


@contextlib.contextmanager
def llama_logs():
    """llama.cpp's log lines while the block runs (nothing reaches the user's terminal unless LLMRUN_LLAMA_LOG is
    set; llama.cpp stays silent afterwards). The backend is initialised once, inside the first capture."""
    global _backend_ready
    from runner.engine.buffers import capture_llama_logs

    with capture_llama_logs(echo=bool(os.environ.get("LLMRUN_LLAMA_LOG"))) as cap:
        with _init_lock:
            if not _backend_ready:
                lc.llama_backend_init()
                _backend_ready = True
        yield cap


def _last_error(lines: list[str]) -> str:
    """The most telling lines llama.cpp logged before failing."""
    keep = [ln.strip() for ln in lines if any(w in ln.lower() for w in ("error", "failed", "invalid", "unable"))]
    return "; ".join(keep[-3:])


# ---------------------------------------------------------------------------------------------------- devices

class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def experts_on_cpu_overrides() -> ctypes.Array[_BuftOverride]:
    """A NULL-terminated llama_model_tensor_buft_override array keeping MoE expert tensors in host memory."""
    arr = (_BuftOverride * 2)()
    arr[0].pattern = EXPERT_PATTERN
    arr[0].buft = ggml.cpu_buffer_type()
    return arr


def check_rpc_registered(servers: tuple[str, ...]) -> None:
    """llama.cpp splits a model over the RPC workers registered in this process; a load that names workers not
    registered would silently run without them."""
    missing = [ep for ep in servers if ep not in ggml.registered_rpc_servers()]
    if missing:
        raise EngineError(f"RPC worker(s) {', '.join(missing)} are not registered in this process",
                          hint="load models that use workers through runner.cluster (it probes and registers them)")


# ---------------------------------------------------------------------------------------------------- loading

def check_model_file(path: Path) -> None:
    """Refuse files llama.cpp would abort the whole process on, with a clear error, before it sees them."""
    if not path.exists():
        raise EngineError(f"model file {path} does not exist", hint="give the path of a .gguf file, or a catalog name")
    if not path.is_file():
        raise EngineError(f"{path} is not a file", hint="give the path of a .gguf file")
    try:
        read_header(path)  # the full header check: llama.cpp aborts the process on a malformed one
    except GGUFError as e:
        raise EngineError(f"{path} is not a usable GGUF file: {e.message}", hint=e.hint) from e


@dataclass
class Loaded:
    """A loaded model and context with what the engine needs to know about them."""

    model: object
    ctx: object
    vocab: object
    n_ctx: int            # whole context
    n_ctx_seq: int        # per sequence
    n_seq: int
    n_batch: int
    n_ubatch: int
    n_vocab: int
    n_threads: int
    log_lines: list[str]

    def free(self) -> None:
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None


def load(path: Path, settings: RunSettings, *, n_parallel: int, threads: int, kv_unified: bool = False) -> Loaded:
    """Load the model and create a context with n_parallel sequences."""
    check_model_file(path)
    if settings.rpc_servers:
        check_rpc_registered(tuple(settings.rpc_servers))
    keep = []  # ctypes objects that must live until the load is done
    with llama_logs() as cap:
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = settings.n_gpu_layers
        mp.main_gpu = settings.main_gpu
        if not settings.use_mmap:
            mp.load_mode = lc.LLAMA_LOAD_MODE_NONE
        if settings.tensor_split:
            n = lc.llama_max_devices()
            if len(settings.tensor_split) > n:
                raise UsageError(f"tensor split has {len(settings.tensor_split)} parts; llama.cpp supports {n}")
            split = (ctypes.c_float * n)(*settings.tensor_split)
            keep.append(split)
            mp.tensor_split = split
        mp.use_extra_bufts = settings.repack
        if settings.experts_on_cpu:
            overrides = experts_on_cpu_overrides()
            keep.append(overrides)
            mp.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        model = lc.llama_model_load_from_file(os.fsencode(path), mp)   # a file name need not be UTF-8
        if not model:
            raise EngineError(f"llama.cpp could not load {path}: {_last_error(cap.lines) or 'no reason given'}",
                              hint="check the file is a complete GGUF download (`llmrun pull` verifies it)")
        cp = lc.llama_context_default_params()
        cp.n_ctx = settings.n_ctx
        cp.n_batch = settings.n_batch
        cp.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        cp.n_seq_max = n_parallel
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = kv_type(settings.type_k).ggml_type
        cp.type_v = kv_type(settings.type_v).ggml_type
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.kv_unified = kv_unified or settings.kv_unified
        cp.swa_full = settings.swa_full
        cp.no_perf = True
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            lc.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context (n_ctx {settings.n_ctx}, {n_parallel} sequences, "
                              f"KV {settings.type_k}/{settings.type_v}): {_last_error(cap.lines) or 'no reason given'}",
                              hint="a smaller --ctx or KV type q8_0 needs less memory")
        vocab = lc.llama_model_get_vocab(model)
        loaded = Loaded(model=model, ctx=ctx, vocab=vocab, n_ctx=lc.llama_n_ctx(ctx), n_ctx_seq=lc.llama_n_ctx_seq(ctx),
                        n_seq=lc.llama_n_seq_max(ctx), n_batch=lc.llama_n_batch(ctx), n_ubatch=lc.llama_n_ubatch(ctx),
                        n_vocab=lc.llama_vocab_n_tokens(vocab), n_threads=threads, log_lines=cap.lines)
    return loaded


# ---------------------------------------------------------------------------------------------------- embeddings

# llama.cpp's enum llama_pooling_type, as GGUF files store it in {arch}.pooling_type
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLING_TYPES = {"mean": lc.LLAMA_POOLING_TYPE_MEAN, "cls": lc.LLAMA_POOLING_TYPE_CLS,
                 "last": lc.LLAMA_POOLING_TYPE_LAST}
DEFAULT_POOLING = "mean"     # for models that declare none (causal LMs): see docs/engine.md, "Embeddings"


def declared_pooling(model) -> str | None:
    """The pooling type the GGUF declares ({arch}.pooling_type: embedding models), or None (causal LMs)."""
    arch = meta_str(model, "general.architecture")
    value = meta_str(model, f"{arch}.pooling_type") if arch else None
    if value is None:
        return None
    try:
        return POOLING_NAMES.get(int(value), f"unknown ({value})")
    except ValueError:
        return f"unknown ({value})"


@dataclass
class EmbeddingContext:
    """A second llama.cpp context on an already loaded model, for embeddings: `embeddings=true`, the pooling type
    given, one unified KV cache of `n_tokens` cells that every sequence shares, and n_batch = n_ubatch = n_tokens
    so that every decode is ONE ubatch (llama.cpp pools a sequence within a ubatch, and non-causal models such as
    BERT must see all their tokens at once)."""

    ctx: object
    n_tokens: int          # tokens one decode holds, all its sequences together; also the longest input
    n_seq: int             # sequences (inputs) one decode holds
    n_embd: int
    pooling: str
    log_lines: list[str]

    def free(self) -> None:
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None


def create_embedding_context(model, *, pooling: str, threads: int, settings: RunSettings) -> EmbeddingContext:
    """The embedding context (see EmbeddingContext) for `settings` (runner.core.run_settings.embedding_settings:
    n_ctx = n_batch = n_ubatch = the tokens one decode holds, n_parallel = the inputs, KV types, flash attention)."""
    n_tokens, n_seq = settings.n_ctx, settings.n_parallel
    if pooling not in POOLING_TYPES:
        raise UsageError(f"this model's pooling type is {pooling!r}; embeddings need mean, cls or last pooling",
                         hint="a reranker (rank pooling) scores pairs of texts; it does not embed them")
    with llama_logs() as cap:
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_tokens
        cp.n_seq_max = n_seq
        cp.kv_unified = True
        cp.embeddings = True
        cp.pooling_type = POOLING_TYPES[pooling]
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = kv_type(settings.type_k).ggml_type
        cp.type_v = kv_type(settings.type_v).ggml_type
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise EngineError(f"llama.cpp could not create the embedding context ({n_tokens} tokens, {n_seq} "
                              f"sequences): {_last_error(cap.lines) or 'no reason given'}",
                              hint="free memory (fewer parallel slots or a smaller --ctx), then retry")
    return EmbeddingContext(ctx=ctx, n_tokens=n_tokens, n_seq=n_seq, n_embd=lc.llama_model_n_embd_out(model),
                            pooling=pooling, log_lines=cap.lines)


def pooled_embedding(ctx, seq: int, n_embd: int) -> tuple[float, ...]:
    """The pooled embedding of sequence `seq` after a decode on an embedding context."""
    ptr = lc.llama_get_embeddings_seq(ctx, seq)
    if not ptr:
        raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq}")
    return tuple(ptr[:n_embd])


# ---------------------------------------------------------------------------------------------------- tokens

def meta_str(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


def chat_template(model) -> str | None:
    t = lc.llama_model_chat_template(model, None)
    return t.decode("utf-8", errors="replace") if t else None


def token_text(vocab, token: int) -> str:
    if token < 0:
        return ""
    t = lc.llama_vocab_get_text(vocab, token)
    return t.decode("utf-8", errors="replace") if t else ""


def utf8(text: str, what: str) -> bytes:
    """`text` as UTF-8 for llama.cpp; a UsageError when it cannot be (a lone surrogate, which valid Unicode text
    never holds, but Python strings from JSON escapes or surrogateescape decoding can)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode: a lone surrogate (\\u{ord(text[e.start]):04x}) at character "
                         f"{e.start}", hint="send valid UTF-8 text (surrogates come in pairs)") from e


def tokenize(vocab, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
    data = utf8(text, "the text")
    n_max = len(data) + 8
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        buf = (lc.llama_token * -n)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, -n, add_special, parse_special)
        if n < 0:
            raise EngineError("llama.cpp could not tokenize the text")
    return list(buf[:n])


def check_tokens(tokens, n_vocab: int, *, what: str = "token") -> None:
    """Token ids llama.cpp would abort the process on (out of the vocabulary) get a clear error instead."""
    for i, t in enumerate(tokens):
        if not 0 <= t < n_vocab:
            raise UsageError(f"{what} {t} (at index {i}) is not a token id: the vocabulary has ids 0 to {n_vocab - 1}")


def piece(vocab, token: int, *, special: bool) -> bytes:
    """One token's bytes; with `special`, control tokens (<|im_start|>, BOS, ...) render as their text."""
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:max(n, 0)]


class Detokenizer:
    """Token ids -> bytes (llama_token_to_piece; control tokens not rendered unless `special`)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self._buf = ctypes.create_string_buffer(256)

    def piece(self, token: int, special: bool = False) -> bytes:
        n = lc.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            self._buf = ctypes.create_string_buffer(-n + 16)
            n = lc.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, special)
        return self._buf.raw[:max(n, 0)]


class Logprobs:
    """Log probabilities of a sampled step from its real logits (llama_get_logits_ith): the log-softmax of the
    raw logits over the whole vocabulary, i.e. the model's own distribution before penalties, logit bias,
    grammar, temperature and truncation (as llama-server reports by default and OpenAI documents). Only
    requests that ask for logprobs pay for it: one pass over n_vocab floats, plus a partial sort for the top."""

    def __init__(self, ctx, n_vocab: int, detok: Detokenizer):
        import numpy as np

        self._np = np
        self.ctx, self.n_vocab, self.detok = ctx, n_vocab, detok
        self._buf = np.empty(n_vocab, dtype=np.float32)     # the engine thread's scratch space (one at a time)

    def at(self, idx: int, token: int, top: int, special: frozenset[int] = frozenset()) -> TokenLogprob:
        np = self._np
        ptr = lc.llama_get_logits_ith(self.ctx, idx)
        if not ptr:
            raise EngineError(f"llama.cpp kept no logits for batch position {idx}")
        x = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        m = float(x.max())
        np.subtract(x, m, out=self._buf)
        np.exp(self._buf, out=self._buf)
        lse = m + float(np.log(self._buf.sum(dtype=np.float64)))
        alts: tuple[TopLogprob, ...] = ()
        if top:
            ids = np.argpartition(x, -top)[-top:]
            ids = ids[np.argsort(-x[ids], kind="stable")]
            alts = tuple(self._top(int(t), float(x[t]) - lse, special) for t in ids)
        b = self.detok.piece(token, token in special)
        return TokenLogprob(b.decode("utf-8", errors="replace"), b, float(x[token]) - lse, alts)

    def _top(self, token: int, logprob: float, special: frozenset[int]) -> TopLogprob:
        b = self.detok.piece(token, token in special)
        return TopLogprob(b.decode("utf-8", errors="replace"), b, logprob)


# ---------------------------------------------------------------------------------------------------- sampling

def eog_tokens(vocab, n_vocab: int) -> tuple[int, ...]:
    """Every end-of-generation token of the vocabulary (EOS, EOT, <|im_end|>, ...)."""
    return tuple(t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t))


class Sampler:
    """One request's sampling: a llama.cpp chain (bias, penalties, truncation, temperature, the seeded draw),
    and its grammar apart from it, as llama.cpp's common sampler keeps it. A grammar checked against the whole
    vocabulary costs milliseconds per token (every token's text against every parse stack), so the chain draws
    first and the grammar only checks the drawn token; only when it refuses it is the grammar applied to all
    candidates and the draw made again. A request without a grammar samples in one C call
    (llama_sampler_sample). `sample()` returns None when no token satisfies the grammar (with a logit bias or
    ignore_eos that bans the only ones it allows): a grammar never sees a token it refuses (llama.cpp aborts
    the process on that)."""

    def __init__(self, chain: object, grammar: object | None, n_vocab: int):
        self.chain, self.grammar, self.n_vocab = chain, grammar, n_vocab
        self._cur: object | None = None

    def sample(self, ctx, idx: int, vocab) -> int | None:
        if self.grammar is None:
            return int(lc.llama_sampler_sample(self.chain, ctx, idx))
        cur = self._candidates(ctx, idx)
        lc.llama_sampler_apply(self.chain, ctypes.byref(cur))
        tok = int(cur.data[cur.selected].id)
        single = lc.llama_token_data(tok, 1.0, 0.0)
        one = lc.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(one))
        if single.logit == float("-inf"):              # refused: the grammar first, then the draw again
            cur = self._candidates(ctx, idx)
            lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
            lc.llama_sampler_apply(self.chain, ctypes.byref(cur))
            if cur.selected < 0 or cur.data[cur.selected].logit == float("-inf"):
                return None
            tok = int(cur.data[cur.selected].id)
        if not lc.llama_vocab_is_eog(vocab, tok):      # the end needs no accepting (and a grammar may abort on it)
            lc.llama_sampler_accept(self.grammar, tok)
        lc.llama_sampler_accept(self.chain, tok)
        return tok

    def _candidates(self, ctx, idx: int):
        """The step's logits as llama.cpp's candidate array (as llama_sampler_sample builds it in C)."""
        import numpy as np

        if self._cur is None:
            self._buf = (lc.llama_token_data * self.n_vocab)()
            self._view = np.frombuffer(self._buf, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._cur = True
        ptr = lc.llama_get_logits_ith(ctx, idx)
        if not ptr:
            raise EngineError(f"llama.cpp kept no logits for batch position {idx}")
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        self._view["p"] = 0.0
        return lc.llama_token_data_array(self._buf, self.n_vocab, -1, False)

    def free(self) -> None:
        for s in (self.chain, self.grammar):
            if s:
                lc.llama_sampler_free(s)
        self.chain = self.grammar = None


def sampler(vocab, n_vocab: int, params: SamplingParams, *, eog: tuple[int, ...] = (), seed_offset: int = 0,
            n_ctx: int = 0) -> Sampler:
    """The Sampler of one request: sampler_chain() and, with params.grammar, its grammar sampler."""
    chain = sampler_chain(n_vocab, params, eog=eog, seed_offset=seed_offset, n_ctx=n_ctx)
    try:
        grammar = grammar_sampler(vocab, params.grammar, params.grammar_triggers) if params.grammar else None
    except BaseException:
        lc.llama_sampler_free(chain)
        raise
    return Sampler(chain, grammar, n_vocab)


def sampler_chain(n_vocab: int, params: SamplingParams, *, eog: tuple[int, ...] = (), seed_offset: int = 0,
                  n_ctx: int = 0) -> object:
    """A llama.cpp sampler chain without the grammar, in llama.cpp's common order: logit bias, penalties, then
    top-k, typical-p, top-p, min-p, temperature and the seeded draw (or Mirostat in place of the
    truncations). With params.ignore_eos, `eog` tokens get a -inf bias. `seed_offset`: choice i of a request
    with n > 1 draws from seed + i."""
    sp = lc.llama_sampler_chain_default_params()
    sp.no_perf = True
    chain = lc.llama_sampler_chain_init(sp)
    add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
    try:
        biases = list(params.logit_bias)
        if params.ignore_eos and eog:
            biases += [(t, float("-inf")) for t in eog]
        if biases:
            arr = (lc.llama_logit_bias * len(biases))(*[lc.llama_logit_bias(t, b) for t, b in biases])
            add(lc.llama_sampler_init_logit_bias(n_vocab, len(biases), arr))
        last_n = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
        if last_n and (params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty):
            add(lc.llama_sampler_init_penalties(n_vocab, last_n, params.repeat_penalty, params.frequency_penalty,
                                                params.presence_penalty))
        seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else (params.seed + seed_offset) & 0xFFFFFFFF
        if params.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
        elif params.mirostat:
            add(lc.llama_sampler_init_temp(params.temperature))
            if params.mirostat == 1:
                add(lc.llama_sampler_init_mirostat(n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
            else:
                add(lc.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        else:
            if params.top_k > 0:
                add(lc.llama_sampler_init_top_k(params.top_k))
            if 0 < params.typical_p < 1:
                add(lc.llama_sampler_init_typical(params.typical_p, 1))
            if 0 < params.top_p < 1:
                add(lc.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(lc.llama_sampler_init_min_p(params.min_p, 1))
            add(lc.llama_sampler_init_temp(params.temperature))
            add(lc.llama_sampler_init_dist(seed))
    except BaseException:
        lc.llama_sampler_free(chain)
        raise
    return chain


def grammar_sampler(vocab, grammar: str, triggers: tuple[str, ...] = ()) -> object:
    """llama.cpp's grammar sampler for GBNF text; with `triggers` a lazy one, free until a trigger pattern
    matches the output. A grammar llama.cpp rejects is a GrammarError with llama.cpp's reason: its parser
    prints that to stderr (and a line to its log), so both are captured, and what other threads wrote to stderr
    meanwhile is passed on."""
    from runner.engine.buffers import capture_llama_logs, capture_stderr, pass_on

    data = utf8(grammar, "the grammar")
    with capture_stderr() as err, capture_llama_logs() as log:
        if triggers:
            pats = (ctypes.c_char_p * len(triggers))(*[t.encode() for t in triggers])
            g = lc.llama_sampler_init_grammar_lazy_patterns(vocab, data, b"root", pats, len(triggers), None, 0)
        else:
            g = lc.llama_sampler_init_grammar(vocab, data, b"root")
    reason, rest = grammar_error(err.text, grammar)
    pass_on(rest)
    if not g:
        reason = reason or _last_error(log.lines) or "no reason given"
        raise GrammarError(f"the grammar is not valid GBNF: llama.cpp says {reason}",
                           hint="see llama.cpp's grammars/README.md; the start rule must be named root")
    return g


_GRAMMAR_ERROR = re.compile(r"(?:\w+: )?error parsing grammar: ")
_REASON_CHARS = 160


def grammar_error(stderr: str, grammar: str) -> tuple[str | None, str]:
    """(the reason llama.cpp's grammar parser printed, the rest of `stderr`). The parser prints
    "parse: error parsing grammar: REASON", a blank line and the grammar itself; a REASON such as "unknown escape
    at ..." goes on with the rest of the grammar, so only its first line is kept (shortened)."""
    m = _GRAMMAR_ERROR.search(stderr)
    if m is None:
        return None, stderr
    echo = "\n\n" + grammar + "\n"
    end = stderr.find(echo, m.end())
    if end < 0:
        end = stderr.find("\n", m.end())
        end, tail = (len(stderr), 0) if end < 0 else (end, 1)
    else:
        tail = len(echo)
    reason = stderr[m.end():end].strip().split("\n", 1)[0]
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS - 3] + "..."
    return reason, stderr[:m.start()] + stderr[end + tail:]




def parse_buffer_lines(lines: list[str]) -> dict:
    """llama.cpp's logged buffer sizes {"CPU_Mapped model": bytes, "CPU KV": bytes, ...}."""
    from runner.engine.buffers import parse_buffers

    return parse_buffers(lines)
