"""Whole connections in process: a client built from protocol/client.py talks to
`Server.handle` over trio's memory streams, with test children whose operations
the test holds, fails or slows down. No subprocess; a socket only where the NBD
child needs one (a unix socket to a second in-process server)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdverify import transmission as transmission_module
from nbdverify.children import (
    COMPLETED,
    ChildError,
    Completed,
    Extent,
    Failed,
    FileChild,
    Pending,
    Progress,
)
from nbdverify.device import VerifiedDevice
from nbdverify.findings import Divergence, Finding, Mismatch
from nbdverify.nbd_child import NbdChild
from nbdverify.policy import MismatchPolicy, OnMismatch
from nbdverify.server import ExportConfig, Server
from nbdverify.transmission import MAX_IN_FLIGHT, REPLY_BATCH_BYTES
from nbdverify_protocol.client import (
    ClientNegotiation,
    ExportOpened,
    NegotiationRefused,
    ReplyDone,
    ReplyExtents,
    ReplyReader,
)
from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    AllocationState,
    Command,
    CommandFlag,
    Errno,
)
from nbdverify_protocol.errors import RemoteProtocolError
from nbdverify_protocol.events import NEED_DATA
from nbdverify_protocol.transmission import build_request

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
TIMEOUT = 5.0  # every test; each takes well under a second
READ_HEADER = 28  # structured OFFSET_DATA chunk header + offset
R, W, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.TRIM, Command.CACHE,
    Command.WRITE_ZEROES, Command.BLOCK_STATUS)


# --- Test children --------------------------------------------------------------------


class Gate:
    """A child operation that has started and finishes when the test releases it
    (optionally failing), like an NBD child's request whose reply is late."""

    reported = False  # awaited, like an NBD child's request with a --child-timeout

    def __init__(self, error: ChildError | None = None) -> None:
        self._released = trio.Event()
        self.error = error

    def release(self) -> None:
        self._released.set()

    @property
    def done(self) -> bool:
        return self._released.is_set()

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done:  # done means: returns without yielding (Event.wait always yields)
            yield from self._released.wait().__await__()
        if self.error is not None:
            raise self.error


class Timer:
    """A child operation that finishes `delay` seconds after it started (a slow child)."""

    reported = False

    def __init__(self, delay: float) -> None:
        self._deadline = trio.current_time() + delay

    @property
    def done(self) -> bool:
        return trio.current_time() >= self._deadline

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done:
            yield from trio.sleep_until(self._deadline).__await__()


class MemoryChild:
    """A child in memory. Reads copy at once; whether they then finish at once, when
    a gate is released, after a delay, or with an error is the test's to say."""

    def __init__(self, name: str, content: bytes) -> None:
        self.name = name
        self.location = f"memory:{name}"
        self.size = len(content)
        self.data = bytearray(content)
        self.reads: list[tuple[int, int]] = []
        self.held: dict[int, Gate] = {}  # read offset -> its gate
        self.hold_all: Gate | None = None
        self.failing: dict[int, Gate | None] = {}  # read offset -> fails (when released)
        self.delay: float | None = None
        self.flush_gate: Gate | None = None
        self.flushes = 0
        self.progress = Progress()  # its operations are awaited, never reported

    def hold_requests(self) -> None:
        pass

    def send_requests(self) -> None:
        pass

    def _error(self, operation: str, offset: int, length: int) -> ChildError:
        return ChildError(self.name, operation, offset, length, Errno.EIO, "injected failure")

    def read(self, buffer: memoryview, offset: int) -> Pending[None]:
        self.reads.append((offset, len(buffer)))
        if offset in self.failing:
            gate = self.failing[offset]
            error = self._error("read", offset, len(buffer))
            if gate is None:
                return Failed(error)
            gate.error = error
            return gate
        buffer[:] = self.data[offset:offset + len(buffer)]
        if offset in self.held:
            return self.held[offset]
        if self.hold_all is not None:
            return self.hold_all
        if self.delay is not None:
            return Timer(self.delay)
        return COMPLETED

    def write(self, data: bytes | bytearray | memoryview, offset: int,
              fua: bool) -> Pending[None]:
        self.data[offset:offset + len(data)] = data
        return COMPLETED

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                     fua: bool) -> Pending[None]:
        self.data[offset:offset + length] = bytes(length)
        return COMPLETED

    def trim(self, offset: int, length: int, fua: bool) -> Pending[None]:
        return COMPLETED

    def flush(self) -> Pending[None]:
        self.flushes += 1
        return self.flush_gate or COMPLETED

    def cache(self, offset: int, length: int) -> Pending[None]:
        return COMPLETED

    def extents(self, offset: int, length: int) -> Pending[list[Extent]]:
        return Completed([Extent(length, AllocationState.DATA)])

    async def aclose(self) -> None:
        pass


