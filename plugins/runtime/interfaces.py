"""The thin-interface catalog as the generated code knows it: interface id → gRPC service
descriptor, contract Protocol and proto file hash. Registry YAML is checked against this."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import re
from dataclasses import dataclass
from functools import cache
from pathlib import PurePosixPath
from typing import Any

import prism.interfaces
from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2
from prism.contracts import PROTOCOLS


@dataclass(frozen=True)
class InterfaceInfo:
    id: str
    service: _descriptor.ServiceDescriptor
    protocol: type[Any]
    proto_file: str
    proto_sha256: str

    @property
    def service_name(self) -> str:
        return self.service.full_name


def file_sha256(file: _descriptor.FileDescriptor) -> str:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


@cache
def catalog() -> dict[str, InterfaceInfo]:
    """Every interface with generated code, keyed by interface id (the proto file's stem)."""
    result: dict[str, InterfaceInfo] = {}
    for mod in pkgutil.walk_packages(prism.interfaces.__path__, "prism.interfaces."):
        if not mod.name.endswith("_pb2"):
            continue
        module = importlib.import_module(mod.name)
        file = module.DESCRIPTOR
        for service in file.services_by_name.values():
            interface_id = PurePosixPath(file.name).stem
            contract_module, protocol_name = PROTOCOLS[interface_id]
            protocol = getattr(
                importlib.import_module(f"prism.contracts.{contract_module}"), protocol_name
            )
            result[interface_id] = InterfaceInfo(
                id=interface_id,
                service=service,
                protocol=protocol,
                proto_file=file.name,
                proto_sha256=file_sha256(file),
            )
    return result


def method_name(rpc_name: str) -> str:
    """RPC name → contract method name (the rule scripts/gen_protos.py uses)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", rpc_name).lower()


def missing_methods(interface_id: str, impl: object) -> list[str]:
    """Contract methods `impl` lacks for `interface_id`; empty when it satisfies the contract."""
    info = catalog()[interface_id]
    return [
        method_name(m.name)
        for m in info.service.methods
        if not callable(getattr(impl, method_name(m.name), None))
    ]
