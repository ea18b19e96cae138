"""``mmiosplit conformance``: a device service checked from outside, over gRPC only, as QEMU's qtest drives a
device with no CPU. It imports nothing of the project's own device or vcpu service (an import-linter contract
says so): what it knows of a service is what Describe and the wire tell any third party."""

from mmiosplit_cli.conformance.checks import CHECKS
from mmiosplit_cli.conformance.runner import Result, Unusable, run_suite

__all__ = ["CHECKS", "Result", "Unusable", "run_suite"]
