"""GBNF grammars from JSON schemas, with llama.cpp's own converter (llama-cpp-python's `llama_grammar`, pure
Python text conversion; the engine's grammar sampler does the constraining). Used for JSON mode, JSON-schema
response formats and tool calls. Schemas the converter cannot handle become UsageError naming the field."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from runner.core.errors import UsageError

# llama-cpp-python's converter lets raw control characters (newlines, tabs) into JSON strings, which makes the
# output invalid JSON; llama.cpp's C++ converter excludes them. Its rule, and the one we use instead:
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

# the converter signals unsupported schemas with assertions and attribute/key errors on odd shapes
_CONVERTER_ERRORS = (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _strict_strings(gbnf: str) -> str:
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


def json_grammar(schema: object | None = None, *, param: str) -> str:
    """GBNF text for "any JSON object" (schema None) or for a JSON schema; `param` names the field in errors."""
    from llama_cpp import llama_grammar

    if schema is None:
        return str(llama_grammar.JSON_GBNF)
    if not isinstance(schema, dict):
        raise UsageError(f"{param} must be a JSON schema object", hint='e.g. {"type": "object", "properties": {}}',
                         field=param)
    try:
        conv = _converter()
        resolved = conv.resolve_refs(json.loads(json.dumps(schema)), "request")
        conv.visit(resolved, "")
        return _strict_strings(conv.format_grammar())
    except _CONVERTER_ERRORS as e:
        raise UsageError(f"{param} is not a JSON schema llama.cpp grammars support: {e}",
                         hint="use plain types, properties, required, enum, arrays; no remote $ref", field=param) from e


def rules_for(schemas: Sequence[tuple[Mapping[str, Any], str, str]]) -> tuple[str, list[str]]:
    """(rules, rule names): GBNF rules matching each (schema, rule name, field) under its name (never `root`),
    converted together so shared rules are defined once, to embed in a grammar whose root the caller writes."""
    conv = _converter()
    names = []
    for schema, name, param in schemas:
        try:
            resolved = conv.resolve_refs(json.loads(json.dumps(schema)), "request")
            names.append(str(conv.visit(resolved, name)))
        except _CONVERTER_ERRORS as e:
            raise UsageError(f"{param} is not a JSON schema llama.cpp grammars support: {e}",
                             hint="use plain types, properties, required, enum, arrays; no remote $ref",
                             field=param) from e
    return _strict_strings(conv.format_grammar()), names


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)
