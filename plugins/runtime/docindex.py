"""document_indexing CreateIndex requests, read the same way on every backend, so the same bad
index definition gets the same INVALID_ARGUMENT (naming the same field) whichever backend
serves it."""

from __future__ import annotations

from typing import Final

from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb

from plugins.runtime import docfilter
from plugins.runtime.errors import InvalidArgument

#: request enum → docfilter.IndexSpec kind (UNSPECIFIED is read as VALUE by `kind`)
KIND_NAMES: Final = {index_pb.INDEX_KIND_VALUE: "value", index_pb.INDEX_KIND_TEXT: "text"}
#: docfilter.IndexSpec kind → the enum a stored index reports
KIND_ENUMS: Final = {name: enum for enum, name in KIND_NAMES.items()}


def kind(index: index_pb.Index) -> str:
    """The index's kind ("value" or "text"); UNSPECIFIED means VALUE, any other number is
    INVALID_ARGUMENT on `index.kind`, the request field that holds it."""
    name = KIND_NAMES.get(index.kind or index_pb.INDEX_KIND_VALUE)
    if name is None:
        raise InvalidArgument("index.kind", f"unknown index kind {index.kind}")
    return name


def requested(request: index_pb.CreateIndexRequest) -> docfilter.IndexSpec:
    """The validated index definition of a CreateIndex request."""
    if not request.HasField("index"):
        raise InvalidArgument("index", "is required")
    index = request.index
    return docfilter.parse_index(
        index.name, [(f.path, f.descending) for f in index.fields], index.unique, kind(index)
    )
