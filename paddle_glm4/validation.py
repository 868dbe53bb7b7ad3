"""Untrusted JSON, checked before use: a bounded reader and small declarative schemas.

Every JSON document the project reads (config.json, generation_config.json, tokenizer_config.json, the
safetensors index and headers, export.json, conversion_manifest.json) comes from a file someone else may have
written. `read_json` reads one with limits (size, nesting depth, no NaN/Infinity, no repeated keys), and a
schema states what each field must be; a violation raises `SchemaError` (or the caller's ValueError) with
one line naming the file, the field and the value: `config.json: hidden_size: must be an integer in
[1, 65536], got 256.5`. The CLI prints it and exits 2 (cli_errors.run_cli); the server answers 400.

Integers are strict: a bool is not an integer and 256.5 or 256.0 is not 256. Numbers are finite. Schemas
check types and ranges of single fields; rules that relate fields stay with the code that knows them.

Imports nothing heavy (no Paddle), so the converter can use it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any

from .source_files import check_source_file

# A JSON file this project reads is a few kB (configs, index, manifests) to a few MB (a tokenizer config with a
# long template, a manifest recording a big checkpoint's headers); anything past these limits is refused
# before parsing.
MAX_JSON_BYTES = 64 << 20
MAX_DEPTH = 32  # the deepest legitimate file nests 5 levels; deeper is a nesting bomb (RecursionError)
SEED_LIMIT = 2**63  # seeds are in [0, 2^63): what Paddle's and numpy's generators take


class SchemaError(ValueError):
    """A JSON document or value that does not have the form its reader needs; the message names the file
    (or argument) and the field. The project's file errors (ConfigError, SafetensorsError, ...) derive from it."""


class Invalid(Exception):
    """Raised inside a schema check: where (a field path) and what is wrong; turned into a SchemaError."""

    def __init__(self, path: str, problem: str):
        super().__init__(path, problem)
        self.path, self.problem = path, problem


def _show(value: Any) -> str:
    """A short rendering of an offending value (JSON where it is JSON, repr otherwise)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    try:
        text = json.dumps(value)
    except TypeError:  # a value handed over from Python rather than read from JSON: bytes, a set, ...
        text = f"{type(value).__name__} {value!r}"
    except ValueError:  # an integer too long for str()
        text = "an integer of more than 4300 digits"
    return text if len(text) <= 60 else text[:57] + "..."


class Schema:
    """What a value must be. `check(value, path)` raises Invalid; `describe()` says what is expected."""

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _fail(self, value: Any, path: str):
        raise Invalid(path, f"must be {self.describe()}, got {_show(value)}")


class Int(Schema):
    """An integer (not a bool, not a float) in [min, max]."""

    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max

    def check(self, value: Any, path: str) -> None:
        if (
            type(value) is not int
            or (self.min is not None and value < self.min)
            or (self.max is not None and value > self.max)
        ):
            self._fail(value, path)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return "a positive integer" if self.min == 1 else f"an integer >= {self.min}"
        return "an integer" if self.max is None else f"an integer <= {self.max}"


class Number(Schema):
    """A finite int or float (not a bool) in a range; `above`/`below` make that end exclusive."""

    def __init__(
        self, min: float | None = None, max: float | None = None, above: float | None = None, below: float | None = None
    ):
        self.min, self.max, self.above, self.below = min, max, above, below

    def check(self, value: Any, path: str) -> None:
        if (
            type(value) not in (int, float)
            or not math.isfinite(value)
            or (self.min is not None and value < self.min)
            or (self.max is not None and value > self.max)
            or (self.above is not None and value <= self.above)
            or (self.below is not None and value >= self.below)
        ):
            self._fail(value, path)

    def describe(self) -> str:
        parts = [
            f">= {self.min}" if self.min is not None else None,
            f"> {self.above}" if self.above is not None else None,
            f"<= {self.max}" if self.max is not None else None,
            f"< {self.below}" if self.below is not None else None,
        ]
        bounds = " and ".join(p for p in parts if p)
        return f"a finite number {bounds}" if bounds else "a finite number"


class Bool(Schema):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not bool:
            self._fail(value, path)

    def describe(self) -> str:
        return "true or false"


class Str(Schema):
    """A string: one of `choices`, or matching `pattern` (whole string), at most `max_len` characters."""

    def __init__(
        self,
        choices: tuple[str, ...] | None = None,
        pattern: str | None = None,
        max_len: int | None = None,
        what: str | None = None,
    ):
        self.choices, self.max_len, self.what = choices, max_len, what
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value: Any, path: str) -> None:
        if (
            not isinstance(value, str)
            or (self.choices is not None and value not in self.choices)
            or (self.pattern is not None and not self.pattern.fullmatch(value))
            or (self.max_len is not None and len(value) > self.max_len)
        ):
            self._fail(value, path)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        if self.what:
            return self.what
        return "a string" if self.max_len is None else f"a string of at most {self.max_len} characters"


class Null(Schema):
    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self._fail(value, path)

    def describe(self) -> str:
        return "null"


class List(Schema):
    def __init__(self, item: Schema, min_len: int = 0, max_len: int | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value: Any, path: str) -> None:
        if (
            not isinstance(value, list)
            or len(value) < self.min_len
            or (self.max_len is not None and len(value) > self.max_len)
        ):
            self._fail(value, path)
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]")

    def describe(self) -> str:
        if self.min_len == self.max_len:
            size = f"{self.min_len} "
        elif self.max_len is not None:
            size = f"{self.min_len} to {self.max_len} "
        else:
            size = "" if not self.min_len else f"at least {self.min_len} "
        return f"a list of {size}items, each {self.item.describe()}"


class Object(Schema):
    """A JSON object whose listed fields (when present, or always if `required`) have their schemas. Other
    keys are allowed (published files carry many we do not read) unless `closed`."""

    def __init__(self, fields: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = False):
        self.fields, self.required, self.closed = fields, required, closed

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self._fail(value, path)
        for key in self.required:
            if key not in value:
                raise Invalid(_join(path, key), "is missing")
        for key, item in value.items():
            schema = self.fields.get(key)
            if schema is not None:
                schema.check(item, _join(path, key))
            elif self.closed:
                raise Invalid(_join(path, key), f"is not a known field (known: {', '.join(self.fields)})")

    def describe(self) -> str:
        return "an object"


class Map(Schema):
    """An object with any keys (matching `key`) whose values all have the schema `value`."""

    def __init__(self, value: Schema, key: Str | None = None, max_len: int | None = None):
        self.value, self.key, self.max_len = value, key, max_len

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict) or (self.max_len is not None and len(value) > self.max_len):
            self._fail(value, path)
        for key, item in value.items():
            if self.key is not None:
                try:
                    self.key.check(key, path)
                except Invalid:
                    raise Invalid(_join(path, key), f"is not a valid key: keys must be {self.key.describe()}") from None
            self.value.check(item, _join(path, key))

    def describe(self) -> str:
        return "an object" if self.max_len is None else f"an object of at most {self.max_len} entries"


class AnyOf(Schema):
    """The first of `options` that the value passes."""

    def __init__(self, *options: Schema):
        self.options = options

    def check(self, value: Any, path: str) -> None:
        for option in self.options:
            try:
                option.check(value, path)
                return
            except Invalid:
                if _same_kind(option, value):  # an object or list of the option's kind: its own inner problem
                    raise
        self._fail(value, path)

    def describe(self) -> str:
        return " or ".join(option.describe() for option in self.options)


def _same_kind(schema: Schema, value: Any) -> bool:
    return (isinstance(schema, (Object, Map)) and isinstance(value, dict)) or (
        isinstance(schema, List) and isinstance(value, list)
    )


def Optional(schema: Schema) -> Schema:
    return AnyOf(Null(), schema)


def _join(path: str, key: str) -> str:
    """files[0].name, weight_map['model.norm.weight']: dotted where the key is a name, bracketed otherwise."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def validate(data: Any, schema: Schema, source: str, error: type[ValueError] = SchemaError) -> Any:
    """`data` if it has `schema`, else `error` naming `source` (a file, or an argument) and the field."""
    try:
        schema.check(data, "")
    except Invalid as err:
        raise error(": ".join(part for part in (source, err.path, err.problem) if part)) from None
    return data