CONTENT = bytes(range(256)) * (SIZE // 256)


def memory_device(policy: OnMismatch = OnMismatch.ERROR, test_content: bytes = CONTENT
                  ) -> tuple[VerifiedDevice, MemoryChild, MemoryChild, list[Finding]]:
    raw, test = MemoryChild("raw", CONTENT), MemoryChild("test", test_content)
    found: list[Finding] = []
    device = VerifiedDevice(raw, test, policy=MismatchPolicy(policy), on_finding=found.append)
    return device, raw, test, found


# --- The client -------------------------------------------------------------------------


class Client:
    """A pipelining NBD client from the protocol package's machines: queue requests,
    send them in one go, take replies as they come."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self._outgoing = bytearray()
        self.reader = ReplyReader(True)
        self.data: dict[int, bytearray] = {}  # READ cookie -> its data
        self.extents: dict[int, list[tuple[int, int]]] = {}

    async def negotiate(self) -> ExportOpened:
        # Compact (structured) framing; extended headers: tests/test_extended_headers.py.
        machine = ClientNegotiation(meta_contexts=[BASE_ALLOCATION], extended_headers=False)
        while True:
            event = machine.next_event()
            await self.stream.send_all(machine.data_to_send())
            if event is not NEED_DATA:
                break
            data = await self.stream.receive_some()
            if not data:
                raise RemoteProtocolError("server closed the connection")
            machine.receive_data(data)
        assert isinstance(event, ExportOpened)
        self.reader = ReplyReader(event.structured_replies, machine.trailing_data)
        return event

    def request(self, command: int, cookie: int, offset: int = 0, length: int = 0,
                flags: int = 0, payload: bytes = b"") -> None:
        self._outgoing += build_request(command, offset, length, cookie, flags) + payload
        if command == R:
            self.data[cookie] = bytearray(length)
            self.reader.expect(cookie, offset, length, memoryview(self.data[cookie]))
        elif command != DISC:
            self.reader.expect(cookie, offset, length)

    async def send(self) -> None:
        data, self._outgoing = bytes(self._outgoing), bytearray()
        await self.stream.send_all(data)

    async def reply(self) -> ReplyDone:
        while True:
            event = self.reader.next_event()
            if isinstance(event, ReplyDone):
                return event
            if isinstance(event, ReplyExtents):
                self.extents.setdefault(event.cookie, []).extend(event.extents)
                continue
            self.reader.receive_data(await self.stream.receive_some())

    async def replies(self, count: int) -> list[ReplyDone]:
        return [await self.reply() for _ in range(count)]

    async def no_reply_yet(self) -> bool:
        """True if no reply is on its way once every task is waiting."""
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.02):
            await self.reply()
            return False
        return True

    async def closed(self) -> None:
        """The server closed the connection, with no reply left."""
        with pytest.raises(RemoteProtocolError, match=r"server closed the connection$"):
            await self.reply()


class Recording(trio.abc.Stream):
    """The server's side of a stream, recording the size of every send (one send is
    one batch of replies)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def serving(device: VerifiedDevice) -> AsyncIterator[tuple[Server, trio.Nursery]]:
    server = Server(device, ExportConfig())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            yield server, nursery
            nursery.cancel_scope.cancel()


