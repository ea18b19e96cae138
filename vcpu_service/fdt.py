"""Device trees built with libfdt (pylibfdt, the binding from the dtc project), never hand-written bytes.

A tree is described as plain ``Node`` objects (name, ordered properties, children) and written in
that order; machine profiles decide what goes in it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import libfdt

PropValue = bytes | str | int | list[int] | list[str] | None


def cells(*values: int) -> bytes:
    """Big-endian 32-bit cells, as a DT property value."""
    return struct.pack(f">{len(values)}I", *values)


def sized_cells(*pairs: tuple[int, int]) -> bytes:
    """Values of 2 cells each (64-bit address/size pairs as #address-cells = #size-cells = 2)."""
    out = bytearray()
    for base, size in pairs:
        out += struct.pack(">QQ", base, size)
    return bytes(out)


def strings(*values: str) -> bytes:
    """A string-list property: NUL-terminated strings back to back."""
    return b"".join(v.encode() + b"\0" for v in values)


@dataclass
class Node:
    name: str
    props: list[tuple[str, PropValue]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    def prop(self, name: str, value: PropValue) -> Node:
        self.props.append((name, value))
        return self

    def child(self, node: Node) -> Node:
        self.children.append(node)
        return node

    def find(self, path: str) -> Node | None:
        """The descendant at a path like ``cpus/cpu@0``."""
        node: Node | None = self
        for part in filter(None, path.split("/")):
            node = next((c for c in node.children if c.name == part), None) if node else None
        return node


def _encode(value: PropValue) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return strings(value)
    if isinstance(value, int):
        return cells(value)
    if all(isinstance(v, str) for v in value):
        return strings(*value)
    return cells(*value)


def build(root: Node, total_size: int = 0) -> bytes:
    """Serialise a tree; pad the blob to total_size (QEMU's virt makes a 1 MiB blob) when given."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()

    def emit(node: Node) -> None:
        with sw.add_node(node.name):
            for name, value in node.props:
                sw.property(name, _encode(value))
            for child in node.children:
                emit(child)

    emit(root)
    fdt = sw.as_fdt()
    if total_size:
        if fdt.totalsize() > total_size:
            raise ValueError(f"device tree of {fdt.totalsize()} bytes does not fit in {total_size}")
        fdt.resize(total_size)
    return bytes(fdt.as_bytearray())


def walk(dtb: bytes) -> Iterable[tuple[str, dict[str, bytes]]]:
    """Every node of a blob as (path, {property: raw value}), in order: for tests and comparisons."""
    fdt = libfdt.Fdt(dtb)
    offset = 0
    depth = 0
    while True:
        path = fdt.get_path(offset)
        props: dict[str, bytes] = {}
        poff = fdt.first_property_offset(offset, libfdt.QUIET_NOTFOUND)
        while poff >= 0:
            p = fdt.get_property_by_offset(poff)
            props[p.name] = bytes(p)
            poff = fdt.next_property_offset(poff, libfdt.QUIET_NOTFOUND)
        yield path, props
        offset, depth = fdt.next_node(offset, depth, libfdt.QUIET_NOTFOUND)
        if offset < 0 or depth <= 0:
            return