# ---- reading -----------------------------------------------------------------------------------------------
def nesting_depth(data: Any) -> int:
    """How deep the lists and objects of parsed JSON nest, counted without recursion and only until it
    exceeds MAX_DEPTH (the parser itself refuses a bomb that would exhaust the stack: RecursionError)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range (numbers must be finite)")
    return value


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def parse_json(
    text: str | bytes, source: str, schema: Schema | None = None, error: type[ValueError] = SchemaError
) -> Any:
    """Parse untrusted JSON text: UTF-8, nested at most MAX_DEPTH levels, finite numbers (no NaN, Infinity or
    1e999), no key twice in one object; then check `schema`. Every failure is `error` naming `source`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"{source}: not valid JSON (not UTF-8 text: {err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constants, parse_float=_finite, object_pairs_hook=_no_repeats)
    except RecursionError:  # the C parser stops a nesting bomb at the interpreter's recursion limit
        raise error(f"{source}: not valid JSON for this project (nested more than {MAX_DEPTH} levels deep)") from None
    except ValueError as err:  # JSONDecodeError, the hooks above, integers of more than 4300 digits
        raise error(f"{source}: not valid JSON ({str(err).splitlines()[0]})") from None
    # (a document with fewer brackets than that, e.g. one long list of numbers, needs no walk)
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(data) > MAX_DEPTH:
        raise error(f"{source}: not valid JSON for this project (nested more than {MAX_DEPTH} levels deep)")
    if schema is not None:
        validate(data, schema, source, error)
    return data


def read_bounded(path: str, max_bytes: int, error: type[ValueError] = SchemaError) -> bytes:
    """The bytes of the regular file `path`, refused if larger than `max_bytes`; a FIFO or device is refused
    without blocking on it, and so is a link that leads out of the file's directory (source_files). A missing file
    raises FileNotFoundError (the callers say what it means)."""
    check_source_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{path}: {info.st_size} bytes, more than the {max_bytes} this file may have")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)  # (not max_bytes + 1: read() allocates what it is asked for)
    finally:
        os.close(fd)
    if len(data) > info.st_size:
        raise error(f"{path}: grew while being read")
    return data


def read_json(
    path: str, schema: Schema | None = None, error: type[ValueError] = SchemaError, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """Read and check the JSON file `path` (see parse_json); FileNotFoundError if it is missing."""
    return parse_json(read_bounded(path, max_bytes, error), path, schema, error)


# ---- values shared by several readers ---------------------------------------------------------------------------
SEED = Int(0, SEED_LIMIT - 1)


def check_seed(seed: int | None, source: str = "seed") -> int | None:
    """A random seed (None: unseeded) in [0, 2^63), or a SchemaError naming `source` (e.g. `--seed`)."""
    if seed is not None:
        validate(seed, SEED, source)
    return seed