async def connect(server: Server, nursery: trio.Nursery,
                  lockstep: bool = False) -> tuple[Client, Recording]:
    """A negotiated client; `lockstep`: the server's sends wait until the client reads."""
    if lockstep:
        to_server, from_client = trio.testing.memory_stream_one_way_pair()
        to_client, from_server = trio.testing.lockstep_stream_one_way_pair()
        client_side: trio.abc.HalfCloseableStream = trio.StapledStream(to_server, from_server)
        server_side: trio.abc.Stream = trio.StapledStream(to_client, from_client)
    else:
        client_side, server_side = trio.testing.memory_stream_pair()
    recording = Recording(server_side)
    nursery.start_soon(server.handle, recording)
    client = Client(client_side)
    opened = await client.negotiate()
    assert opened.structured_replies and opened.meta_contexts == {BASE_ALLOCATION: 1}
    recording.sends.clear()  # from here on, only replies
    return client, recording


# --- Every command, end to end ----------------------------------------------------------


async def test_every_command_reaches_both_children() -> None:
    device, raw, test, found = memory_device()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(W, 1, 8192, 5, payload=b"hello")
        client.request(R, 2, 8190, 10)
        client.request(WZ, 3, 8192, 2)
        client.request(R, 4, 8192, 3)
        client.request(FLUSH, 5)
        client.request(TRIM, 6, 0, 512)
        client.request(CACHE, 7, 0, 512)
        client.request(BS, 8, 0, 4096)
        client.request(R, 9, 0, 0)
        await client.send()
        assert await client.replies(9) == [ReplyDone(cookie) for cookie in range(1, 10)]
    assert client.data[2] == CONTENT[8190:8192] + b"hello" + CONTENT[8197:8200]
    assert client.data[4] == b"\0\0l"
    assert raw.data == test.data
    assert raw.flushes == test.flushes == 1
    assert client.extents[8] == [(4096, 0)]
    assert found == []


async def test_file_children(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    for name in ("raw.img", "test.img"):
        (tmp_path / name).write_bytes(content)
    raw = FileChild("raw", str(tmp_path / "raw.img"))
    test = FileChild("test", str(tmp_path / "test.img"))
    device = VerifiedDevice(raw, test, policy=MismatchPolicy(OnMismatch.ERROR))
    try:
        async with serving(device) as (server, nursery):
            client, _ = await connect(server, nursery)
            client.request(W, 1, MiB, 4 * KiB, CommandFlag.FUA, payload=b"\x77" * 4 * KiB)
            client.request(R, 2, MiB - 1, 2)
            client.request(WZ, 3, 2 * MiB, 64 * KiB)
            client.request(FLUSH, 4)
            client.request(R, 5, 2 * MiB, 8)
            await client.send()
            replies = await client.replies(5)
            assert sorted(replies, key=lambda done: done.cookie) == [
                ReplyDone(cookie) for cookie in range(1, 6)]
    finally:
        raw.close()
        test.close()
    assert client.data[2] == content[MiB - 1:MiB] + b"\x77"
    assert client.data[5] == bytes(8)
    assert (tmp_path / "raw.img").read_bytes() == (tmp_path / "test.img").read_bytes()


# --- Pipelining and the order replies leave in ----------------------------------------


async def test_a_held_read_does_not_hold_up_ready_replies() -> None:
    device, _, test, _ = memory_device()
    test.held[0] = first = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        for cookie in range(1, 5):
            client.request(R, cookie, (cookie - 1) * 4096, 4096)
        await client.send()
        assert [done.cookie for done in await client.replies(3)] == [2, 3, 4]
        assert await client.no_reply_yet()
        first.release()
        assert await client.reply() == ReplyDone(1)
    assert client.data[1] == CONTENT[:4096]


async def test_requests_that_wait_finish_in_the_order_they_came() -> None:
    """Reads that are not ready finish in one in-order completer: releasing a later
    one first gives nothing until the earlier one is released too."""
    device, _, test, _ = memory_device()
    test.held[0], test.held[4096] = first, second = Gate(), Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 4096)
        client.request(R, 2, 4096, 4096)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()  # both started, neither ready
        second.release()
        assert await client.no_reply_yet()
        first.release()
        assert [done.cookie for done in await client.replies(2)] == [1, 2]


