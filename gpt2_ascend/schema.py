"""One validation layer for every file a user hands us, and for the Python API's settings.

Recipes, config.json, generation_config.json, adapter_config.json, shard indexes, data sidecars, checkpoint manifests
and vocab.json are each parsed once, against a table of `Key`s, into a typed record; so are the dataclasses a
notebook fills in (TrainJob's parts, GPT2Config). A wrong type, a value out of range, a missing required field, an
unknown key or a structure of the wrong kind (a list where a mapping belongs) is one ValueError line naming the
file, the field, the value and what is expected:

    bad value 'no' for 'tie_word_embeddings' in out/final/config.json: expected true or false

    SIDECAR = dict(format_version=Key(REQUIRED, "int", minimum=1), kind=Key(REQUIRED, "choice", KINDS), ...)
    meta = parse(read_json(path, fix="prepare the data again"), SIDECAR, path)   # a Record: meta.kind, meta["kind"]

Numbers are finite (JSON's NaN / Infinity and YAML's .nan / .inf are refused everywhere), integers fit in int64,
sizes in MAX_SIZE, and a file is read under a byte limit (a JSON file) or an alias and node limit (YAML: yaml_load), so
a crafted file costs a bounded time and memory. Names a file gives for other files resolve inside its folder
(`contained`). Why a layer of our own rather than pydantic: docs/architecture.md, "The validation layer".
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import reprlib
from dataclasses import dataclass
from typing import Any, Callable

REQUIRED = object()  # a Key's default when the field must be given
MAX_INT = (1 << 63) - 1  # every integer fits in int64: what torch, numpy and JSON readers elsewhere hold
# Any count or size in a file (widths, layers, vocab, positions, ranks, labels) is at most 2^24: far past every real
# model (GPT-2 52B is 8192 wide, 64 layers), and a product of two stays well inside int64 (no overflowed storage
# size), so the memory budget, not an overflow, is what refuses a large shape.
MAX_SIZE = 1 << 24
SEED_MAX = (1 << 32) - 1  # numpy's np.random.seed takes no more; one range for every seed, training's and sampling's
MAX_JSON_BYTES = 64 << 20  # config, index, manifest, sidecar, vocab files are kilobytes to a few megabytes
MAX_YAML_BYTES = 4 << 20  # recipes are a few kilobytes
MAX_YAML_NODES = 100_000  # nodes of a YAML document with every alias expanded (a recipe has a few hundred)
EXTRA = "*"  # a section's entry for keys it does not name: a Key that checks them (absent: unknown keys are errors)


class SchemaError(ValueError):
    """A file or settings object that does not fit its schema (message: one line)."""


@dataclass(frozen=True)
class Key:
    """One field: its default (REQUIRED: must be given) and what values it accepts.

    kind: int | float | bool | str | choice | names (a non-empty list of names; 'a|b' or 'a,b' in a recipe) |
    list (of `items`) | map (string keys -> `items`) | section (a nested table `items`) | any (unchecked: a key that
    is read and ignored). Numbers are finite; minimum / maximum are inclusive, above / below exclusive. convert: a
    last step, value -> value, raising ValueError(what is expected)."""
    default: Any
    kind: str
    choices: Any = None  # tuple of names, or dict alias -> canonical name
    minimum: float | None = None
    nullable: bool = False
    doc: str = ""
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    items: Any = None  # list / map: the Key of each item; section: its table
    convert: Callable | None = None
    expects: str = ""  # what it accepts, in words, when expected() cannot say (a convert's kind)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def but(self, **changes) -> "Key":
        """This Key with some settings changed (another default, nullable for an API that takes None)."""
        return dataclasses.replace(self, **changes)


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _sha256(value: str) -> str:
    if not is_sha256(value):
        raise ValueError("a sha256: 64 lowercase hex digits")
    return value


SHA256 = Key(None, "str", convert=_sha256)  # a checksum a manifest or sidecar records


class Record(dict):
    """A parsed mapping whose keys also read as attributes (meta.kind, recipe.runner_config.batch_size)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Record) else _plain(v) for k, v in self.items()}


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------
def parse(raw, table: dict, source, *, lax: bool = False, prefix: str = "", record=Record,
          defaults: bool = True) -> Record:
    """`raw` (a mapping read from `source`) checked against `table` ({name: Key or nested table}), defaults filled
    in (defaults False: a key the file leaves out stays out). lax: a recipe's YAML spellings are accepted too ('true'
    / 'false' as booleans, '1e-4' as a number, a number where a string belongs); a JSON file gets none of them.
    source: the file's name, or a function of a field's dotted name (a recipe's overrides name the flag or override
    that set it)."""
    if raw is None and prefix:
        raw = {}
    if not isinstance(raw, dict):
        if prefix:
            raise SchemaError(f"'{prefix.rstrip('.')}' in {where(source, prefix.rstrip('.'))} must be a section "
                              f"(a mapping), got {shown(raw)}")
        raise SchemaError(f"{where(source, '')} must hold a mapping of keys to values, got {kind_of(raw)}")
    extra = table.get(EXTRA)
    unknown = [k for k in raw if k not in table or k == EXTRA]
    if unknown and extra is None:
        raise SchemaError(f"unknown key '{prefix}{unknown[0]}' in {where(source, prefix + str(unknown[0]))}: "
                          f"{_valid_keys(str(unknown[0]), [k for k in table if k != EXTRA], prefix)}")
    out = record()
    for name, spec in table.items():
        if name == EXTRA:
            continue
        if isinstance(spec, dict):
            if defaults or name in raw:
                out[name] = parse(raw.get(name), spec, source, lax=lax, prefix=f"{prefix}{name}.", record=record,
                                  defaults=defaults)
        elif name in raw:
            out[name] = check(raw[name], spec, prefix + name, source, lax=lax, record=record)
        elif spec.required:
            raise SchemaError(f"'{prefix}{name}' is missing in {where(source, prefix + name)}: expected "
                              f"{expected(spec)}")
        elif defaults:
            out[name] = spec.default
    for name in unknown:
        out[name] = check(raw[name], extra, prefix + str(name), source, lax=lax, record=record)
    return out


