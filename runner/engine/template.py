"""Chat prompts: the GGUF's own `tokenizer.chat_template` rendered with Jinja (sandboxed, as Hugging Face
transformers renders it), or the Llama 2 `[INST] <<SYS>>` format for files that carry no template."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from runner.engine.types import ChatMessage
from runner.core.errors import EngineError, UsageError


def llama2_prompt(messages: Sequence[ChatMessage]) -> str:
    """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST]`."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    out: list[str] = []
    first_user = True
    for m in turns:
        if m.role in ("user", "tool"):
            text = m.content.strip()
            if first_user and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            first_user = False
            out.append(f"<s>[INST] {text} [/INST]")
        elif m.role == "assistant":
            if not out:
                raise UsageError("a conversation in the Llama 2 format must start with a user message")
            out.append(f" {m.content.strip()} </s>")
    if first_user and system:  # a system prompt alone
        out.append(f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]")
    return "".join(out)


def _raise_exception(message):
    raise UsageError(f"the model's chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled once in a sandboxed environment (as transformers renders chat templates)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
    return env.from_string(template)


@dataclass(frozen=True)
class ChatFormat:
    """Renders a conversation into the prompt text the model was trained on."""

    template: str | None
    bos_token: str = ""
    eos_token: str = ""

    @property
    def name(self) -> str:
        return "gguf" if self.template else "llama2"

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        if not self.template:
            return llama2_prompt(messages)
        import jinja2

        try:
            tmpl = _compile(self.template)
            return tmpl.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                               add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                               eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise EngineError(f"the model's chat template could not be rendered: {e}",
                              hint="the GGUF's tokenizer.chat_template is broken; use `llmrun run` with a raw prompt") from e