async def test_a_flush_that_waits_does_not_queue_behind_a_held_read() -> None:
    """What may take long (flush, FUA) finishes in a task of its own."""
    device, raw, test, _ = memory_device()
    test.held[0] = read_gate = Gate()
    raw.flush_gate = test.flush_gate = flush_gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 4096)
        client.request(FLUSH, 2)
        await client.send()
        assert await client.no_reply_yet()
        flush_gate.release()
        assert await client.reply() == ReplyDone(2)
        read_gate.release()
        assert await client.reply() == ReplyDone(1)


async def test_slow_child_requests_overlap() -> None:
    delay, count = 0.2, 8
    device, _, test, _ = memory_device()
    test.delay = delay
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        started = trio.current_time()
        for cookie in range(count):
            client.request(R, cookie, cookie * 4096, 4096)
        await client.send()
        assert [done.cookie for done in await client.replies(count)] == list(range(count))
        elapsed = trio.current_time() - started
    assert delay <= elapsed < count * delay / 2  # in flight together, not one by one
    assert client.data[count - 1] == CONTENT[(count - 1) * 4096:count * 4096]


# --- Batching ------------------------------------------------------------------------------


async def test_many_replies_leave_in_one_send() -> None:
    device, _, _, _ = memory_device()
    count = 50
    assert count * (READ_HEADER + 4096) < REPLY_BATCH_BYTES
    async with serving(device) as (server, nursery):
        client, recording = await connect(server, nursery)
        for cookie in range(count):
            client.request(R, cookie, 0, 4096)
        await client.send()
        await client.replies(count)
    assert recording.sends == [count * (READ_HEADER + 4096)]


@pytest.mark.parametrize(("lengths", "sends"), [
    # A reply that fills a batch leaves at once...
    ([MiB, 4096, 4096], [[MiB], [4096, 4096]]),
    # ...with the replies queued before it; those after it go in the next batch.
    ([4096, MiB, 4096], [[4096, MiB], [4096]]),
])
async def test_a_big_read_reply_leaves_at_once(lengths: list[int], sends: list[list[int]]
                                               ) -> None:
    device, _, _, _ = memory_device()
    async with serving(device) as (server, nursery):
        client, recording = await connect(server, nursery)
        for cookie, length in enumerate(lengths):
            client.request(R, cookie, 0, length)
        await client.send()
        await client.replies(len(lengths))
    assert recording.sends == [sum(READ_HEADER + n for n in batch) for batch in sends]


# --- DISC -----------------------------------------------------------------------------------


async def disc_waits_for_the_held_reply(client: Client, gate: Gate) -> None:
    """Requests 1 (held by `gate`) and 2, then DISC, are queued: send them; 2's reply
    comes, 1's only once the gate opens, and then the server closes."""
    await client.send()
    assert await client.reply() == ReplyDone(2)
    assert await client.no_reply_yet()
    gate.release()
    assert await client.reply() == ReplyDone(1)
    await client.closed()


async def test_disc_with_requests_in_flight() -> None:
    device, _, test, _ = memory_device()
    test.held[0] = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 4096)
        client.request(W, 2, 4096, 3, payload=b"abc")
        client.request(DISC, 3)
        client.request(R, 4, 8192, 4096)  # after DISC: never read
        await disc_waits_for_the_held_reply(client, gate)
    assert test.reads == [(0, 4096)]
    assert test.data[4096:4099] == b"abc"


# --- Bounded resources --------------------------------------------------------------------


async def test_a_client_that_never_reads_replies_stops_the_server_reading() -> None:
    device, _, test, _ = memory_device()
    count = 1000
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery, lockstep=True)
        for cookie in range(count):
            client.request(R, cookie, 0, 4096)
        await client.send()  # buffered in full: the client side never waits
        await trio.testing.wait_all_tasks_blocked()
        served = len(test.reads)
        # Replies wait for the client in the output's sender; each holds its in-flight
        # slot until sent, so reading stops once MAX_IN_FLIGHT requests are served.
        assert 0 < served <= MAX_IN_FLIGHT
        await trio.sleep(0.05)
        assert len(test.reads) == served
        replies = await client.replies(count)
    assert [done.cookie for done in replies] == list(range(count))


async def test_requests_in_flight_are_bounded() -> None:
    device, _, test, _ = memory_device()
    test.hold_all = gate = Gate()
    count = MAX_IN_FLIGHT + 36
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        for cookie in range(count):
            client.request(R, cookie, 0, 512)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert len(test.reads) == MAX_IN_FLIGHT
        gate.release()
        assert [done.cookie for done in await client.replies(count)] == list(range(count))


