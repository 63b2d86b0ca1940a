"""GBNF grammars from JSON schemas, with llama.cpp's own converter (llama-cpp-python's `llama_grammar`, pure
Python text conversion; the engine's grammar sampler does the constraining). Used for JSON mode, JSON-schema
response formats and tool calls. Schemas the converter cannot handle become UsageError naming the field."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

from runner.core.errors import UsageError

# llama-cpp-python's converter lets raw control characters (newlines, tabs) into JSON strings, which makes the
# output invalid JSON; llama.cpp's C++ converter excludes them. Its rule, and the one we use instead:
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

# the converter signals unsupported schemas with assertions and attribute/key errors on odd shapes
_CONVERTER_ERRORS = (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)


def _converter() -> Any:
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        """llama-cpp-python's converter, plus integer ranges (`minimum`, `maximum` and their exclusive forms),
        which it leaves unenforced and llama.cpp's C++ converter enforces."""

        def visit(self, schema: Any, name: str) -> Any:
            bounds = _int_bounds(schema)
            if bounds is None:
                return super().visit(schema, name)
            out: list[str] = []
            _min_max_int(*bounds, out)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, "(" + "".join(out) + ") space")

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _int_bounds(schema: Any) -> tuple[int | None, int | None] | None:
    if not isinstance(schema, dict) or schema.get("type") != "integer":
        return None
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        lo = int(schema["exclusiveMinimum"]) + 1
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema["exclusiveMaximum"], bool):
        hi = int(schema["exclusiveMaximum"]) - 1
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    if lo is None and hi is None:
        return None
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"no integer lies between minimum {lo} and maximum {hi}")
    return lo, hi


def _min_max_int(lo: int | None, hi: int | None, out: list[str], decimals_left: int = 16,
                 top_level: bool = True) -> None:
    """GBNF for the integers in [lo, hi] (None: unbounded), as llama.cpp's json-schema-to-grammar.cpp writes
    it (build_min_max_int), ported."""
    def digit_range(a: str, b: str) -> None:
        out.append(f"[{a}]" if a == b else f"[{a}-{b}]")

    def more_digits(lo_d: int, hi_d: int | None) -> None:
        out.append("[0-9]")
        if lo_d == hi_d == 1:
            return
        out.append("{" + str(lo_d) + ("" if hi_d == lo_d else "," + ("" if hi_d is None else str(hi_d))) + "}")

    def uniform_range(a: str, b: str) -> None:
        i = 0
        while i < len(a) and i < len(b) and a[i] == b[i]:
            i += 1
        if i > 0:
            out.append(f'"{a[:i]}"')
        if i < len(a) and i < len(b):
            if i > 0:
                out.append(" ")
            sub_len = len(a) - i - 1
            if sub_len > 0:
                a_sub, b_sub = a[i + 1:], b[i + 1:]
                zeros, nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if a_sub == zeros:
                    digit_range(a[i], chr(ord(b[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{a[i]}] (")
                    uniform_range(a_sub, nines)
                    out.append(")")
                    if ord(a[i]) < ord(b[i]) - 1:
                        out.append(" | ")
                        if b_sub == nines:
                            digit_range(chr(ord(a[i]) + 1), b[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(a[i]) + 1), chr(ord(b[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(b[i], b[i])
                    out.append(" ")
                    uniform_range(zeros, b_sub)
                out.append(")")
            else:
                out.append(f"[{a[i]}-{b[i]}]")

    if lo is not None and hi is not None:
        if lo < 0 and hi < 0:
            out.append('"-" (')
            _min_max_int(-hi, -lo, out, decimals_left, True)
            out.append(")")
            return
        if lo < 0:
            out.append('"-" (')
            _min_max_int(0, -lo, out, decimals_left, True)
            out.append(") | ")
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for digits in range(len(lo_s), len(hi_s)):
            uniform_range(lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(lo_s, hi_s)
        return
    less = max(decimals_left - 1, 1)
    if lo is not None:
        if lo < 0:
            out.append('"-" (')
            _min_max_int(None, -lo, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif lo == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less)
            else:
                more_digits(1, decimals_left)
        elif lo <= 9:
            c = str(lo)
            start = "1" if top_level else "0"
            if c > start:
                digit_range(start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less)
        else:
            lo_s = str(lo)
            c = lo_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(lo_s), less)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            _min_max_int(int(lo_s[1:]), None, out, less, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(lo_s) - 1, less)
        return
    assert hi is not None
    if hi >= 0:
        if top_level:
            out.append('"-" [1-9] ')
            more_digits(0, less)
            out.append(" | ")
        _min_max_int(0, hi, out, decimals_left, True)
    else:
        out.append('"-" (')
        _min_max_int(-hi, None, out, decimals_left, False)
        out.append(")")


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
