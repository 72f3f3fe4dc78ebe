"""JSON as RFC 8259 defines it, whatever its values: the platform list's items are decoded here.

Python's decoder refuses some valid JSON for its values alone: an integer of more than
4,300 digits (the int conversion limit) and nesting past the recursion limit. A job body
holding either would lose its id with the rest, and could not even be told it failed. Here
such values decode to `Unreadable` markers instead, in place, so the job model can read the
id and refuse the field that holds one by name, and ignore one in a place it never reads.

Numbers beyond a float's range (`1e400`) decode to infinities and lone surrogates (`\\ud800`)
to Python strings, as Python's decoder gives them: the job model refuses them where it
keeps them. `NaN` and `Infinity`, which Python also accepts, are accepted too.
"""

from __future__ import annotations

import json
import re
import sys
from json.decoder import scanstring
from typing import Any

#: Containers nested deeper than this become `Unreadable` when Python's decoder runs out of
#: recursion; far more than any job field has, few enough to walk or print.
DEPTH_MAX = 64

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = {
    "true": True,
    "false": False,
    "null": None,
    "NaN": float("nan"),
    "Infinity": float("inf"),
    "-Infinity": float("-inf"),
}


class Unreadable:
    """A valid JSON value Python cannot hold as itself; says what it was when shown."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


def loads(text: str) -> Any:
    """Decode any JSON text; ValueError only for text that is not JSON."""
    try:
        return json.loads(text, parse_int=_integer)
    except RecursionError:
        return _Parser(text).value()


def _integer(digits: str) -> int | Unreadable:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        return Unreadable(f"an integer of {len(digits.lstrip('-'))} digits")
    return int(digits)


class _Parser:
    """A parser without recursion, for text nested too deep for Python's: containers past
    DEPTH_MAX are read through (the text must still be JSON) and kept as `Unreadable`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def value(self) -> Any:
        #: The open containers, innermost last, each with the key its next value goes under
        #: (objects) and whether it is kept (not past DEPTH_MAX).
        stack: list[list[Any]] = []
        while True:
            char = self._next()
            if char in ("[", "{"):
                self.pos += 1
                container: list[Any] | dict[str, Any] = [] if char == "[" else {}
                stack.append([container, None, len(stack) < DEPTH_MAX])
                if (closing := self._next()) in ("]", "}"):
                    self.pos += 1
                    value = self._close(stack, closing)
                elif char == "{":
                    stack[-1][1] = self._key()
                    continue
                else:
                    continue
            elif char == '"':
                value, self.pos = scanstring(self.text, self.pos + 1)
            else:
                value = self._scalar()
            # A value is complete: it goes into its container, or it is the whole text.
            while True:
                if not stack:
                    if self._next() != "":
                        raise self._error("extra data")
                    return value
                container, key, kept = stack[-1]
                if kept:
                    if isinstance(container, dict):
                        container[key] = value
                    else:
                        container.append(value)
                char = self._next()
                self.pos += 1
                if char == ",":
                    if isinstance(container, dict):
                        stack[-1][1] = self._key()
                    break
                if char not in ("]", "}"):
                    raise self._error("expected ',' or the end of the array or object")
                value = self._close(stack, char)

    def _close(self, stack: list[list[Any]], closing: str) -> Any:
        """End the innermost container with the bracket just read."""
        container, _, kept = stack.pop()
        if isinstance(container, dict) != (closing == "}"):
            raise self._error("mismatched bracket")
        if not kept:
            return Unreadable(f"an array or object nested deeper than {DEPTH_MAX} levels")
        return container

    def _key(self) -> str:
        if self._next() != '"':
            raise self._error("expected a key in double quotes")
        key, self.pos = scanstring(self.text, self.pos + 1)
        if self._next() != ":":
            raise self._error("expected ':'")
        self.pos += 1
        self._next()
        return key

    def _scalar(self) -> Any:
        for name, constant in _CONSTANTS.items():
            if self.text.startswith(name, self.pos):
                self.pos += len(name)
                return constant
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise self._error("expected a value")
        self.pos = match.end()
        fraction, exponent = match[1], match[2]
        return _integer(match[0]) if fraction is None and exponent is None else float(match[0])

    def _next(self) -> str:
        """Skip whitespace; the next character, '' at the end."""
        self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos : self.pos + 1]

    def _error(self, what: str) -> ValueError:
        return ValueError(f"{what} at character {self.pos}")