async def test_memory_held_by_requests_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transmission_module, "MEMORY_BUDGET", 4 * MiB)
    device, _, test, _ = memory_device()
    test.hold_all = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        for cookie in range(5):
            client.request(R, cookie, 0, MiB)  # a READ holds two buffers: 2 MiB
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert len(test.reads) == 2
        gate.release()
        assert [done.cookie for done in await client.replies(5)] == list(range(5))


# --- Failing children ---------------------------------------------------------------------


@pytest.mark.parametrize("later", [False, True], ids=["at-once", "mid-request"])
async def test_both_children_failing_is_an_error_reply_and_the_connection_goes_on(
        later: bool) -> None:
    device, raw, test, found = memory_device(OnMismatch.DISCONNECT)
    gate = Gate() if later else None
    raw.failing[4096] = test.failing[4096] = gate
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 512)
        client.request(R, 2, 0, 512)
        await client.send()
        if gate is not None:
            assert await client.reply() == ReplyDone(2)
            gate.release()
            failed = await client.reply()
        else:
            failed, ok = await client.replies(2)
            assert ok == ReplyDone(2)
        assert (failed.cookie, failed.error) == (1, Errno.EIO)
        assert "failed on both children" in failed.message
        client.request(R, 3, 0, 512)
        await client.send()
        assert await client.reply() == ReplyDone(3)
    assert found == []  # the children agree: no finding


async def test_one_child_failing_is_a_finding() -> None:
    device, _, test, found = memory_device(OnMismatch.ERROR)
    test.failing[4096] = None  # fails at once; RAW reads fine
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 512)
        client.request(R, 2, 0, 512)
        await client.send()
        replies = {done.cookie: done for done in await client.replies(2)}
        assert replies[1].error == Errno.EIO and replies[2] == ReplyDone(2)
    assert len(found) == 1 and isinstance(found[0], Divergence)


# --- Mismatches under each policy ---------------------------------------------------------

BAD = 5000  # the one byte where TEST differs
BAD_CONTENT = CONTENT[:BAD] + bytes([CONTENT[BAD] ^ 0xFF]) + CONTENT[BAD + 1:]


async def test_mismatch_disconnect_policy() -> None:
    device, _, test, found = memory_device(OnMismatch.DISCONNECT, BAD_CONTENT)
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 4096)
        client.request(R, 2, 0, 512)  # already sent, but nothing more is read
        await client.send()
        failed = await client.reply()
        assert (failed.cookie, failed.error) == (1, Errno.EIO)
        await client.closed()
        assert test.reads == [(4096, 4096)]
        with pytest.raises(NegotiationRefused, match="export stopped"):
            await connect(server, nursery)
    assert len(found) == 1 and isinstance(found[0], Mismatch)


async def test_mismatch_error_policy() -> None:
    device, _, _, found = memory_device(OnMismatch.ERROR, BAD_CONTENT)
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 4096)
        client.request(R, 2, 0, 512)
        await client.send()
        failed, ok = await client.replies(2)
        assert (failed.cookie, failed.error) == (1, Errno.EIO)
        assert ok == ReplyDone(2)
        second, _ = await connect(server, nursery)  # new connections are still served
        second.request(R, 1, 0, 512)
        await second.send()
        assert await second.reply() == ReplyDone(1)
    assert len(found) == 1


async def test_mismatch_log_policy_serves_the_reference() -> None:
    device, _, _, found = memory_device(OnMismatch.LOG, BAD_CONTENT)
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 4096)
        client.request(R, 2, 4096, 4096)
        await client.send()
        assert await client.replies(2) == [ReplyDone(1), ReplyDone(2)]
    assert client.data[1] == CONTENT[4096:8192]
    assert len(found) == 2


