"""The GGUF header reader: exact parses of generated files and the real demo model, clear errors for every kind of
damage, header-only remote reads over HTTP Range, and a fuzz test that only GGUFError ever comes out."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.core.errors import FetchError, GGUFError, HubAuthError, HubUnreachableError, RemoteNotFoundError
from runner.model.gguf import derive_shape, parse_header, read_header, read_header_remote


def write_tiny(path: Path, *, arch: str = "llama", n_vocab: int = 100, shape_keys: bool = True,
               extra=None, moe: bool = False) -> Path:
    """A tiny llama-shaped GGUF: 2 layers, n_embd 64, 4 heads, 2 KV heads, a few tensors of several types."""
    w = gguf.GGUFWriter(str(path), arch)
    if shape_keys:
        w.add_block_count(2)
        w.add_embedding_length(64)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_feed_forward_length(128)
        w.add_context_length(256)
    if moe:
        w.add_expert_count(8)
        w.add_expert_used_count(2)
    w.add_token_list([f"tok{i}".encode() for i in range(n_vocab)])
    w.add_token_scores([float(i) for i in range(n_vocab)])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_array("tiny.small_list", [1, 2, 3])
    w.add_string("general.name", "tiny")
    if extra:
        extra(w)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((128, 64 // 32 * 18), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny(tmp_path / "tiny.gguf")


def test_tiny_parses_exactly(tiny):
    h = read_header(tiny)
    ref = gguf.GGUFReader(str(tiny))
    assert h.version == 3
    assert h.alignment == 32
    assert h.file_size == tiny.stat().st_size
    assert h.data_offset == ref.data_offset
    assert [t.name for t in h.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(h.tensors, ref.tensors):
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.type_name == theirs.tensor_type.name
        assert h.data_offset + mine.offset == theirs.data_offset
        assert mine.n_bytes == theirs.n_bytes
    by_name = {t.name: t for t in h.tensors}
    assert by_name["blk.0.ffn_up.weight"].type_name == "Q4_0"
    assert by_name["blk.0.ffn_up.weight"].n_bytes == 128 * 64 // 32 * 18
    assert by_name["token_embd.weight"].shape == (64, 100)
    md = h.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2
    assert md["tokenizer.ggml.tokens"] == {"type": "array", "item_type": "STRING", "len": 100}
    assert md["tokenizer.ggml.scores"] == {"type": "array", "item_type": "FLOAT32", "len": 100}
    assert md["tiny.small_list"] == [1, 2, 3]
    assert md["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert h.shape is not None
    s = h.shape
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab, s.n_ctx_train, s.head_dim) == \
        ("llama", 2, 64, 4, 2, 128, 100, 256, 16)
    assert s.n_params == 100 * 64 + 64 * 64 + 128 * 64 + 64


def test_small_token_list_is_kept(tmp_path):
    h = read_header(write_tiny(tmp_path / "t.gguf", n_vocab=10))
    assert h.metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(10)]
    assert h.shape.n_vocab == 10


def test_moe_and_vocab_size_keys(tmp_path):
    def extra(w):
        w.add_uint32("llama.vocab_size", 32000)
        w.add_uint32("llama.attention.key_length", 32)
        w.add_uint32("llama.attention.sliding_window", 4096)
    h = read_header(write_tiny(tmp_path / "m.gguf", moe=True, extra=extra))
    assert (h.shape.n_expert, h.shape.n_expert_used, h.shape.n_vocab, h.shape.head_dim, h.shape.sliding_window) \
        == (8, 2, 32000, 32, 4096)
    assert h.shape.is_moe


def test_missing_shape_keys_give_none_unless_required(tmp_path):
    path = write_tiny(tmp_path / "noshape.gguf", shape_keys=False)
    assert read_header(path).shape is None
    with pytest.raises(GGUFError, match="llama.attention.head_count is missing"):
        read_header(path, require_shape=True)
    with pytest.raises(GGUFError, match="general.architecture"):
        derive_shape({}, require=True)


def test_demo_model(demo_gguf):
    h = read_header(demo_gguf, require_shape=True)
    s = h.shape
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_vocab) == ("llama", 30, 576, 9, 3, 49152)
    assert s.head_dim == 64
    assert 130e6 < s.n_params < 140e6
    assert "<|im_start|>" in h.metadata["tokenizer.chat_template"]
    assert h.metadata["tokenizer.ggml.tokens"]["len"] == 49152
    assert h.file_size == demo_gguf.stat().st_size
    assert h.data_offset == 1785664  # as gguf.GGUFReader reports (it takes 7 s here, so not run every time)
    assert len(h.tensors) == 272
    assert {t.type_name for t in h.tensors} >= {"Q4_1", "F32"}
    last = max(h.tensors, key=lambda t: t.offset)
    assert h.data_offset + last.offset + last.n_bytes <= h.file_size


# --- damage ----------------------------------------------------------------------------------------------------

def test_truncation_at_many_points(tiny, tmp_path):
    data = tiny.read_bytes()
    header_end = read_header(tiny).data_offset
    points = sorted(set(list(range(0, header_end, 7)) + [header_end, header_end + 100, len(data) - 1]))
    for cut in points:
        p = tmp_path / "cut.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as e:
            read_header(p)
        msg = str(e.value)
        assert str(p) in msg
        assert any(w in msg for w in ("truncated", "empty", "past the end", "more than the file")), msg
    p.write_bytes(data[:len(data) - 1])
    with pytest.raises(GGUFError, match=r"tensor \S+ ends at byte \d+, past the end of the file \(\d+ bytes\): "
                                        r"the file is truncated"):
        read_header(p)


def test_demo_truncated_in_tensor_data(demo_gguf, tmp_path):
    data = demo_gguf.read_bytes()
    p = tmp_path / "half.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="past the end of the file") as e:
        read_header(p)
    assert e.value.hint and "pull it again" in e.value.hint


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _find(data: bytes, needle: bytes) -> int:
    i = data.find(needle)
    assert i >= 0
    return i


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"GGML" + d[4:], "not a GGUF file"),
    (lambda d: b"tjgg" + d[4:], "old GGJT file"),
    (lambda d: _patch(d, 4, "<I", 1), "version 1 is too old"),
    (lambda d: _patch(d, 4, ">I", 3), "big-endian"),
    (lambda d: _patch(d, 4, "<I", 7), "unsupported GGUF version 7"),
    (lambda d: _patch(d, 8, "<Q", 1 << 40), "claims 1099511627776 tensors"),
    (lambda d: _patch(d, 16, "<Q", 1 << 50), "metadata keys"),
    (lambda d: _patch(d, 24, "<Q", 1 << 40), "key #0 is 1099511627776 bytes long"),
    # the value type after "general.architecture"
    (lambda d: _patch(d, _find(d, b"general.architecture") + 20, "<I", 99), "unknown value type 99"),
    # the tokenizer token array's length
    (lambda d: _patch(d, _find(d, b"tokenizer.ggml.tokens") + 21 + 8, "<Q", 1 << 40),
     "array tokenizer.ggml.tokens claims"),
    (lambda d: d.replace(b"llama.context_length", b"general.architecture"), "general.architecture appears twice"),
])
def test_corrupt_headers_name_the_problem(tiny, tmp_path, mutate, message):
    data = mutate(tiny.read_bytes())
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(GGUFError, match=message):
        read_header(p)


def _tensor_info_offset(data: bytes, name: bytes) -> int:
    """Byte offset right after a tensor name in the tensor-info section."""
    return data.rfind(name) + len(name)


def test_bad_tensor_infos(tiny, tmp_path):
    data = tiny.read_bytes()
    name = b"blk.0.attn_q.weight"
    at = _tensor_info_offset(data, name)  # n_dims u32, 2 x u64 dims, type u32, offset u64
    cases = [
        (_patch(data, at, "<I", 5), "5 dimensions"),
        (_patch(data, at + 4, "<Q", 0), "dimension of 0"),
        (_patch(data, at + 20, "<I", 31), "unknown ggml type 31"),
        (_patch(data, at + 24, "<Q", 25600 + 3), "not aligned to 32 bytes"),
        (_patch(data, at + 24, "<Q", 0), "overlap"),
        (_patch(data, at + 20, "<I", int(gguf.GGMLQuantizationType.Q4_K)), "not a multiple of the block size 256"),
        (data.replace(b"blk.0.ffn_up.weight", b"blk.0.attn_q.weight"), "appears twice"),
    ]
    for bad, message in cases:
        p = tmp_path / "bad.gguf"
        p.write_bytes(bad)
        with pytest.raises(GGUFError, match=message):
            read_header(p)


def test_alignment_must_be_power_of_two(tmp_path):
    path = write_tiny(tmp_path / "a.gguf", extra=lambda w: w.add_custom_alignment(64))
    assert read_header(path).alignment == 64
    data = path.read_bytes()
    i = _find(data, b"general.alignment") + len(b"general.alignment") + 4
    bad = tmp_path / "b.gguf"
    bad.write_bytes(_patch(data, i, "<I", 48))
    with pytest.raises(GGUFError, match="power of two"):
        read_header(bad)


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(GGUFError, match="cannot read"):
        read_header(tmp_path / "missing.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        read_header(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        read_header(tmp_path)


def test_parse_header_prefix_needs_more(tiny):
    data = tiny.read_bytes()
    with pytest.raises(GGUFError, match="continues past the 100 bytes read"):
        parse_header(data[:100], file_size=len(data))
    assert parse_header(data).data_offset == read_header(tiny).data_offset


# --- remote ----------------------------------------------------------------------------------------------------

class RangeServer:
    """An httpx.MockTransport handler serving one file with Range support, recording the ranges asked for."""

    def __init__(self, data: bytes, *, honour_range: bool = True, status: int | None = None):
        self.data = data
        self.honour_range = honour_range
        self.status = status
        self.ranges: list[tuple[int, int]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        if self.status:
            return httpx.Response(self.status)
        rng = request.headers.get("range")
        if not rng or not self.honour_range:
            return httpx.Response(200, content=self.data, headers={"content-length": str(len(self.data))})
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        self.ranges.append((start, end))
        if start >= len(self.data):
            return httpx.Response(416, headers={"content-range": f"bytes */{len(self.data)}"})
        end = min(end, len(self.data) - 1)
        return httpx.Response(206, content=self.data[start:end + 1],
                              headers={"content-range": f"bytes {start}-{end}/{len(self.data)}"})


def _client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_remote_reads_only_a_prefix_of_the_demo(demo_gguf):
    data = demo_gguf.read_bytes()
    server = RangeServer(data)
    h = read_header_remote("https://hub.example/demo.gguf", http=_client(server),
                           headers={"authorization": "Bearer t"})
    local = read_header(demo_gguf)
    assert h.file_size == len(data)
    assert h.data_offset == local.data_offset
    assert h.tensors == local.tensors
    assert h.shape == local.shape
    fetched = sum(e - s + 1 for s, e in server.ranges)
    assert server.ranges[0] == (0, 1024 * 1024 - 1)
    assert all(s == prev_e + 1 for (s, _), (_, prev_e) in zip(server.ranges[1:], server.ranges))  # no re-reads
    assert fetched < len(data) // 10
    assert server.headers[0]["authorization"] == "Bearer t"


def test_remote_grows_the_prefix(tiny):
    data = tiny.read_bytes()
    server = RangeServer(data)
    h = read_header_remote("https://hub.example/t.gguf", http=_client(server), first_bytes=100)
    assert h.data_offset == read_header(tiny).data_offset
    assert len(server.ranges) >= 2
    assert server.ranges[0] == (0, 99)


def test_remote_server_ignoring_range(tiny):
    data = tiny.read_bytes()
    h = read_header_remote("https://hub.example/t.gguf", http=_client(RangeServer(data, honour_range=False)),
                           first_bytes=100)
    assert h.file_size == len(data)
    assert h.tensors == read_header(tiny).tensors


def test_remote_truncated_file(tiny):
    data = tiny.read_bytes()[:-10]
    with pytest.raises(GGUFError, match="past the end of the file"):
        read_header_remote("https://hub.example/t.gguf", http=_client(RangeServer(data)))


def test_remote_header_too_large(tiny):
    data = tiny.read_bytes()
    with pytest.raises(GGUFError, match="larger than"):
        read_header_remote("https://hub.example/t.gguf", http=_client(RangeServer(data)), first_bytes=64,
                           max_bytes=128)


@pytest.mark.parametrize("status, error", [(401, HubAuthError), (403, HubAuthError), (404, RemoteNotFoundError),
                                           (500, FetchError)])
def test_remote_http_errors(status, error):
    with pytest.raises(error) as e:
        read_header_remote("https://hub.example/x.gguf", http=_client(RangeServer(b"", status=status)))
    assert str(status) in str(e.value) and e.value.hint


def test_remote_unreachable():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)
    with pytest.raises(HubUnreachableError, match="cannot connect"):
        read_header_remote("https://hub.example/x.gguf", http=_client(refuse))


def test_remote_not_gguf():
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_header_remote("https://hub.example/x.gguf", http=_client(RangeServer(b"<html>nope</html>")))


# --- fuzz ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    d = tmp_path_factory.mktemp("seeds")
    return [write_tiny(d / "a.gguf").read_bytes(), write_tiny(d / "b.gguf", n_vocab=10, moe=True).read_bytes(),
            write_tiny(d / "c.gguf", shape_keys=False, n_vocab=70).read_bytes()]


_INTERESTING = [0, 1, 2, 3, 4, 5, 8, 9, 12, 31, 32, 63, 64, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**62, 2**63 - 1, 2**63, 2**64 - 1]

mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), st.sampled_from([x for x in _INTERESTING if x < 2**32])),
    st.tuples(st.just("u64"), st.integers(0, 10**6), st.sampled_from(_INTERESTING)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        # mostly inside the header, which is where the parser looks
        pos = pos % min(len(b), 1800) if pos % 4 else pos % len(b)
        if op == "byte":
            b[pos] = arg
        elif op == "u32" and pos + 4 <= len(b):
            struct.pack_into("<I", b, pos, arg)
        elif op == "u64" and pos + 8 <= len(b):
            struct.pack_into("<Q", b, pos, arg)
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "delete":
            del b[pos:pos + arg]
    return bytes(b)


FUZZ_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=FUZZ_HEALTH)
@given(seed=st.integers(0, 2), ops=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_only_gguf_errors(seeds, seed, ops):
    data = _mutate(seeds[seed % len(seeds)], ops)
    try:
        h = parse_header(data, where="fuzz")
    except GGUFError:
        return
    # whatever parses is self-consistent
    assert h.data_offset <= len(data) or not h.tensors
    for t in h.tensors:
        assert h.data_offset + t.offset + t.n_bytes <= len(data)
    try:
        derive_shape(h.metadata, h.tensors, require=True)
    except GGUFError:
        pass


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=FUZZ_HEALTH)
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_fuzz_demo_header(demo_header, ops):
    data, size = demo_header
    mutated = _mutate(data, ops)
    try:
        parse_header(mutated, file_size=size if len(mutated) == len(data) else None, where="fuzz")
    except GGUFError:
        pass


@pytest.fixture(scope="module")
def demo_header(demo_gguf) -> tuple[bytes, int]:
    """The demo model's header bytes (about 1.5 MB) and the real file size."""
    h = read_header(demo_gguf)
    with open(demo_gguf, "rb") as f:
        return f.read(h.data_offset), demo_gguf.stat().st_size


@pytest.fixture
def range_http_server(tiny):
    """A real HTTP server on 127.0.0.1 that redirects /resolve/… to /cdn/… (as the hub does) and serves Range
    requests; it stops with the test."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = tiny.read_bytes()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(f"{self.path} {self.headers.get('Range')}")
            if self.path.startswith("/resolve/"):
                self.send_response(302)
                self.send_header("Location", self.path.replace("/resolve/", "/cdn/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
            end = min(end, len(data) - 1)
            body = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_remote_over_real_http_with_redirect(range_http_server, tiny):
    base, seen = range_http_server
    h = read_header_remote(f"{base}/resolve/main/tiny.gguf", first_bytes=256)
    assert h.tensors == read_header(tiny).tensors and h.file_size == tiny.stat().st_size
    assert seen[0] == "/resolve/main/tiny.gguf bytes=0-255" and seen[1] == "/cdn/main/tiny.gguf bytes=0-255"


def test_remote_connection_refused():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubUnreachableError, match="cannot connect"):
        read_header_remote(f"http://127.0.0.1:{port}/x.gguf")
