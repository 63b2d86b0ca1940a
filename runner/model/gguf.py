"""GGUF header reader: metadata and tensor infos from a local file or from the first bytes of a remote one.

Reads only the header (never tensor data) with its own small streaming parser (GGUF v2/v3, little-endian) over the
`gguf` package's constants, so a corrupt or truncated file gets a clear `GGUFError` before llama.cpp, which aborts
the whole process on some bad inputs, ever sees it. Every check names what is wrong:

- magic, version, tensor and key counts (bounded), string and array lengths (bounded and inside the bytes there),
  value types, no duplicate keys or tensor names;
- tensors: at most 4 dimensions, each > 0, a known ggml type whose block divides the row, offsets aligned to
  `general.alignment` (default 32), no overlaps, and every tensor inside the file when its size is known.

Large arrays (tokenizer tokens, scores, merges) are validated while skipped and kept only as
`{"type": "array", "item_type": "STRING", "len": N}`; strings (the chat template) and arrays of fewer than 64 items
are kept as values.

`read_header_remote` fetches growing prefixes with HTTP Range requests (1 MiB, doubling up to 64 MiB); httpx errors
become `runner.errors.FetchError` subclasses here, once.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, NamedTuple, overload

from runner.core.errors import FetchError, GGUFError, HubAuthError, HubUnreachableError, RemoteNotFoundError
from runner.core.shapes import GGUFHeader, GGUFValue, ModelShape, TensorInfo
from runner.core.units import MiB

if TYPE_CHECKING:
    import httpx

MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 16 * MiB
MAX_ARRAY_LEN = 1 << 28
MAX_NAME_BYTES = 63          # llama.cpp's GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
SMALL_ARRAY = 64
REMOTE_FIRST_BYTES = 1 * MiB
REMOTE_MAX_BYTES = 64 * MiB
_TRUNCATED_HINT = "the file is truncated or corrupt: delete it and pull it again"

__all__ = ["read_header", "read_header_remote", "parse_header", "derive_shape", "REMOTE_MAX_BYTES"]


class _NeedMore(Exception):
    """The prefix read so far ends before the header does; `end` is the byte offset the parser needed."""

    def __init__(self, end: int):
        super().__init__(end)
        self.end = end


class _Constants(NamedTuple):
    """What the parser needs of the `gguf` package's constants, as plain ints and strings."""

    fmts: dict[int, str]                      # fixed-size value type -> struct format
    names: dict[int, str]                     # value type -> name ("UINT32", "STRING", ...)
    ggml: dict[int, tuple[str, int, int]]     # ggml type -> (name, block size, bytes per block)
    bool_type: int
    string_type: int
    array_type: int


