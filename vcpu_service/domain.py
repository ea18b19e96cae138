"""The vcpu service's vocabulary in Python terms: policies, events, errors, statistics. No gRPC here.

The gRPC server (``vcpu_service.server``) converts these to and from ``mmiosplit.v1`` once, at the edge; the
core (VM, vCPU, exit path) and the in-process users (tests, the load tester's local VMs) only see these.
Enum members carry the wire's names without its prefix, so ``EventKind.POWERED_OFF`` is
``VM_EVENT_KIND_POWERED_OFF`` on the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EventKind(enum.Enum):
    """What happened to a VM (``VmEventKind``)."""

    RUNNING = "running"
    PAUSED = "paused"
    VCPU_STARTED = "vcpu_started"
    VCPU_STOPPED = "vcpu_stopped"
    RESET = "reset"
    #: A synchronous external abort was injected into the guest; the run goes on.
    EXTERNAL_ABORT = "external_abort"
    #: A device service is going away (draining) or its watch stream broke; the run goes on.
    DEVICE_SERVICE_LEFT = "device_service_left"
    #: A device service restarted and the VM goes on with its new instance (policy continue).
    DEVICE_SERVICE_RESTARTED = "device_service_restarted"
    # Final kinds: the run is over after one of these.
    HALTED = "halted"
    POWERED_OFF = "powered_off"
    ERROR = "error"
    BUDGET_EXHAUSTED = "budget_exhausted"
    TIMED_OUT = "timed_out"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        """Whether the run is over after an event of this kind."""
        return self in FINAL_KINDS


FINAL_KINDS = frozenset({EventKind.HALTED, EventKind.POWERED_OFF, EventKind.ERROR, EventKind.BUDGET_EXHAUSTED,
                         EventKind.TIMED_OUT, EventKind.STOPPED})


class ErrorKind(enum.Enum):
    """Why a run ended with an error, or why an abort was injected (``VmErrorKind``)."""

    UNSPECIFIED = "unspecified"
    NISV = "nisv"
    DEVICE_ERROR = "device_error"
    DEADLINE = "deadline"
    DEVICE_SERVICE = "device_service"
    UNMAPPED_ACCESS = "unmapped_access"
    GUEST_EXCEPTION = "guest_exception"
    INTERNAL = "internal"


class FaultPolicy(enum.Enum):
    """What a failed access does to the guest."""

    #: A precise synchronous external abort at the instruction (what hardware does).
    ABORT = "abort"
    #: The run ends with an error event.
    STOP = "stop"


class UnmappedPolicy(enum.Enum):
    """What an access to an address no device owns does."""

    RAZ_WI = "raz-wi"  # read as zero, write ignored (QEMU+KVM behaviour)
    ABORT = "abort"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Policies:
    """Per-VM policies, with the architecture doc's defaults: what real hardware (and QEMU for NISV) does."""

    unmapped_access: UnmappedPolicy = UnmappedPolicy.RAZ_WI
    device_error: FaultPolicy = FaultPolicy.ABORT
    deadline: FaultPolicy = FaultPolicy.ABORT
    nisv: FaultPolicy = FaultPolicy.ABORT
    #: A device service restarted: end the run (False, the default) or go on with the new instance (True).
    continue_on_device_restart: bool = False


@dataclass(frozen=True, slots=True)
class VmEvent:
    """One entry of a VM's event log."""

    seq: int
    kind: EventKind
    time: float  # seconds since the VM started
    reason: str = ""
    vcpu_id: int = 0
    error_kind: ErrorKind = ErrorKind.UNSPECIFIED
    pc: int = 0
    fault_address: int = 0
    syndrome: int = 0
    instruction: int = 0
    device: str = ""


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Exit latency percentiles in microseconds (and the HdrHistogram encoding when asked for)."""

    count: int = 0
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    p999_us: float = 0.0
    max_us: float = 0.0
    mean_us: float = 0.0
    hdr: str = ""


@dataclass(slots=True)
class KvmReportEntry:
    """A PC whose device accesses upstream KVM/ARM could not handle (no instruction syndrome)."""

    pc: int
    isa: str
    instruction: int
    reason: str
    handled: bool  # True when mmiosplit hand-decoded it, False when it was refused
    count: int = 0


@dataclass(frozen=True, slots=True)
class VcpuStats:
    """One vCPU's counters."""

    vcpu_id: int
    state: str
    exits: int = 0
    reads: int = 0
    writes: int = 0
    posted_writes: int = 0
    posted_batches: int = 0
    psci_calls: int = 0
    external_aborts: int = 0
    nops: int = 0
    hand_decoded: int = 0
    shadow_reads: int = 0
    exit_latency: LatencySummary | None = None


@dataclass(frozen=True, slots=True)
class VmStats:
    """A VM's counters, per vCPU and in all, and its KVM compatibility report."""

    vcpus: tuple[VcpuStats, ...]
    exits: int
    run_seconds: float
    exit_latency: LatencySummary | None = None
    kvm_report: tuple[KvmReportEntry, ...] = field(default_factory=tuple)
    #: Device interrupts: line raised -> GICC_IAR, and -> GICC_EOIR (None when counters only).
    irq_ack_latency: LatencySummary | None = None
    irq_eoi_latency: LatencySummary | None = None
    #: Some device service with lines does not share this clock: its latencies start on arrival here.
    irq_from_arrival: bool = False
