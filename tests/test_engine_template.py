"""Chat prompts: the GGUF's Jinja template (ChatML for the demo model) and the Llama 2 fallback, exactly."""

from __future__ import annotations

import pytest

from runner.engine.types import ChatMessage
from runner.engine.template import ChatFormat, llama2_prompt
from runner.core.errors import EngineError, UsageError

S, U, A = "system", "user", "assistant"


def test_llama2_format_exact_with_system_and_turns():
    msgs = [ChatMessage(S, "Be brief."), ChatMessage(U, "Hi"), ChatMessage(A, "Hello!"), ChatMessage(U, "Bye?")]
    assert llama2_prompt(msgs) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                                   "<s>[INST] Bye? [/INST]")


def test_llama2_format_without_system():
    assert llama2_prompt([ChatMessage(U, "What is 2+2?")]) == "<s>[INST] What is 2+2? [/INST]"


def test_llama2_is_the_fallback_for_files_without_a_template():
    f = ChatFormat(None)
    assert f.name == "llama2"
    assert f.render([ChatMessage(U, "x")]) == "<s>[INST] x [/INST]"


def test_gguf_template_demo_model_chatml(demo_gguf):
    from runner.model.gguf import read_header

    meta = read_header(demo_gguf).metadata
    f = ChatFormat(meta["tokenizer.chat_template"], "<|im_start|>", "<|im_end|>")
    assert f.render([ChatMessage(S, "Be brief."), ChatMessage(U, "Hi")]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # without a system message the template adds its own
    assert f.render([ChatMessage(U, "Hi")]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    assert not f.render([ChatMessage(U, "Hi")], add_generation_prompt=False).endswith("assistant\n")


def test_template_raise_exception_and_broken_templates():
    strict = ChatFormat("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    assert strict.render([ChatMessage(U, "a")]) == "ok"
    with pytest.raises(UsageError, match="user first"):
        strict.render([ChatMessage(A, "a")])
    with pytest.raises(EngineError, match="could not be rendered"):
        ChatFormat("{% for m in messages %}").render([ChatMessage(U, "a")])


def test_template_is_sandboxed():
    evil = ChatFormat("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises((EngineError, UsageError)):
        evil.render([ChatMessage(U, "a")])