async def test_mismatch_found_while_the_server_waits_for_the_client() -> None:
    """A held read that mismatches after the server went back to waiting for requests:
    the wait is cut short, the EIO goes out, and the connection closes."""
    device, _, test, found = memory_device(OnMismatch.DISCONNECT, BAD_CONTENT)
    test.held[4096] = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 4096, 4096)
        await client.send()
        assert await client.no_reply_yet()
        gate.release()
        failed = await client.reply()
        assert (failed.cookie, failed.error) == (1, Errno.EIO)
        await client.closed()
    assert len(found) == 1


# --- The client going away, and refusals --------------------------------------------------


async def test_end_of_stream_with_requests_in_flight_still_gets_their_replies() -> None:
    device, _, test, _ = memory_device()
    test.held[0] = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 4096)
        client.request(R, 2, 4096, 4096)
        await client.send()
        await client.stream.send_eof()
        assert await client.reply() == ReplyDone(2)
        gate.release()
        assert await client.reply() == ReplyDone(1)
        await client.closed()


async def test_refused_requests_are_answered_and_the_connection_goes_on() -> None:
    device, raw, test, _ = memory_device()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(W, 1, SIZE - 2, 4, payload=b"late")  # past the end: ENOSPC
        client.request(R, 2, 0, 512, flags=1 << 9)  # an unknown flag: EINVAL
        client.request(0x42, 3)  # an unknown command: EINVAL
        client.request(R, 4, 0, 4)
        await client.send()
        replies = await client.replies(4)
    assert [(done.cookie, done.error) for done in replies] == [
        (1, Errno.ENOSPC), (2, Errno.EINVAL), (3, Errno.EINVAL), (4, 0)]
    assert client.data[4] == CONTENT[:4]
    assert raw.data == test.data == CONTENT  # the refused WRITE reached neither child


async def test_a_stopping_server_serves_what_was_sent_then_closes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transmission_module, "DRAIN_IDLE_SECONDS", 0.05)
    device, _, test, _ = memory_device()
    test.held[0] = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 4096)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        server.stop()
        client.request(R, 2, 4096, 4096)  # sent while stopping, before the line goes quiet
        await client.send()
        assert await client.reply() == ReplyDone(2)
        gate.release()
        assert await client.reply() == ReplyDone(1)
        await client.closed()
        with pytest.raises(NegotiationRefused, match="shutting down"):
            await connect(server, nursery)


async def test_overlapping_requests_keep_their_order() -> None:
    """A WRITE over a held READ waits for it; a READ after the WRITE sees the new bytes."""
    device, raw, test, _ = memory_device()
    test.held[0] = gate = Gate()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 8)
        client.request(W, 2, 4, 4, payload=b"new!")
        client.request(R, 3, 0, 8)
        client.request(R, 4, 4096, 8)  # elsewhere: not held up
        await client.send()
        assert await client.reply() == ReplyDone(4)
        assert await client.no_reply_yet()
        gate.release()
        replies = await client.replies(3)
    assert sorted(done.cookie for done in replies) == [1, 2, 3]
    assert replies[0] == ReplyDone(1)
    assert client.data[1] == CONTENT[:8]
    assert client.data[3] == CONTENT[:4] + b"new!"
    assert raw.data == test.data


async def test_a_protocol_error_drops_only_that_connection() -> None:
    device, _, _, _ = memory_device()
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        client.request(R, 1, 0, 8)
        await client.send()
        assert await client.reply() == ReplyDone(1)
        await client.stream.send_all(b"\xde\xad\xbe\xef" + bytes(24))  # bad magic
        await client.closed()
        other, _ = await connect(server, nursery)
        other.request(R, 1, 0, 8)
        await other.send()
        assert await other.reply() == ReplyDone(1)


# --- An NBD child: our own server, in process, on a unix socket ---------------------------


