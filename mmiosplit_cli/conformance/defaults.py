"""Numbers the command line and the suite share (a module of their own: the command imports the suite only
when it runs, so the suite cannot import the command)."""

from __future__ import annotations

from mmiosplit.wire import GRPC_OPTIONS

#: The project's gRPC receive limit: what limits.oversized_message exceeds by default.
DEFAULT_MAX_MESSAGE = int(str(dict(GRPC_OPTIONS)["grpc.max_receive_message_length"]))
#: A check's whole run may take this many times --timeout (it waits several times).
CHECK_BUDGET = 4
