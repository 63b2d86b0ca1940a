"""Chat prompts: the GGUF's own `tokenizer.chat_template` rendered with Jinja (sandboxed, as Hugging Face
transformers renders it), or the Llama 2 `[INST] <<SYS>>` format for files that carry no template."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from runner.engine.types import ChatMessage
from runner.core.errors import EngineError, LlmrunError, UsageError

# what the server sets itself; chat_template_kwargs may not replace them
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                "raise_exception", "strftime_now"})


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


@functools.lru_cache(maxsize=8)
def _variables(template: str) -> frozenset[str]:
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:
        return frozenset()


@dataclass(frozen=True)
class ChatFormat:
    """Renders a conversation into the prompt text the model was trained on."""

    template: str | None
    bos_token: str = ""
    eos_token: str = ""

    @property
    def name(self) -> str:
        return "gguf" if self.template else "llama2"

    @functools.cached_property
    def variables(self) -> frozenset[str]:
        """The variables the template reads from its caller (`tools`, `enable_thinking`, ...)."""
        if not self.template:
            return frozenset()
        return _variables(self.template)

    @property
    def takes_tools(self) -> bool:
        return "tools" in self.variables

    @functools.cached_property
    def supports_system(self) -> bool:
        """Whether the template renders system messages (Gemma's refuses them), found by rendering a probe, as
        llama.cpp's template capability detection does."""
        if not self.template:
            return True
        probe = "\x01llmrun-system-probe\x01"
        try:
            text = self._render([ChatMessage("system", probe), ChatMessage("user", "hi")], add_generation_prompt=True,
                                variables={})
        except (LlmrunError, TypeError, ValueError, AttributeError, KeyError, IndexError):
            return False
        return probe in text

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, extra: Mapping[str, Any] | None = None) -> str:
        """The prompt. `tools` (OpenAI-shaped) go to templates that take them; `extra` are more template
        variables (chat_template_kwargs). Messages carry tool calls and results as Hugging Face templates
        expect them."""
        if not self.template:
            return llama2_prompt(messages)
        bad = sorted(RESERVED_VARIABLES & set(extra or {}))
        if bad:
            raise UsageError(f"chat_template_kwargs may not set {', '.join(bad)}: the server sets it",
                             field=f"chat_template_kwargs.{bad[0]}")
        variables: dict[str, Any] = dict(extra or {})
        if tools is not None:
            variables["tools"] = tools
        if any(m.role == "system" for m in messages) and not self.supports_system:
            messages = _system_into_user(messages)
        return self._render(messages, add_generation_prompt=add_generation_prompt, variables=variables)

    def _render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool,
                variables: Mapping[str, Any]) -> str:
        import jinja2

        from runner.engine.tools import message_dict

        assert self.template is not None
        try:
            tmpl = _compile(self.template)
            return tmpl.render(messages=[message_dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                               eos_token=self.eos_token, **variables)
        except UsageError:                       # the template's own raise_exception
            raise
        except jinja2.TemplateError as e:
            raise EngineError(f"the model's chat template could not be rendered: {e}",
                              hint="the GGUF's tokenizer.chat_template is broken; use `llmrun run` with a raw prompt") from e
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:   # its code on these messages
            raise UsageError(f"the model's chat template could not render this conversation ({type(e).__name__}: "
                             f"{e})") from e


def _system_into_user(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """For templates without a system role: the system text opens the first user message (as llama.cpp does)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    i = next((k for k, m in enumerate(rest) if m.role == "user"), None)
    if i is None:
        return [ChatMessage("user", system)] + rest
    return rest[:i] + [replace(rest[i], content=f"{system}\n\n{rest[i].content}")] + rest[i + 1:]


def fit_conversation(messages: Sequence[ChatMessage], render: Callable[[Sequence[ChatMessage]], list[int]], *,
                     limit: int, reserve: int) -> tuple[list[int], int]:
    """The tokens of the longest tail of the conversation that leaves `reserve` of `limit` tokens for the answer,
    and how many messages it leaves out (never the system prompt). The cut is found by bisection over the places
    a kept conversation may start (a user or tool turn, or the last message): a few renders however long the
    conversation, not one per dropped turn. The last message alone is the last resort (the caller checks that it
    fits)."""
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    rendered: dict[int, list[int]] = {}

    def tokens_from(k: int) -> list[int]:
        if k not in rendered:
            rendered[k] = render(system + turns[k:])
        return rendered[k]

    def fits(k: int) -> bool:
        return len(tokens_from(k)) + reserve <= limit

    # where a kept conversation may start: the whole of it, then every later turn that is not the assistant's
    # (keep turns starting with the user), and the last message alone as the last resort
    cuts = [0] + [k for k in range(1, len(turns)) if turns[k].role != "assistant" or k == len(turns) - 1]
    if fits(0) or len(turns) <= 1:
        return tokens_from(0), 0
    lo, hi = 1, len(cuts) - 1      # cuts[hi] is used when nothing fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return tokens_from(cuts[lo]), cuts[lo]
