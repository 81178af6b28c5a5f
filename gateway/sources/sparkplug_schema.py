"""The Sparkplug B payload schema (Eclipse Tahu's ``sparkplug_b.proto``) for the protobuf runtime.

The schema is built here, at import time, as a ``FileDescriptorProto`` from the field tables
below, and loaded into a descriptor pool of our own: no ``protoc`` or ``grpcio-tools`` step and
no generated module to keep in step with the runtime's version, and no clash with another copy
of ``sparkplug_b.proto`` that a library may register in protobuf's default pool. The tables
transcribe the Sparkplug 3.0 specification's payload definition (proto2, package
``org.eclipse.tahu.protobuf``, message ``Payload`` and its nested messages, enum ``DataType``);
``tests/test_sparkplug.py`` compares the result with the descriptor an independent Sparkplug
library ships, field by field.

Only :data:`Payload` and :class:`DataType` are meant for use elsewhere; the message classes are
dynamic, hence typed ``Any``.
"""

from __future__ import annotations

import enum
from typing import Any

from google.protobuf import (  # type: ignore[import-untyped, unused-ignore]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)

PACKAGE = "org.eclipse.tahu.protobuf"
FILE_NAME = "digispine/sparkplug_b.proto"
"""Our file's name in our own pool (the name matters only inside that pool)."""


class DataType(enum.IntEnum):
    """Sparkplug B data type codes (``Metric.datatype``, DataSet column types, ...)."""

    Unknown = 0
    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE, "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_MAX = 536_870_912
"""The end (exclusive) of an ``extensions N to max`` range."""

# One field: (name, number, type, "repeated" / "value" (in the `value` oneof) / ""). A type
# that is not a scalar names a message, relative to `Payload` ("Metric", "DataSet.Row", ...).
_Field = tuple[str, int, str, str]
# One message: (name, fields, nested messages, first extension number or None).
_Message = tuple[str, list[_Field], list[Any], int | None]


def _extension(name: str) -> _Message:
    """The empty ``...ValueExtension`` message of a ``value`` oneof (``extensions 1 to max``)."""
    return (name, [], [], 1)


_SCALARS_3: list[_Field] = [
    ("int_value", 3, "uint32", "value"), ("long_value", 4, "uint64", "value"),
    ("float_value", 5, "float", "value"), ("double_value", 6, "double", "value"),
    ("boolean_value", 7, "bool", "value"), ("string_value", 8, "string", "value"),
]

_PAYLOAD: _Message = ("Payload", [
    ("timestamp", 1, "uint64", ""),
    ("metrics", 2, "Metric", "repeated"),
    ("seq", 3, "uint64", ""),
    ("uuid", 4, "string", ""),
    ("body", 5, "bytes", ""),
], [
    ("Template", [
        ("version", 1, "string", ""),
        ("metrics", 2, "Metric", "repeated"),
        ("parameters", 3, "Template.Parameter", "repeated"),
        ("template_ref", 4, "string", ""),
        ("is_definition", 5, "bool", ""),
    ], [
        ("Parameter", [
            ("name", 1, "string", ""),
            ("type", 2, "uint32", ""),
            *_SCALARS_3,
            ("extension_value", 9, "Template.Parameter.ParameterValueExtension", "value"),
        ], [_extension("ParameterValueExtension")], None),
    ], 6),
    ("DataSet", [
        ("num_of_columns", 1, "uint64", ""),
        ("columns", 2, "string", "repeated"),
        ("types", 3, "uint32", "repeated"),
        ("rows", 4, "DataSet.Row", "repeated"),
    ], [
        ("DataSetValue", [
            ("int_value", 1, "uint32", "value"), ("long_value", 2, "uint64", "value"),
            ("float_value", 3, "float", "value"), ("double_value", 4, "double", "value"),
            ("boolean_value", 5, "bool", "value"), ("string_value", 6, "string", "value"),
            ("extension_value", 7, "DataSet.DataSetValue.DataSetValueExtension", "value"),
        ], [_extension("DataSetValueExtension")], None),
        ("Row", [("elements", 1, "DataSet.DataSetValue", "repeated")], [], 2),
    ], 5),
    ("PropertyValue", [
        ("type", 1, "uint32", ""),
        ("is_null", 2, "bool", ""),
        *_SCALARS_3,
        ("propertyset_value", 9, "PropertySet", "value"),
        ("propertysets_value", 10, "PropertySetList", "value"),
        ("extension_value", 11, "PropertyValue.PropertyValueExtension", "value"),
    ], [_extension("PropertyValueExtension")], None),
    ("PropertySet", [
        ("keys", 1, "string", "repeated"),
        ("values", 2, "PropertyValue", "repeated"),
    ], [], 3),
    ("PropertySetList", [("propertyset", 1, "PropertySet", "repeated")], [], 2),
    ("MetaData", [
        ("is_multi_part", 1, "bool", ""),
        ("content_type", 2, "string", ""),
        ("size", 3, "uint64", ""),
        ("seq", 4, "uint64", ""),
        ("file_name", 5, "string", ""),
        ("file_type", 6, "string", ""),
        ("md5", 7, "string", ""),
        ("description", 8, "string", ""),
    ], [], 9),
    ("Metric", [
        ("name", 1, "string", ""),
        ("alias", 2, "uint64", ""),
        ("timestamp", 3, "uint64", ""),
        ("datatype", 4, "uint32", ""),
        ("is_historical", 5, "bool", ""),
        ("is_transient", 6, "bool", ""),
        ("is_null", 7, "bool", ""),
        ("metadata", 8, "MetaData", ""),
        ("properties", 9, "PropertySet", ""),
        ("int_value", 10, "uint32", "value"), ("long_value", 11, "uint64", "value"),
        ("float_value", 12, "float", "value"), ("double_value", 13, "double", "value"),
        ("boolean_value", 14, "bool", "value"), ("string_value", 15, "string", "value"),
        ("bytes_value", 16, "bytes", "value"),
        ("dataset_value", 17, "DataSet", "value"),
        ("template_value", 18, "Template", "value"),
        ("extension_value", 19, "Metric.MetricValueExtension", "value"),
    ], [_extension("MetricValueExtension")], None),
], 6)


def _message(spec: _Message) -> descriptor_pb2.DescriptorProto:
    name, fields, nested, extensions_from = spec
    out = descriptor_pb2.DescriptorProto(name=name)
    if any(kind == "value" for _, _, _, kind in fields):
        out.oneof_decl.add(name="value")
    for field_name, number, type_, kind in fields:
        f = out.field.add(name=field_name, number=number)
        f.label = _F.LABEL_REPEATED if kind == "repeated" else _F.LABEL_OPTIONAL
        if type_ in _TYPES:
            f.type = _TYPES[type_]
        else:
            f.type = _F.TYPE_MESSAGE
            f.type_name = f".{PACKAGE}.Payload.{type_}"
        if kind == "value":
            f.oneof_index = 0
    for sub in nested:
        out.nested_type.append(_message(sub))
    if extensions_from is not None:
        out.extension_range.add(start=extensions_from, end=_MAX)
    return out


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``sparkplug_b.proto`` as a ``FileDescriptorProto`` (what ``protoc`` would make of it)."""
    fd = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto2")
    fd.message_type.append(_message(_PAYLOAD))
    enum_type = fd.enum_type.add(name="DataType")
    for member in DataType:
        enum_type.value.add(name=member.name, number=member.value)
    fd.options.java_package = PACKAGE
    fd.options.java_outer_classname = "SparkplugBProto"
    return fd


_pool = descriptor_pool.DescriptorPool()
_pool.Add(file_descriptor())

Payload: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))
"""The ``Payload`` message class: ``Payload.FromString(data)``, ``Payload().SerializeToString()``."""
