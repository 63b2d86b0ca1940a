"""`llmrun show MODEL`: the openness card and catalog facts, as text and as JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runner.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["show", *args])


def test_show_llama2_card_is_honest():
    r = run("llama-2-7b-chat:Q4_K_M")
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.startswith("llama-2-7b-chat:Q4_K_M")
    assert "Llama 2 Community License Agreement" in out
    assert "none (not a standard open-source licence)" in out
    assert "OSI-approved           no" in out and "accept it before the first pull" in out
    assert "700 million monthly active users" in out
    assert "improve any other large language model" in out
    assert "Acceptable Use Policy" in out
    assert "training data          not disclosed" in out
    assert "publisher              Meta" in out and "released               2023-07-18" in out
    # catalog facts
    assert "TheBloke/Llama-2-7B-Chat-GGUF" in out and "191239b3e26b2882fb562ffccdd1cf0f65402adb" in out
    assert "llama-2-7b-chat.Q4_K_M.gguf" in out and "4,081,004,224 bytes" in out
    assert "08a5566d61d7cb6b420c3e4387a39e0078e1f2fe5f055f3a03887385304d4bfa" in out
    assert "32 layers" in out and "32 heads / 32 KV heads" in out
    assert "*Q4_K_M" in out and "Q2_K" in out and "Q8_0" in out


def test_show_grok1_card_is_honest():
    r = run("grok-1:Q4_K")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "Apache License 2.0" in out and "SPDX id                Apache-2.0" in out
    assert "OSI-approved           yes" in out
    assert "code licence           Apache-2.0" in out
    assert "training data          not disclosed" in out
    assert "publisher              xAI" in out
    assert "9 llama.cpp shards (load the first)" in out
    assert "grok-1-Q4_K-split-00001-of-00009.gguf" in out and "grok-1-Q4_K-split-00009-of-00009.gguf" in out
    assert "8 experts (2 used per token)" in out
    assert "a rounded or estimated figure" in out  # rounded sizes are labelled as such


def test_show_byte_split_names_the_joined_file():
    r = run("llama-2-70b-chat:q8_0")
    assert r.exit_code == 0, r.output
    assert "2 byte parts, joined into one file after download" in r.output
    assert "loads                  llama-2-70b-chat.Q8_0.gguf" in r.output


def test_show_default_quant_for_model_name():
    r = run("smollm2-135m")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("smollm2-135m:Q4_1") and "PyPI wheel" in r.output


def test_show_json():
    r = run("llama-2-13b-chat", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["model"]["name"] == "llama-2-13b-chat:Q4_K_M"
    assert data["model"]["files"] == [{"name": "llama-2-13b-chat.Q4_K_M.gguf", "size": 7865956224,
                                       "sha256": "7ddfe27f61bf994542c22aca213c46ecbd8a624cca74abff02a7b5a8c18f787f"}]
    assert data["model"]["shape"]["n_layer"] == 40
    card = data["card"]
    assert card["license"] == "llama2" and card["spdx"] is None and card["osi_approved"] is False
    assert card["requires_acceptance"] is True and card["released"] == "2023-07-18"
    assert any("700 million" in r for r in card["restrictions"])
    assert [q["quant"] for q in data["quants"]][0] == "Q8_0" and len(data["quants"]) == 12
    assert sum(q["default"] for q in data["quants"]) == 1


def test_show_json_open_model():
    data = json.loads(run("mistral-7b-instruct", "--json").output)
    assert data["card"]["spdx"] == "Apache-2.0" and data["card"]["requires_acceptance"] is False
    assert data["model"]["shape"]["n_head_kv"] == 8


@pytest.mark.parametrize("name,suggestion", [("llama-2-7b-caht", "llama-2-7b-chat"),
                                             ("grok-1:Q5_K", "grok-1:Q4_K")])
def test_show_unknown_model_exits_2_with_close_matches(name, suggestion):
    r = run(name)
    assert r.exit_code == 2
    assert f"error: unknown model {name!r}" in r.stderr
    assert suggestion in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.output


def test_show_is_registered_and_has_help():
    r = CliRunner().invoke(cli, ["show", "--help"])
    assert r.exit_code == 0 and "openness card" in r.output
