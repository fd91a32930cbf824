"""Write the FileDescriptorSet of Flower's Fleet API protos as the installed ``flwr`` defines them.

    python edge_client/native/proto/flower_descriptors.py OUT.desc OUT.list

The native device (``lorafleet-native join``) speaks Flower's Fleet API; its C++ message classes are generated
by ``protoc --descriptor_set_in=OUT.desc --cpp_out=…`` from the descriptors compiled into ``flwr``'s own
``*_pb2`` modules, so they are exactly the installed Flower's (1.42 here) and no ``.proto`` file is copied.
OUT.list gets the proto file names, dependencies first, one per line.
"""

from __future__ import annotations

import importlib
import sys

from google.protobuf import descriptor_pb2

ROOTS = ("fleet", "message", "heartbeat", "recorddict", "node", "error")


def closure() -> list[object]:
    files: dict[str, object] = {}

    def visit(fd: object) -> None:
        name = fd.name  # type: ignore[attr-defined]
        if name in files:
            return
        for dep in fd.dependencies:  # type: ignore[attr-defined]
            visit(dep)
        files[name] = fd

    for root in ROOTS:
        visit(importlib.import_module(f"flwr.proto.{root}_pb2").DESCRIPTOR)
    return list(files.values())


def main(out: str, listing: str) -> None:
    fds = descriptor_pb2.FileDescriptorSet()
    names = []
    for fd in closure():
        proto = fds.file.add()
        fd.CopyToProto(proto)  # type: ignore[attr-defined]
        names.append(proto.name)
    with open(out, "wb") as f:
        f.write(fds.SerializeToString())
    with open(listing, "w") as f:
        f.write("".join(n + "\n" for n in names))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
