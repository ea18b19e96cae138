"""``mmiosplit conformance``: a device service checked from outside, over gRPC only, as QEMU's qtest drives a
device with no CPU. It imports nothing of the project's own device or vcpu service (an import-linter contract
says so): what it knows of a service is what Describe and the wire tell any third party.

``command`` declares the subcommand and stays light (every ``mmiosplit`` command line parses it); ``runner`` runs
the checks of ``checks`` over the helpers of ``client``.
"""
