"""``mmiosplit loadtest``: exit latency and throughput of the split under a real guest, beside its floors.

Modules by job: ``guest`` writes the guest's machine code, ``stats`` is the arithmetic (pure),
``floors`` measures what the same placement costs without us, ``vms`` drives a VM over gRPC or in
this process, ``runner`` orchestrates a run, ``report`` renders it, ``compare`` sets two runs side by side.
"""
