"""Name resolution (runner/app/models.py), the one place the server, `llmrun chat` and the CLI turn a model name
into a model: every form of name, the local store rescanned on a miss, and the 404 texts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner.app.models import ModelIndex, ServedFile
from runner.core import dirs
from runner.core.errors import ModelNotLocalError, UnknownModelError, UsageError
from runner.model.catalog import load_catalog
from runner.store.local import LocalModel

DEMO = "smollm2-135m:Q4_1"


def index(**kw) -> ModelIndex:
    return ModelIndex(catalog=load_catalog(), **kw)


def test_every_form_of_a_local_models_name(demo_local):
    idx = index()
    assert [r.name for r in idx.listing()] == [DEMO]
    for name in (DEMO, "SMOLLM2-135M:q4_1", "smollm2-135m", "smollm2-135m:latest", f"{DEMO}:latest",
                 demo_local.stem, f"{demo_local.stem}:latest", f"  {DEMO} "):
        ref = idx.resolve(name)
        assert ref.name == DEMO and ref.path == demo_local and ref.entry.name == DEMO, name


def test_a_name_without_quant_is_the_best_local_quant():
    catalog = load_catalog()
    local = [LocalModel(e.name, e.quant, 1, True, Path(f"/models/{e.quant}.gguf"), ())
             for e in catalog.find(model="llama-2-7b-chat") if e.quant in ("Q2_K", "Q5_K_M", "Q4_0")]
    idx = ModelIndex(catalog=catalog, scan=lambda c: local)
    assert idx.resolve("llama-2-7b-chat").name == "llama-2-7b-chat:Q5_K_M"
    assert idx.resolve("llama-2-7b-chat:latest").name == "llama-2-7b-chat:Q5_K_M"
    assert idx.resolve("llama-2-7b-chat:Q2_K").name == "llama-2-7b-chat:Q2_K"
    assert idx.resolve("Q4_0").name == "llama-2-7b-chat:Q4_0"          # a file's stem


def test_files_served_by_name(tmp_path, demo_gguf):
    other = tmp_path / "notes.Q4_K_M.gguf"
    other.write_bytes(b"x")
    idx = index(files=[ServedFile("notes", other), ServedFile("second", Path(demo_gguf), merge=False)])
    assert [r.name for r in idx.listing()] == ["notes", "second"]
    assert idx.resolve("notes").path == other and idx.resolve("notes:latest").path == other
    assert idx.resolve("notes.Q4_K_M").name == "notes"
    assert idx.resolve("second").path == Path(demo_gguf) and idx.resolve("second").entry is None


def test_a_store_model_given_by_its_path_is_one_model_under_the_given_name(demo_local):
    idx = index(files=[ServedFile("demo", demo_local)])
    assert [r.name for r in idx.listing()] == ["demo"]
    assert idx.resolve(DEMO).name == "demo" and idx.resolve("smollm2-135m").name == "demo"
    assert idx.resolve("demo").entry.name == DEMO, "still planned as the catalog model"
    # the same file registered again under another name (--config) is a model of its own
    idx = index(files=[ServedFile("second", demo_local, merge=False)])
    assert [r.name for r in idx.listing()] == ["second", DEMO]


def test_a_catalog_model_that_is_not_local_is_404_saying_how_to_pull_it():
    idx = index()
    with pytest.raises(ModelNotLocalError) as e:
        idx.resolve("llama-2-7b-chat:Q4_K_M")
    assert "is in the catalog but not on this machine" in e.value.message
    assert "`llmrun pull llama-2-7b-chat:Q4_K_M`" in e.value.hint and "--pull" in e.value.hint
    with pytest.raises(ModelNotLocalError) as e:
        idx.resolve("llama-2-7b-chat")                     # no quant: the catalog's default one
    assert "`llmrun pull llama-2-7b-chat:" in e.value.hint
    ref = index(pull=True).resolve("llama-2-7b-chat:latest")
    assert ref.path is None and ref.entry.model == "llama-2-7b-chat", "with --pull: the loader pulls it"


def test_an_unknown_name_is_404_listing_close_matches(demo_local, tmp_path):
    idx = index(files=[ServedFile("my-notes-model", tmp_path / "x.gguf")])
    with pytest.raises(UnknownModelError) as e:
        idx.resolve("smolm2")
    assert "smollm2-135m" in e.value.close_matches and "did you mean" in e.value.message
    with pytest.raises(UnknownModelError) as e:
        idx.resolve("my-notes")
    assert e.value.close_matches[0] == "my-notes-model"
    with pytest.raises(UnknownModelError) as e:
        idx.resolve("llama-2-7b-chatt")
    assert "llama-2-7b-chat" in e.value.close_matches, "catalog names are suggested too"
    assert "GET /v1/models" in e.value.hint


def test_a_model_pulled_while_serving_is_found(demo_gguf):
    idx = index(rescan_s=0.2)
    assert idx.listing() == ()
    models = dirs.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    (models / Path(demo_gguf).name).symlink_to(demo_gguf)
    with pytest.raises(ModelNotLocalError):
        idx.resolve("smollm2-135m")                     # scanned just now: not again yet
    time.sleep(0.25)
    assert idx.resolve("smollm2-135m").name == DEMO, "a miss rescans the store"


def test_chat_resolves_names_the_same_way(demo_local):
    from runner.app.launch import resolve_model
    from runner.hardware.profiles import load_profile

    launch = resolve_model("smollm2-135m:latest", hardware=lambda: load_profile("ci-2core-24gb"), n_ctx=1024)
    assert launch.name == DEMO and Path(launch.path) == demo_local
    with pytest.raises(UnknownModelError) as e:
        resolve_model("smolm2", hardware=lambda: load_profile("ci-2core-24gb"))
    assert "smollm2-135m" in e.value.close_matches


def test_copies_are_more_names_of_one_model(demo_local):
    from runner.store import aliases

    aliases.add("team/demo:v1", DEMO)
    aliases.add("orphan", "llama-2-7b-chat:Q4_K_M")     # its model is not here
    idx = index()
    [ref] = idx.listing()
    assert ref.name == DEMO and ref.copies == ("team/demo:v1",)
    for name in ("team/demo:v1", "TEAM/DEMO:V1", "team/demo:v1:latest"):
        assert idx.resolve(name) is ref, name
    assert idx.owner("team/demo:v1") is None and idx.owner(DEMO) is ref
    with pytest.raises(ModelNotLocalError) as e:
        idx.resolve("orphan")
    assert "a copy of 'llama-2-7b-chat:Q4_K_M', which is not on this machine" in e.value.message
    # a copy never hides a model's own name
    aliases.add(demo_local.stem, "llama-2-7b-chat:Q4_K_M")
    idx.refresh()
    assert idx.resolve(demo_local.stem) is idx.refs[0]
    assert aliases.remove("TEAM/demo:v1") and not aliases.remove("team/demo:v1")
    idx.refresh()
    assert idx.refs[0].copies == ()


def test_what_a_pull_of_a_name_fetches(demo_local, tmp_path):
    other = tmp_path / "notes.gguf"
    other.write_bytes(b"x")
    idx = index(files=[ServedFile("notes", other)])
    assert idx.pull_entry("llama-2-7b-chat:Q4_K_M").name == "llama-2-7b-chat:Q4_K_M"     # not local: fine
    assert idx.pull_entry("llama-2-7b-chat:latest").model == "llama-2-7b-chat"
    assert idx.pull_entry(demo_local.stem).name == DEMO                                  # a served name
    with pytest.raises(UsageError, match="nothing to pull"):
        idx.pull_entry("notes")
    with pytest.raises(UnknownModelError) as e:
        idx.pull_entry("llama-2-7b-chatt")
    assert "llama-2-7b-chat" in e.value.close_matches and "llmrun list --available" in e.value.hint
