"""The ``mmiosplit`` command line (the roof): it starts and wires the services; nothing below imports it.

``mmiosplit`` (the protocol basement: generated stubs, wire facts, addresses, plain types) is below both
services; ``vcpu_service`` and ``device_service`` are beside each other; this package is above them all.
The layers are import-linter contracts in ``pyproject.toml``.
"""