@asynccontextmanager
async def nbd_child(tmp_path: Path, nursery: trio.Nursery, exported: VerifiedDevice,
                    timeout: float | None = None, server_nursery: trio.Nursery | None = None
                    ) -> AsyncIterator[NbdChild]:
    """An NbdChild connected to a second in-process Server that exports `exported`,
    served in `server_nursery` (cancel it: the child's server is gone)."""
    path = str(tmp_path / "child.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    inner = Server(exported, ExportConfig())
    await (server_nursery or nursery).start(inner.serve, [trio.SocketListener(sock)])
    child = await NbdChild.open("test", f"nbd+unix:///?socket={path}", nursery, timeout)
    try:
        yield child
    finally:
        await child.aclose()


async def test_nbd_child_end_to_end(tmp_path: Path) -> None:
    exported, exported_raw, _, _ = memory_device()
    raw = MemoryChild("raw", CONTENT)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with nbd_child(tmp_path, nursery, exported) as child:
                found: list[Finding] = []
                device = VerifiedDevice(raw, child, policy=MismatchPolicy(OnMismatch.ERROR),
                                        on_finding=found.append)
                async with serving(device) as (server, connections):
                    client, _ = await connect(server, connections)
                    client.request(W, 1, 100, 5, payload=b"hello")
                    client.request(R, 2, 96, 16)
                    client.request(FLUSH, 3)
                    client.request(BS, 4, 0, 4096)
                    for cookie in range(5, 21):  # pipelined 64 KiB reads
                        client.request(R, cookie, cookie * 65536, 65536)
                    await client.send()
                    replies = await client.replies(20)
            nursery.cancel_scope.cancel()
    assert sorted(done.cookie for done in replies) == list(range(1, 21))
    assert all(done.error == 0 for done in replies)
    assert client.data[2] == CONTENT[96:100] + b"hello" + CONTENT[105:112]
    assert client.data[20] == CONTENT[20 * 65536:21 * 65536]
    assert exported_raw.data == raw.data
    assert found == []


async def test_nbd_child_late_reply_is_dropped_and_the_child_goes_on(tmp_path: Path) -> None:
    """A TEST read that times out fails (a finding under ERROR); its late reply is
    parsed and dropped, and the next read through the same child is right."""
    exported, _, inner_test, _ = memory_device()
    inner_test.held[8192] = gate = Gate()
    raw = MemoryChild("raw", CONTENT)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with nbd_child(tmp_path, nursery, exported, timeout=0.1) as child:
                found: list[Finding] = []
                device = VerifiedDevice(raw, child, policy=MismatchPolicy(OnMismatch.ERROR),
                                        on_finding=found.append)
                async with serving(device) as (server, connections):
                    client, _ = await connect(server, connections)
                    client.request(R, 1, 8192, 4096)
                    await client.send()
                    failed = await client.reply()
                    assert (failed.cookie, failed.error) == (1, Errno.EIO)
                    gate.release()  # the late reply comes in now
                    await trio.testing.wait_all_tasks_blocked()
                    client.request(R, 2, 8192, 4096)
                    await client.send()
                    assert await client.reply() == ReplyDone(2)
            nursery.cancel_scope.cancel()
    assert client.data[2] == CONTENT[8192:12288]
    assert len(found) == 1 and isinstance(found[0], Divergence)
    assert "no reply within" in (found[0].test_error or "")


async def test_held_child_requests_leave_when_sent(tmp_path: Path) -> None:
    """Requests started between hold_requests and send_requests wait for the latter
    (a connection sends a whole receive's worth together); others leave on their own."""
    exported, _, inner_test, _ = memory_device()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with nbd_child(tmp_path, nursery, exported) as child:
                child.hold_requests()
                held = [child.read(memoryview(bytearray(512)), offset)
                        for offset in (0, 4096, 8192)]
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert inner_test.reads == []
                child.send_requests()
                for pending in held:
                    await pending
                assert inner_test.reads == [(0, 512), (4096, 512), (8192, 512)]
                await child.read(memoryview(bytearray(512)), 12288)  # not held
                assert inner_test.reads[-1] == (12288, 512)
            nursery.cancel_scope.cancel()


async def test_nbd_child_replies_finish_requests_and_disc_waits_for_them(
        tmp_path: Path) -> None:
    """An NBD child's replies finish the guest's requests where they are read (no
    task awaits them); a DISC behind them still waits for their replies."""
    exported, _, inner_test, _ = memory_device()
    inner_test.held[0] = gate = Gate()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with nbd_child(tmp_path, nursery, exported) as child:
                device = VerifiedDevice(MemoryChild("raw", CONTENT), child,
                                        policy=MismatchPolicy(OnMismatch.ERROR))
                async with serving(device) as (server, connections):
                    client, _ = await connect(server, connections)
                    client.request(R, 1, 0, 4096)
                    client.request(R, 2, 4096, 4096)
                    client.request(DISC, 3)
                    await disc_waits_for_the_held_reply(client, gate)
            nursery.cancel_scope.cancel()
    assert client.data[1] == CONTENT[:4096]


async def test_an_nbd_child_whose_server_goes_fails_the_requests_in_flight(
        tmp_path: Path) -> None:
    """Its server gone mid-request, the child fails what is in flight (a finding
    under ERROR, an EIO reply) and all that follows; the connection goes on."""
    exported, _, inner_test, _ = memory_device()
    inner_test.held[0] = Gate()  # never released: the server goes first
    found: list[Finding] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server_nursery = await nursery.start(_nursery_of_its_own)
            async with nbd_child(tmp_path, nursery, exported,
                                 server_nursery=server_nursery) as child:
                device = VerifiedDevice(MemoryChild("raw", CONTENT), child,
                                        policy=MismatchPolicy(OnMismatch.ERROR),
                                        on_finding=found.append)
                async with serving(device) as (server, connections):
                    client, _ = await connect(server, connections)
                    client.request(R, 1, 0, 4096)
                    await client.send()
                    assert await client.no_reply_yet()
                    server_nursery.cancel_scope.cancel()
                    failed = await client.reply()
                    assert (failed.cookie, failed.error) == (1, Errno.EIO)
                    client.request(R, 2, 4096, 4096)
                    await client.send()
                    failed = await client.reply()
                    assert (failed.cookie, failed.error) == (2, Errno.EIO)
            nursery.cancel_scope.cancel()
    assert [type(finding) for finding in found] == [Divergence, Divergence]
    assert all(isinstance(finding, Divergence) and "connection lost" in (finding.test_error or "")
               for finding in found)


async def _nursery_of_its_own(task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """A nursery a test can cancel without cancelling itself."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


# --- Any pipelined mix of requests: the sequential result ----------------------------------

SPAN = 64 * KiB  # the requests below stay here, so they overlap often
operations = st.lists(st.tuples(
    st.sampled_from([R, W, WZ, TRIM, FLUSH]),
    st.integers(0, SPAN - 1), st.integers(0, 3 * KiB), st.booleans(), st.booleans()),
    min_size=1, max_size=24)


@settings(max_examples=40, deadline=None)
@given(operations)
def test_pipelined_requests_give_the_sequential_result(
        ops: list[tuple[int, int, int, bool, bool]]) -> None:
    """Whatever is held and whatever overlaps, every READ sees exactly the WRITEs
    and zeroes sent before it, and both children end as a sequential model says."""
    trio.run(_pipelined, ops)


async def _pipelined(ops: list[tuple[int, int, int, bool, bool]]) -> None:
    device, raw, test, found = memory_device()
    model = bytearray(CONTENT)
    expected: dict[int, bytes] = {}
    gates: list[Gate] = []
    async with serving(device) as (server, nursery):
        client, _ = await connect(server, nursery)
        for cookie, (command, offset, length, held, fua) in enumerate(ops):
            length = min(length, SPAN - offset)
            flags = int(CommandFlag.FUA) if fua and command != R else 0
            if command == R:
                if held and offset not in test.held:
                    test.held[offset] = Gate()
                    gates.append(test.held[offset])
                expected[cookie] = bytes(model[offset:offset + length])
                client.request(R, cookie, offset, length, flags)
            elif command == W:
                payload = bytes([cookie % 251 + 1]) * length
                model[offset:offset + length] = payload
                client.request(W, cookie, offset, length, flags, payload)
            elif command == WZ:
                model[offset:offset + length] = bytes(length)
                client.request(WZ, cookie, offset, length, flags)
            else:
                client.request(command, cookie, offset if command == TRIM else 0,
                               length if command == TRIM else 0, flags)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        for gate in gates:
            gate.release()
        replies = await client.replies(len(ops))
    assert sorted(done.cookie for done in replies) == list(range(len(ops)))
    assert all(done.error == 0 for done in replies), replies
    for cookie, data in expected.items():
        assert client.data[cookie] == data, cookie
    assert raw.data[:SPAN] == test.data[:SPAN] == model[:SPAN]
    assert found == []
