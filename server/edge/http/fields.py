"""Typed reads of an HTTP request's fields (a JSON object, or a multipart form whose values are text):
each wrong type or value is a 400 naming the field (errors.bad_request), before the edge core sees
the request. Ranges are the core's to check (validation.py), but for what does not fit the proto's
field at all (a negative or 2^32 `n`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import ApiError, bad_request

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1


class Fields:
    """The fields of one request; `form`: values arrive as text (multipart) and are converted."""

    def __init__(self, values: Mapping[str, object], form: bool = False) -> None:
        self.values = values
        self.form = form

    def check_known(self, known: frozenset[str], route: str) -> None:
        """400 for a field the route does not have (a typo must not be ignored silently)."""
        unknown = sorted(set(self.values) - known)
        if unknown:
            raise bad_request(unknown[0], f"{unknown[0]} is not a field of {route} (fields: "
                                          f"{', '.join(sorted(known))}; docs/http.md)")

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise bad_request(name, f"{name} is {_shown(value)}; expected a string")
        return value

    def integer(self, name: str, maximum: int = UINT32) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        if self.form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad_request(name, f"{name} is {_shown(value)}; expected an integer") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(name, f"{name} is {_shown(value)}; expected an integer")
        if not 0 <= value <= maximum:
            raise bad_request(name, f"{name} is {value}; the range is 0 to {maximum}")
        return value

    def number(self, name: str) -> float | None:
        value = self.values.get(name)
        if value is None:
            return None
        if self.form and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad_request(name, f"{name} is {_shown(value)}; expected a number") from None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise bad_request(name, f"{name} is {_shown(value)}; expected a finite number")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.values.get(name)
        if value is None:
            return False
        if self.form and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if not isinstance(value, bool):
            raise bad_request(name, f"{name} is {_shown(value)}; expected true or false")
        return value

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        if value not in allowed:
            raise bad_request(name, f"{name} is {_shown(value)}; expected one of {', '.join(allowed)}")
        return value


def size(value: str | None) -> tuple[int, int] | None:
    """OpenAI's `size`: "WIDTHxHEIGHT" -> (width, height); "auto" or absent -> None (the route's default)."""
    if value is None or value == "auto":
        return None
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) > UINT32 or int(height) > UINT32:
        raise bad_request("size", f"size is {_shown(value)}; expected WIDTHxHEIGHT in pixels (e.g. 512x512) or auto")
    return int(width), int(height)


def adapters(value: object) -> list[tuple[str, float | None]]:
    """`adapters`: [{"name": N, "scale": S}, ...] (the proto's AdapterWeight) or {N: S, ...}."""
    if value is None:
        return []
    items: list[object]
    if isinstance(value, dict):
        items = [{"name": name, "scale": scale} for name, scale in value.items()]
    elif isinstance(value, list):
        items = value
    else:
        raise bad_request("adapters", f"adapters is {_shown(value)}; expected a list of {{name, scale}} or "
                                      "an object {name: scale}")
    weights: list[tuple[str, float | None]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "scale"}:
            raise bad_request("adapters", f"adapters has {_shown(item)}; each is {{\"name\": str, \"scale\": number}}")
        scale = item.get("scale")
        if scale is not None and (not isinstance(scale, int | float) or isinstance(scale, bool)
                                  or not math.isfinite(scale)):
            raise bad_request("adapters", f"adapters' scale is {_shown(scale)}; expected a finite number")
        weights.append((item["name"], None if scale is None else float(scale)))
    return weights


def _shown(value: object) -> str:
    """A client's value in an error message: repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["ApiError", "Fields", "adapters", "size"]
