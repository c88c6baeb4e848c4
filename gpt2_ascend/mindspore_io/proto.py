"""Protobuf message classes built at run time from a `.proto` file's text: no protoc, no generated module.

The schemas MindSpore's files use (checkpoint.proto, node_strategy.proto) ship inside this package as their
`.proto` text, which stays the one description of each format. This reads the proto2 subset they are written
in -- `syntax`, `package`, messages (nested too), `oneof`, and fields `[label] type name = number;` of scalar or
message types -- into a descriptor in a private pool. Anything outside that subset is refused by name, so a
schema this reader cannot represent fails here instead of decoding wrongly.

    messages = proto_messages("node_strategy.proto")
    strategy = messages["ParallelStrategyMap"]()
"""
from __future__ import annotations

import functools
import os
import re

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
SCALAR_TYPES = {
    "double": F.TYPE_DOUBLE, "float": F.TYPE_FLOAT, "int32": F.TYPE_INT32, "int64": F.TYPE_INT64,
    "uint32": F.TYPE_UINT32, "uint64": F.TYPE_UINT64, "sint32": F.TYPE_SINT32, "sint64": F.TYPE_SINT64,
    "fixed32": F.TYPE_FIXED32, "fixed64": F.TYPE_FIXED64, "sfixed32": F.TYPE_SFIXED32,
    "sfixed64": F.TYPE_SFIXED64, "bool": F.TYPE_BOOL, "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES,
}
LABELS = {"required": F.LABEL_REQUIRED, "optional": F.LABEL_OPTIONAL, "repeated": F.LABEL_REPEATED}
TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|("[^"]*"|[A-Za-z_][\w.]*|\d+|[{}=;])', re.S)


def tokenize(text: str, name: str) -> list[str]:
    tokens, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"{name}: cannot read the .proto text at character {position} ({text[position:][:20]!r})")
        if match.group(1):
            tokens.append(match.group(1))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over the tokens into a FileDescriptorProto (message type names resolved afterwards)."""

    def __init__(self, tokens, name):
        self.tokens, self.at, self.name = tokens, 0, name
        self.file = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto2")
        self.references = []  # (field, scope) whose type_name is a message to resolve

    def next(self, expected=None):
        if self.at >= len(self.tokens):
            raise ValueError(f"{self.name}: the .proto text ends early (expected {expected or 'more'})")
        token = self.tokens[self.at]
        self.at += 1
        if expected is not None and token != expected:
            raise ValueError(f"{self.name}: expected {expected!r}, found {token!r} (token {self.at})")
        return token

    def parse(self):
        while self.at < len(self.tokens):
            keyword = self.next()
            if keyword == "syntax":
                self.next("=")
                if self.next() != '"proto2"':
                    raise ValueError(f"{self.name}: only proto2 schemas are read here")
                self.next(";")
            elif keyword == "package":
                self.file.package = self.next()
                self.next(";")
            elif keyword == "message":
                self.message(self.file.message_type.add(), "." + self.file.package if self.file.package else "")
            else:
                raise ValueError(f"{self.name}: {keyword!r} at the top level is not supported by this reader")
        return self.file

    def message(self, message, scope):
        message.name = self.next()
        scope = f"{scope}.{message.name}"
        self.next("{")
        while (token := self.next()) != "}":
            if token == "message":
                self.message(message.nested_type.add(), scope)
            elif token == "oneof":
                message.oneof_decl.add(name=self.next())
                self.next("{")
                while (type_name := self.next()) != "}":
                    self.field(message, scope, F.LABEL_OPTIONAL, type_name, len(message.oneof_decl) - 1)
            elif token in LABELS:
                self.field(message, scope, LABELS[token], self.next())
            else:
                raise ValueError(f"{self.name}: field {token!r} in message {message.name} has no label "
                                 f"(required/optional/repeated), or uses a construct this reader does not support")

    def field(self, message, scope, label, type_name, oneof=None):
        field = message.field.add(name=self.next(), label=label)
        self.next("=")
        field.number = int(self.next())
        self.next(";")
        if oneof is not None:
            field.oneof_index = oneof
        if type_name in SCALAR_TYPES:
            field.type = SCALAR_TYPES[type_name]
        else:
            field.type, field.type_name = F.TYPE_MESSAGE, type_name
            self.references.append((field, scope))


def _resolve(references, declared, name):
    """protobuf's scoping: a type name is looked up from the innermost enclosing scope outwards."""
    for field, scope in references:
        found = field.type_name if field.type_name in declared else None
        while found is None and not field.type_name.startswith("."):
            if f"{scope}.{field.type_name}" in declared:
                found = f"{scope}.{field.type_name}"
            elif not scope:
                break
            scope = scope.rsplit(".", 1)[0]
        if found is None:
            raise ValueError(f"{name}: field {field.name!r} names an unknown message type {field.type_name!r}")
        field.type_name = found


def _declared(messages, scope):
    for message in messages:
        full = f"{scope}.{message.name}"
        yield full
        yield from _declared(message.nested_type, full)


@functools.lru_cache(maxsize=None)
def proto_messages(proto_file: str) -> dict:
    """{message name (nested ones as Outer.Inner, without the package): message class} of a .proto beside this
    module, each call the same classes."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), proto_file)
    with open(path, encoding="utf-8") as f:
        parser = _Parser(tokenize(f.read(), proto_file), proto_file)
    file = parser.parse()
    package = "." + file.package if file.package else ""
    declared = set(_declared(file.message_type, package))
    _resolve(parser.references, declared, proto_file)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {full[len(package) + 1:]: message_factory.GetMessageClass(pool.FindMessageTypeByName(full[1:]))
            for full in sorted(declared)}
