"""Protocol facts both services share: the version in every handshake, channel options, batch packing."""

from __future__ import annotations

from collections.abc import Iterator

from mmiosplit.v1 import device_pb2, vcpu_pb2

PROTOCOL_VERSION = 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.optimization_target", "latency"),
]


def iter_posted(batch: device_pb2.PostedWrites) -> Iterator[tuple[int, bytes]]:
    """Unpack a packed posted-write batch into (address, data) pairs; ValueError if it is inconsistent."""
    if len(batch.address) != len(batch.length):
        raise ValueError(f"posted batch has {len(batch.address)} addresses but {len(batch.length)} lengths")
    if sum(batch.length) != len(batch.data):
        raise ValueError(f"posted batch lengths add up to {sum(batch.length)} bytes but carry {len(batch.data)}")
    data = batch.data  # once: every access to a bytes field copies it
    offset = 0
    for address, length in zip(batch.address, batch.length, strict=True):
        yield address, data[offset:offset + length]
        offset += length


def event_kind_name(kind: int) -> str:
    """A wire ``VmEventKind`` as a word: ``VM_EVENT_KIND_POWERED_OFF`` -> ``powered_off``."""
    return str(vcpu_pb2.VmEventKind.Name(kind)).removeprefix("VM_EVENT_KIND_").lower()  # type: ignore[arg-type]


#: Wire event kinds after which a VM's run is over.
FINAL_EVENT_KINDS = frozenset({
    vcpu_pb2.VM_EVENT_KIND_HALTED,
    vcpu_pb2.VM_EVENT_KIND_POWERED_OFF,
    vcpu_pb2.VM_EVENT_KIND_ERROR,
    vcpu_pb2.VM_EVENT_KIND_BUDGET_EXHAUSTED,
    vcpu_pb2.VM_EVENT_KIND_TIMED_OUT,
    vcpu_pb2.VM_EVENT_KIND_STOPPED,
})