def _constants() -> _Constants:
    """The value types, their struct formats, and ggml type names and block sizes from the `gguf` package,
    imported lazily (it pulls in numpy, ~0.2 s)."""
    global _CONST
    if _CONST is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as T

        fmts = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
                T.FLOAT32: "<f", T.BOOL: "<B", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
        names: dict[int, str] = {int(t): str(T(t).name) for t in T}
        ggml: dict[int, tuple[str, int, int]] = {
            int(t): (str(t.name), int(GGML_QUANT_SIZES[t][0]), int(GGML_QUANT_SIZES[t][1]))
            for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
        _CONST = _Constants({int(k): str(v) for k, v in fmts.items()}, names, ggml,
                            int(T.BOOL), int(T.STRING), int(T.ARRAY))
    return _CONST


_CONST: _Constants | None = None
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from


class _Cursor:
    def __init__(self, buf: bytes | mmap.mmap, *, complete: bool, file_size: int | None, where: str):
        self.buf = buf
        self.pos = 0
        self.avail = len(buf)
        self.complete = complete
        self.file_size = file_size
        self.where = where

    def error(self, problem: str, hint: str | None = None) -> GGUFError:
        return GGUFError(f"{self.where}: {problem}", hint=hint)

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end <= self.avail:
            return
        size = self.file_size if self.file_size is not None else (self.avail if self.complete else None)
        if size is not None and end > size:
            raise self.error(f"{what} at byte {self.pos} needs {n} bytes, past the end of the file ({size} bytes): "
                             "the header is truncated or corrupt", _TRUNCATED_HINT)
        if self.complete:
            raise self.error(f"{what} at byte {self.pos} needs {n} bytes but only {self.avail} were read",
                             _TRUNCATED_HINT)
        raise _NeedMore(end)

    def unpack(self, fmt: str, size: int, what: str) -> int | float:
        self.need(size, what)
        value: int | float = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        self.need(4, what)
        value: int = _U32(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value: int = _U64(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def remaining(self) -> int | None:
        """Bytes left in the file, when its size is known."""
        size = self.file_size if self.file_size is not None else (self.avail if self.complete else None)
        return None if size is None else size - self.pos

    def string_length(self, what: str, limit: int) -> int:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.error(f"{what} is {n} bytes long, more than the {limit} allowed: the header is corrupt",
                             _TRUNCATED_HINT)
        return n

    def string(self, what: str, limit: int) -> bytes:
        n = self.string_length(what, limit)
        self.need(n, what)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def _decode_name(c: _Cursor, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise c.error(f"{what} is not valid UTF-8 ({raw[:40]!r})", _TRUNCATED_HINT) from e


def _read_value(c: _Cursor, vtype: int, key: str) -> GGUFValue:
    const = _constants()
    fmts, names = const.fmts, const.names
    if vtype in fmts:
        fmt = fmts[vtype]
        value = c.unpack(fmt, struct.calcsize(fmt), f"value of {key}")
        return bool(value) if vtype == const.bool_type else value
    if vtype == const.string_type:
        return c.string(f"value of {key}", MAX_STRING_BYTES).decode("utf-8", errors="replace")
    # an array
    itype = c.u32(f"item type of array {key}")
    if itype not in names or itype == const.array_type:
        what = "arrays of arrays are not supported" if itype == const.array_type else f"unknown item type {itype}"
        raise c.error(f"array {key}: {what}", _TRUNCATED_HINT)
    n = c.u64(f"length of array {key}")
    item_size = struct.calcsize(fmts[itype]) if itype in fmts else 8  # a string takes at least its 8-byte length
    remaining = c.remaining()
    if n > MAX_ARRAY_LEN or (remaining is not None and n * item_size > remaining):
        raise c.error(f"array {key} claims {n} items of {names[itype]}, more than the file can hold: the header is "
                      "corrupt", _TRUNCATED_HINT)
    if n < SMALL_ARRAY:
        return [_read_value(c, itype, f"{key}[{i}]") for i in range(n)]
    if itype in fmts:
        c.skip(n * item_size, f"array {key}")
    else:
        _skip_strings(c, n, key)
    return {"type": "array", "item_type": names[itype], "len": n}


def _skip_strings(c: _Cursor, n: int, key: str) -> None:
    """Skip `n` length-prefixed strings, checking each length (the hot loop for a tokenizer's 100k+ tokens)."""
    buf, avail, pos = c.buf, c.avail, c.pos
    for i in range(n):
        if pos + 8 > avail:
            c.pos = pos
            c.need(8, f"length of {key}[{i}]")  # raises: truncated, or read more
        length = _U64(buf, pos)[0]
        if length > MAX_STRING_BYTES or pos + 8 + length > avail:
            c.pos = pos
            c.skip(c.string_length(f"{key}[{i}]", MAX_STRING_BYTES), f"{key}[{i}]")  # raises with the reason
        pos += 8 + length
    c.pos = pos


def _parse(c: _Cursor) -> GGUFHeader:
    const = _constants()
    names, ggml = const.names, const.ggml
    c.need(4, "the magic number")
    magic = bytes(c.buf[0:4])
    c.pos = 4
    if magic != b"GGUF":
        old = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}.get(magic)
        if old:
            raise c.error(f"this is an old {old} file, not GGUF", "convert it with llama.cpp's convert scripts or "
                          "download a .gguf file")
        raise c.error(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                      "check the file name; model files for llama.cpp end in .gguf")
    version = c.u32("the version")
    if version not in (2, 3):
        if version == 1:
            raise c.error("GGUF version 1 is too old to read", "download a file converted with a newer llama.cpp")
        if struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3):
            raise c.error("this is a big-endian GGUF file; llama.cpp on this machine needs little-endian")
        raise c.error(f"unsupported GGUF version {version} (llmrun reads versions 2 and 3)", _TRUNCATED_HINT)
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    remaining = c.remaining()
    if n_tensors > MAX_TENSORS or (remaining is not None and n_tensors * 24 > remaining):
        raise c.error(f"the header claims {n_tensors} tensors, more than the file can hold: it is corrupt",
                      _TRUNCATED_HINT)
    if n_kv > MAX_KV or (remaining is not None and n_kv * 12 > remaining):
        raise c.error(f"the header claims {n_kv} metadata keys, more than the file can hold: it is corrupt",
                      _TRUNCATED_HINT)

    metadata: dict[str, GGUFValue] = {}
    for i in range(n_kv):
        key = _decode_name(c, c.string(f"metadata key #{i}", MAX_KEY_BYTES), f"metadata key #{i}")
        if key in metadata:
            raise c.error(f"metadata key {key} appears twice", _TRUNCATED_HINT)
        vtype = c.u32(f"value type of {key}")
        if vtype not in names:
            raise c.error(f"metadata {key} has unknown value type {vtype}", _TRUNCATED_HINT)
        metadata[key] = _read_value(c, vtype, key)

    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > 1 << 30:
        raise c.error(f"general.alignment is {alignment!r}; it must be a power of two", _TRUNCATED_HINT)

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _decode_name(c, c.string(f"name of tensor #{i}", MAX_KEY_BYTES), f"name of tensor #{i}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise c.error(f"tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES} bytes (llama.cpp's limit)",
                          _TRUNCATED_HINT)
        if name in seen:
            raise c.error(f"tensor {name} appears twice", _TRUNCATED_HINT)
        seen.add(name)
        n_dims = c.u32(f"dimension count of tensor {name}")
        if n_dims > MAX_DIMS:
            raise c.error(f"tensor {name} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}", _TRUNCATED_HINT)
        shape = tuple(c.u64(f"dimension {d} of tensor {name}") for d in range(n_dims))
        n_elements = 1
        for d in shape:
            if d == 0 or d >= 1 << 62:
                raise c.error(f"tensor {name} has a dimension of {d} in its shape {list(shape)}", _TRUNCATED_HINT)
            n_elements *= d
        if n_elements >= 1 << 62:
            raise c.error(f"tensor {name} has {n_elements} elements, too many for ggml", _TRUNCATED_HINT)
        gtype = c.u32(f"type of tensor {name}")
        if gtype not in ggml:
            raise c.error(f"tensor {name} has unknown ggml type {gtype}",
                          "the file may need a newer llama.cpp, or it is corrupt")
        type_name, block, type_size = ggml[gtype]
        if shape and shape[0] % block:
            raise c.error(f"tensor {name} of type {type_name} has rows of {shape[0]} values, not a multiple of the "
                          f"block size {block}", _TRUNCATED_HINT)
        offset = c.u64(f"offset of tensor {name}")
        if offset % alignment:
            raise c.error(f"tensor {name} starts at data offset {offset}, not aligned to {alignment} bytes",
                          _TRUNCATED_HINT)
        tensors.append(TensorInfo(name=name, shape=shape, type_name=type_name, offset=offset,
                                  n_bytes=n_elements // block * type_size))

    data_offset = c.pos + (-c.pos) % alignment
    size = c.file_size if c.file_size is not None else (c.avail if c.complete else None)
    prev: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.n_bytes:
            raise c.error(f"tensors {prev.name} and {t.name} overlap (bytes {prev.offset}+{prev.n_bytes} and "
                          f"{t.offset} of the data section)", _TRUNCATED_HINT)
        prev = t
        end = data_offset + t.offset + t.n_bytes
        if size is not None and end > size:
            raise c.error(f"tensor {t.name} ends at byte {end}, past the end of the file ({size} bytes): the file "
                          "is truncated — delete it and pull again", _TRUNCATED_HINT)
    if size is not None and tensors and data_offset > size:
        raise c.error(f"the tensor data should start at byte {data_offset}, past the end of the file ({size} "
                      "bytes): the file is truncated", _TRUNCATED_HINT)
    return GGUFHeader(version=version, metadata=metadata, tensors=tuple(tensors), data_offset=data_offset,
                      alignment=alignment, file_size=c.file_size if c.file_size is not None else
                      (c.avail if c.complete else None), shape=derive_shape(metadata, tensors))


Tensors = tuple[TensorInfo, ...] | list[TensorInfo]


@overload
def derive_shape(metadata: Mapping[str, GGUFValue], tensors: Tensors = (), *, require: Literal[True],
                 where: str = "GGUF") -> ModelShape: ...
@overload
def derive_shape(metadata: Mapping[str, GGUFValue], tensors: Tensors = (), *, require: bool = False,
                 where: str = "GGUF") -> ModelShape | None: ...
def derive_shape(metadata: Mapping[str, GGUFValue], tensors: Tensors = (), *, require: bool = False,
                 where: str = "GGUF") -> ModelShape | None:
    """The ModelShape from `{arch}.*` metadata keys; None when a needed key is missing (or a GGUFError naming it
    when `require`). Per-layer arrays (e.g. head_count_kv) count by their largest value. `n_params` counts the
    tensors given: for one shard of a llama.cpp split model (`split.count` > 1) that is only this shard's."""
    arch = metadata.get("general.architecture")
    try:
        if not isinstance(arch, str) or not arch:
            raise _Missing("general.architecture", "is missing")

        def num(key: str, default: int | None = None, minimum: int = 1) -> int:
            full = f"{arch}.{key}"
            value = metadata.get(full)
            if isinstance(value, list) and value:
                ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
                if len(ints) == len(value):
                    value = max(ints)
            if value is None:
                if default is None:
                    raise _Missing(full, "is missing")
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise _Missing(full, f"is {value!r}, not an integer ≥ {minimum}")
            return value

        n_head = num("attention.head_count")
        n_vocab = num("vocab_size", 0, minimum=0)
        if not n_vocab:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if isinstance(tokens, list):
                n_vocab = len(tokens)
            elif isinstance(tokens, dict):
                count = tokens.get("len", 0)
                n_vocab = count if isinstance(count, int) else 0
        if not n_vocab:
            raise _Missing(f"{arch}.vocab_size", "and tokenizer.ggml.tokens are missing")
        n_ff_exp = num("expert_feed_forward_length", 0, minimum=0)
        n_ff = num("feed_forward_length", 0, minimum=0) or n_ff_exp
        if not n_ff:
            raise _Missing(f"{arch}.feed_forward_length", "is missing")
        n_layer = num("block_count")
        window, pattern = _sliding_window(arch, metadata, num("attention.sliding_window", 0, minimum=0), n_layer)
        return ModelShape(
            arch=arch, n_layer=n_layer, n_embd=num("embedding_length"), n_head=n_head,
            n_head_kv=num("attention.head_count_kv", n_head, minimum=0), n_ff=n_ff, n_vocab=n_vocab,
            n_ctx_train=num("context_length"), head_dim=num("attention.key_length", 0, minimum=0),
            n_expert=num("expert_count", 0, minimum=0), n_expert_used=num("expert_used_count", 0, minimum=0),
            sliding_window=window, swa_pattern=pattern, n_params=sum(t.n_elements for t in tensors),
            head_dim_v=num("attention.value_length", 0, minimum=0),
            head_dim_mla=num("attention.key_length_mla", 0, minimum=0),
            head_dim_v_mla=num("attention.value_length_mla", 0, minimum=0),
            q_lora_rank=num("attention.q_lora_rank", 0, minimum=0),
            n_ff_exp=n_ff_exp if n_ff_exp != n_ff else 0,
            n_expert_shared=num("expert_shared_count", 0, minimum=0),
            n_layer_dense_lead=num("leading_dense_block_count", 0, minimum=0),
        )
    except _Missing as e:
        if require:
            raise GGUFError(f"{where}: metadata key {e.key} {e.problem}; cannot tell the model's shape",
                            hint="the file may be a non-LLM GGUF (a vision projector, an adapter) or corrupt") from None
        return None


def _sliding_window(arch: str, metadata: Mapping[str, GGUFValue], window: int, n_layer: int) -> tuple[int, int]:
    """(window, swa_pattern) as llama.cpp reads them for `arch`: architectures with sliding-window layers
    (runner.model.archs) take the file's window (or their default) and pattern (an int, or a per-layer bool array
    of the form llama.cpp's set_swa_pattern makes); the others keep the window for information only (pattern 0)."""
    from runner.model.archs import arch_spec

    spec = arch_spec(arch)
    if spec is None or not spec.swa_pattern:
        return window, 0
    if not window:
        if spec.swa_needs_key:
            return 0, 0
        window = spec.swa_default
    raw = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(raw, int) and not isinstance(raw, bool):
        return window, raw if raw > 0 else n_layer + 1      # 0: every layer slides
    if isinstance(raw, list) and raw and all(isinstance(v, bool) for v in raw):
        for p in range(1, len(raw) + 2):
            if all(v == (i % p < p - 1) for i, v in enumerate(raw)):
                return window, p
    return window, spec.swa_pattern


class _Missing(Exception):
    def __init__(self, key: str, problem: str):
        super().__init__(key)
        self.key, self.problem = key, problem


def parse_header(data: bytes, *, file_size: int | None = None, where: str = "GGUF data",
                 require_shape: bool = False) -> GGUFHeader:
    """Parse a header from bytes: the whole file when `file_size` is None, else a prefix of a file that size."""
    complete = file_size is None or len(data) >= file_size
    c = _Cursor(data, complete=complete, file_size=file_size if file_size is not None else len(data), where=where)
    try:
        header = _parse(c)
    except _NeedMore as e:
        raise GGUFError(f"{where}: the header continues past the {len(data)} bytes read (to at least byte {e.end})",
                        hint="read a longer prefix of the file") from None
    return _with_required_shape(header, require_shape, where)


def _with_required_shape(header: GGUFHeader, require: bool, where: str) -> GGUFHeader:
    if require and header.shape is None:
        derive_shape(header.metadata, header.tensors, require=True, where=where)
    return header


def read_header(path: str | os.PathLike[str], *, require_shape: bool = False) -> GGUFHeader:
    """The header of a local GGUF file (the file is mapped; only the header's pages are read)."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{where}: the file is empty", hint=_TRUNCATED_HINT)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                header = _parse(_Cursor(m, complete=True, file_size=size, where=where))
    except OSError as e:
        raise GGUFError(f"cannot read {where}: {e.strerror or e}",
                        hint="check the path; `llmrun list` shows the models on this machine") from e
    except ValueError as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"cannot map {where}: {e}") from e  # mmap refuses some special files
    return _with_required_shape(header, require_shape, where)


# ---------------------------------------------------------------------------------------------------------------
# Remote: growing prefixes over HTTP Range requests

def _content_range_size(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 0-1048575/98362432' -> (0, 98362432); 'bytes */98362432' -> (None, 98362432)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-", 1)[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _fetch_range(client: httpx.Client, url: str, start: int, end: int,
                 headers: Mapping[str, str] | None) -> tuple[bytes, int | None]:
    """Bytes [start, end] of `url` (fewer at the end of the file) and the file's size if the server says."""
    import httpx

    h = dict(headers or {})
    h["Range"] = f"bytes={start}-{end}"
    h.setdefault("Accept-Encoding", "identity")
    want = end - start + 1
    try:
        with client.stream("GET", url, headers=h, follow_redirects=True) as r:
            status = r.status_code
            if status == 416:
                return b"", _content_range_size(r.headers.get("content-range"))[1]
            if status in (401, 403):
                raise HubAuthError(f"{url}: HTTP {status}: access denied",
                                   hint="set HF_TOKEN to a token that may read this repo; for a gated model accept "
                                        "its licence on the model page first")
            if status == 404:
                raise RemoteNotFoundError(f"{url}: HTTP 404: no such file",
                                          hint="check the repo, revision and file name")
            if status >= 400:
                raise FetchError(f"{url}: HTTP {status}", hint="try again later")
            skip = 0
            if status == 206:
                got_start, size = _content_range_size(r.headers.get("content-range"))
                if got_start is not None and got_start != start:
                    raise FetchError(f"{url}: asked for bytes from {start}, the server sent from {got_start}")
            else:  # 200: the server ignored Range; read only what is needed, then close
                length = r.headers.get("content-length")
                size = int(length) if length and length.isdigit() else None
                skip = start
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) >= skip + want:
                    break
            return bytes(buf[skip:skip + want]), size
    except httpx.TimeoutException as e:
        raise HubUnreachableError(f"{url}: timed out", hint="check the network and try again") from e
    except httpx.TransportError as e:
        raise HubUnreachableError(f"{url}: cannot connect ({type(e).__name__}: {e})",
                                  hint="check the network (and HF_ENDPOINT if set)") from e
    except httpx.HTTPError as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from e
    except httpx.InvalidURL as e:
        raise FetchError(f"{url}: not a valid URL ({e})", hint="give an http(s):// URL") from e


def read_header_remote(url: str, *, headers: Mapping[str, str] | None = None, http: httpx.Client | None = None,
                       first_bytes: int = REMOTE_FIRST_BYTES, max_bytes: int = REMOTE_MAX_BYTES,
                       require_shape: bool = False, fetched: list[int] | None = None) -> GGUFHeader:
    """The header of a remote GGUF file, from its first bytes only: Range requests for a growing prefix (1 MiB,
    doubling until the header parses, at most `max_bytes`). The file size comes from Content-Range, so every
    tensor is checked to lie inside the file. `http`: an httpx.Client (tests pass one with a MockTransport);
    `fetched` collects the bytes each request returned."""
    import httpx

    client = http if http is not None else httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0))
    try:
        buf = b""
        size: int | None = None
        want = max(64, first_bytes)
        while True:
            chunk, got_size = _fetch_range(client, url, len(buf), want - 1, headers)
            if fetched is not None:
                fetched.append(len(chunk))
            size = got_size if got_size is not None else size
            asked = want - len(buf)
            buf += chunk
            complete = len(chunk) < asked or (size is not None and len(buf) >= size)
            if not buf:
                raise GGUFError(f"{url}: the file is empty", hint=_TRUNCATED_HINT)
            c = _Cursor(buf, complete=complete, file_size=size if size is not None else
                        (len(buf) if complete else None), where=url)
            try:
                return _with_required_shape(_parse(c), require_shape, url)
            except _NeedMore as e:
                if want >= max_bytes:
                    raise GGUFError(f"{url}: the GGUF header is larger than {max_bytes // MiB} MiB (it continues "
                                    f"past byte {e.end})", hint="the file is unusual or corrupt") from None
                want = min(max_bytes, max(want * 2, e.end + (-e.end) % MiB))
    finally:
        if http is None:
            client.close()
