"""Protocol facts both services share: the version in every handshake, channel options, event kinds."""

from __future__ import annotations

from mmiosplit.v1 import vcpu_pb2

PROTOCOL_VERSION = 1
#: The optional parts of the device protocol (StreamWelcome.features, DescribeResponse.features).
FEATURE_SESSIONS = "sessions"
FEATURE_CANCEL = "cancel"
FEATURE_WATCH = "watch"
FEATURE_SCOPED_CONTROL = "vm-scoped-control"
#: What the built-in device service implements: all of them.
DEVICE_FEATURES = (FEATURE_SESSIONS, FEATURE_CANCEL, FEATURE_WATCH, FEATURE_SCOPED_CONTROL)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.optimization_target", "latency"),
    # A broken exit stream is resumed within the exit deadline (5 s by default): the channel must try the
    # service again within milliseconds, not after gRPC's default first backoff of a second.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 500),
]


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