def _valid_keys(name: str, valid: list, prefix: str) -> str:
    """The valid keys (or, of a long list, the ones closest to a misspelt name)."""
    of = f"of {prefix.rstrip('.')} " if prefix else ""
    if len(valid) <= 30:
        return f"valid keys {of}are {', '.join(valid)}"
    close = difflib.get_close_matches(name, valid, n=3)
    return f"did you mean {' or '.join(close)}?" if close else f"no such key {of}is known here: remove it"


def where(source, name: str) -> str:
    """The file (or flag, or override) a field came from."""
    return source(name) if callable(source) else source


def check(value, spec: Key, name: str, source, *, lax: bool = False, record=Record):
    """One value checked (and converted: an integral float to int, a number to float) against its Key."""
    def bad(what=None):
        return SchemaError(f"bad value {shown(value)} for '{name}' in {where(source, name)}: expected "
                           f"{what or expected(spec)}")

    if value is None:
        if spec.nullable or spec.default is None:
            return None
        raise bad(f"{expected(spec)} (null is not allowed)")
    kind = spec.kind
    if kind == "any":
        result = value
    elif kind == "bool":
        if lax and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise bad()
        result = value
    elif kind == "int":
        result = _integer(value, lax)
        if result is None:
            raise bad()
        _check_range(result, spec, bad)
    elif kind == "float":
        result = _number(value, lax)
        if result is None:
            raise bad()
        _check_range(result, spec, bad)
    elif kind == "str":
        if lax and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad()
        result = value
    elif kind == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise bad()
        result = spec.choices[value] if isinstance(spec.choices, dict) else value
    elif kind == "names":
        if lax and isinstance(value, str):  # MindFormers style 'a|b' or 'a,b'
            value = [v for v in value.replace("|", ",").split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad()
        result = [v.strip() for v in value]
    elif kind == "list":
        if not isinstance(value, list):
            raise bad()
        result = [check(v, spec.items, f"{name}[{i}]", source, lax=lax, record=record) for i, v in enumerate(value)]
    elif kind == "map":
        if not isinstance(value, dict):
            raise bad()
        result = {k: check(v, spec.items, f"{name}.{k}", source, lax=lax, record=record) for k, v in value.items()}
    elif kind == "section":
        result = parse(value, spec.items, source, lax=lax, prefix=name + ".", record=record)
    else:
        raise AssertionError(f"unknown Key kind {kind!r}")
    if spec.convert is not None:
        try:
            result = spec.convert(result)
        except ValueError as e:
            raise bad(str(e)) from None
    return result


def check_fields(obj, table: dict, source: str):
    """A dataclass's fields (the Python API's settings) checked against `table` ({field: Key}) without converting
    them; errors name the field as Python spells it: bad value inf for 'learning_rate' in OptimizerSettings(...)."""
    for name, spec in table.items():
        check(getattr(obj, name), spec, name, source)


def _integer(value, lax: bool) -> int | None:
    """An integer, or None. lax: an integral finite float counts too (a recipe's 1.0e+3)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if lax and isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _number(value, lax: bool) -> float | None:
    """A finite number, or None. lax: a numeric string too (YAML 1.1 reads 1e-4, without a dot, as a string)."""
    if lax and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _check_range(value, spec: Key, bad):
    maximum = spec.maximum if spec.maximum is not None else (MAX_INT if spec.kind == "int" else None)
    if ((spec.minimum is not None and value < spec.minimum) or (maximum is not None and value > maximum)
            or (spec.above is not None and value <= spec.above) or (spec.below is not None and value >= spec.below)):
        raise bad()


def expected(spec: Key) -> str:
    """What a Key accepts, in words: 'an integer in [1, 16777216]', 'a finite number > 0', 'true or false'."""
    kind = spec.kind
    if spec.expects:
        return spec.expects
    if kind == "bool":
        return "true or false"
    if kind in ("int", "float"):
        noun = "an integer" if kind == "int" else "a finite number"
        low = f"[{_num(spec.minimum)}" if spec.minimum is not None else (f"({_num(spec.above)}" if spec.above is not None
                                                                            else None)
        default_ceiling = kind == "int" and spec.below is None
        maximum = spec.maximum if spec.maximum is not None or not default_ceiling else MAX_INT
        high = f"{_num(maximum)}]" if maximum is not None else (f"{_num(spec.below)})" if spec.below is not None
                                                                  else None)
        if low and high:
            return f"{noun} in {low}, {high}"
        if low:
            return f"{noun} {'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{noun} {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return noun
    if kind == "str":
        return "a string"
    if kind == "choice":
        return "one of " + ", ".join(spec.choices)
    if kind == "names":
        return "a non-empty list of names"
    if kind == "list":
        return f"a list of {_plural(spec.items)}"
    if kind == "map":
        return f"a mapping of names to {_plural(spec.items)}"
    if kind == "section":
        return "a mapping of " + ", ".join(k for k in spec.items if k != EXTRA)
    return "a value"


def _plural(spec: Key) -> str:
    words = expected(spec)
    for article in ("an ", "a "):
        if words.startswith(article):
            return words[len(article):].replace("integer", "integers", 1).replace("number", "numbers", 1) \
                .replace("string", "strings", 1)
    return words


def _num(x) -> str:
    """A bound as a reader compares it: 16777216, 1e-06, 2^63 - 1 (a power of two past 2^32 as one)."""
    if float(x).is_integer() and abs(x) > 1 << 32:
        for k in range(33, 128):
            if int(x) in (1 << k, (1 << k) - 1):
                return f"2^{k}" + (" - 1" if int(x) & 1 else "")
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 160, 60, 4, 4, 2


def shown(value) -> str:
    """A value as an error line shows it: its repr, cut short (a crafted value's full repr could be huge)."""
    return _REPR.repr(value)


def kind_of(value) -> str:
    """JSON's name for a parsed value's type: a list, a string, a number..."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def read_json(path: str, fix: str = "", max_bytes: int = MAX_JSON_BYTES):
    """A JSON file's value, strictly: UTF-8, at most max_bytes, no NaN / Infinity (not JSON), no key given twice in
    one object (json would keep the last silently). Any problem is one SchemaError naming the file; fix: what to do
    (appended after '; ')."""
    hint = f"; {fix}" if fix else ""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise SchemaError(f"{path} is {size} bytes, more than such a file can hold ({max_bytes}): not the file it "
                          f"should be{hint}")
    with open(path, "rb") as f:
        return loads_json(f.read(), path, fix)


def loads_json(data: bytes, source: str, fix: str = ""):
    """read_json's rules for JSON bytes read from `source` (a safetensors header)."""
    hint = f"; {fix}" if fix else ""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise SchemaError(f"{source} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}){hint}") \
            from None
    except (json.JSONDecodeError, _Refused) as e:
        raise SchemaError(f"{source} is not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise SchemaError(f"{source} is nested too deeply to be such a file{hint}") from None


class _Refused(ValueError):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"the key {shown(key)} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name):
    raise _Refused(f"{name} is not a JSON number")


def contained(folder: str, name, source: str, what: str = "file", flat: bool = False) -> str:
    """The path of `name`, a file that `source` (a file inside `folder`) names, which must lie inside folder: a
    relative path without '..' steps out of it (flat: a file directly in folder). The check is on the name, not on
    where links lead (a hub cache's files are links into its blob store). One rule for every reader: shard indexes,
    manifests, DCP metadata."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise SchemaError(f"{source} names the {what} {shown(name)}: expected a file name inside {folder}")
    normal = os.path.normpath(name)
    outside = os.path.isabs(name) or normal in (".", "..") or normal.startswith(".." + os.sep)
    if outside or (flat and os.path.basename(name) != name):
        raise SchemaError(f"{source} names the {what} {shown(name)}, which is outside {folder}: a file it names must "
                          f"lie inside its folder (a crafted or damaged file)")
    return os.path.join(folder, normal)


def yaml_load(text: str, source: str):
    """yaml.safe_load of a recipe (or an override's value) with bounds: at most MAX_YAML_BYTES, and at most
    MAX_YAML_NODES nodes with every alias expanded, counted on the parsed node graph before any Python object is
    built. An alias bomb (a value of nested aliases, a billion items expanded) is refused in milliseconds; PyYAML
    itself has no such limit. YAML syntax errors propagate as yaml.YAMLError."""
    import yaml
    if len(text) > MAX_YAML_BYTES:
        raise SchemaError(f"{source} is {len(text)} characters, more than a recipe holds ({MAX_YAML_BYTES})")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            nodes = _expanded_nodes(node, {}, set())
        except RecursionError:
            raise SchemaError(f"{source} is nested too deeply to be a recipe") from None
        except _Refused as e:
            raise SchemaError(f"{source}: {e}") from None
        if nodes > MAX_YAML_NODES:
            raise SchemaError(f"{source} expands to more than {MAX_YAML_NODES} values through its aliases (&anchor "
                              f"/ *alias): an alias bomb, or not a recipe; write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_nodes(node, counted: dict, open_nodes: set) -> int:
    """Nodes of a YAML node graph as the document reads once aliases are expanded (each shared node counted once
    per use, its own count computed once). A node that contains itself is refused."""
    key = id(node)
    if key in counted:
        return counted[key]
    if key in open_nodes:
        raise _Refused("a YAML alias refers to a node that contains it: a recursive structure is not a recipe")
    open_nodes.add(key)
    total = 1
    items = node.value if isinstance(node.value, list) else ()  # a scalar's value is its text
    children = (child for item in items for child in (item if isinstance(item, tuple) else (item,)))  # (key, value)
    for child in children:
        total += _expanded_nodes(child, counted, open_nodes)
        if total > MAX_YAML_NODES:  # stop counting: the answer is already no
            break
    open_nodes.discard(key)
    counted[key] = total
    return total
