"""The built-in device service with one bug planted on purpose: ``python -m tests.conformance.mutant_service MUTANT
serve-devices ARGS...`` patches it, then runs ``mmiosplit serve-devices ARGS...`` in this process.

Each mutant is a small, plausible bug a third-party device service could have; the conformance suite must fail
the check named for it (``MUTANTS``: mutant -> check). The patches touch the servicer and host from outside, so
the service stays otherwise the real one.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

#: Each mutant and the conformance check that must catch it.
MUTANTS: dict[str, str] = {
    "wrong_seq": "seq.echo",
    "repeat_twice": "seq.resume_no_reapply",
    "reorder_posted": "order.posted_before_read",
    "drop_interrupt": "irq.on_watch",
    "dma_outside": "dma.inside_window",
    "ignore_cancel": "deadline.cancel_before_start",
    "unscoped_control": "vm.scoping",
}


def wrong_seq() -> None:
    """A posted batch's response carries the next seq instead of its own (an off-by-one in the ack path)."""
    from device_service.server import DeviceServicer

    answer = DeviceServicer._answer

    async def _answer(self: DeviceServicer, exit_session: Any, req: Any, peer: str) -> Any:
        response = await answer(self, exit_session, req, peer)
        if req.WhichOneof("body") == "flush":
            response.seq = req.seq + 1
        return response

    DeviceServicer._answer = _answer  # type: ignore[method-assign]


def repeat_twice() -> None:
    """A repeat after a resume is applied again before being answered from memory (the session remembers the
    responses but the device sees the access twice)."""
    from device_service.server import DeviceServicer, _exit_from_pb

    exit_stream = DeviceServicer.ExitStream

    async def ExitStream(self: DeviceServicer, request_iterator: AsyncIterator[Any],
                         context: Any) -> AsyncIterator[Any]:
        async def reapplying() -> AsyncIterator[Any]:
            session_id = ""
            async for req in request_iterator:
                body = req.WhichOneof("body")
                if body == "hello":
                    session_id = req.hello.session_id
                elif body == "exit" and session_id:
                    session = self.sessions._sessions.get(session_id)
                    if session is not None and req.seq <= session.applied:
                        self.host.session().exit(_exit_from_pb(req.exit))
                yield req

        async for response in exit_stream(self, reapplying(), context):
            yield response

    DeviceServicer.ExitStream = ExitStream  # type: ignore[method-assign]


def reorder_posted() -> None:
    """Posted batches are applied last write first."""
    import device_service.server as server

    unpack = server._posted_from_pb

    def _posted_from_pb(batch: Any) -> list[tuple[int, bytes]]:
        return list(reversed(unpack(batch)))

    server._posted_from_pb = _posted_from_pb


def drop_interrupt() -> None:
    """A Watch carries the initial line levels but none of the changes made without an access."""
    from device_service.host import DeviceHost
    from mmiosplit.mmio import LineChange

    watch = DeviceHost.watch

    def _watch(self: DeviceHost, listener: Callable[[Any], None], dma: Any = None) -> Callable[[], None]:
        initial = [True]

        def filtered(event: Any) -> None:
            if isinstance(event, LineChange):
                if not initial[0]:
                    return
                initial[0] = False
            listener(event)

        return watch(self, filtered, dma)

    DeviceHost.watch = _watch  # type: ignore[method-assign]


def dma_outside() -> None:
    """DMA writes land 64 KiB past the address the device was given (a bad descriptor offset)."""
    from device_service.server import StreamDma

    dma_write = StreamDma.dma_write

    def _dma_write(self: StreamDma, device: str, address: int, data: bytes) -> None:
        dma_write(self, device, address + 0x10000, data)

    StreamDma.dma_write = _dma_write  # type: ignore[method-assign]


def ignore_cancel() -> None:
    """A Cancel is read but never consulted: a cancelled access is performed when its turn comes."""
    from device_service.host import HostSession

    exit_ = HostSession.exit

    def _exit(self: HostSession, exit: Any, posted: Any = None, cancelled: Any = None) -> Any:
        return exit_(self, exit, posted, None)

    HostSession.exit = _exit  # type: ignore[method-assign]


def unscoped_control() -> None:
    """Reset, Console and ReadMirror act for whichever VM asks, whoever else is attached."""
    from device_service.server import DeviceServicer

    async def _scoped(self: DeviceServicer, rpc: str, vm_id: str, context: Any) -> None:
        return None

    DeviceServicer._scoped = _scoped  # type: ignore[method-assign]


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in MUTANTS:
        print(f"usage: mutant_service {{{','.join(MUTANTS)}}} serve-devices ARGS...", file=sys.stderr)
        return 2
    globals()[argv[0]]()
    from mmiosplit_cli.cli import main as cli_main

    return cli_main(list(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
