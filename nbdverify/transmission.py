"""A connection's transmission phase over trio: requests from the sans-IO machine to
the verified device, replies back in batches. The request path: compiled with mypyc
(protocol/native.py), which is why it is not in server.py (mypyc has no `except*`)."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from nbdverify_protocol.constants import Command, CommandFlag, Errno
from nbdverify_protocol.negotiation import NEED_DATA
from nbdverify_protocol.transmission import (
    Disconnect,
    EndOfStream,
    Request,
    RequestAnswered,
    ServerTransmission,
)

from .changes import Origin
from .device import DeviceError, Operation, VerificationFailed, VerifiedDevice
from .transport import Transport

# Per connection: requests in flight, and the bytes their buffers may hold until
# their replies are sent. A client that sends requests and never reads replies
# stalls here, bounded.
MAX_IN_FLIGHT = 64
# 128 MiB: two 32 MiB READs in flight (each holds a buffer per child). At 256 MiB the
# server peaked at 201 MiB RSS under 32 MiB requests at QD16 (scripts/bench).
MEMORY_BUDGET = 128 * 1024 * 1024
# Queued replies are sent once this much is waiting (or sooner, whenever the next
# step would wait).
REPLY_BATCH_BYTES = 256 * 1024
# A receiver that always finds bytes waiting still yields this often, so that the
# tasks sending child requests and completing replies are never starved.
FAIR_RECEIVES = 16
# When the server stops, a connection closes once no request came for this long.
DRAIN_IDLE_SECONDS = 0.5
# How long in-flight requests may take to finish once the connection must close.
CLOSE_GRACE_SECONDS = 30.0


class RequestBudget:
    """What one connection's requests in flight may hold: a slot each, and the bytes
    of their buffers; `acquire` waits until both fit. One object for both, so a
    request takes and gives back its share in one call each (a trio.Semaphore beside
    a byte count cost four Python calls a request more)."""

    def __init__(self, slots: int, limit: int) -> None:
        self.limit = limit
        self._slots = slots
        self._free = limit
        self._waiting = 0
        self._lot = trio.lowlevel.ParkingLot()

    def try_acquire(self, amount: int) -> int | None:
        """A slot and the charge taken (capped at the limit), or None if either is
        not free now."""
        amount = min(amount, self.limit)
        if not self._slots or self._free < amount:
            return None
        self._slots -= 1
        self._free -= amount
        return amount

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)
        while not self._slots or self._free < amount:
            self._waiting += 1
            try:
                await self._lot.park()
            finally:
                self._waiting -= 1
        self._slots -= 1
        self._free -= amount
        return amount

    def release(self, amount: int, slots: int) -> None:
        self._free += amount
        self._slots += slots
        if self._waiting:
            self._lot.unpark_all()


@dataclass(slots=True)
class _Unsent:
    """A batch of replies the kernel has not taken whole yet, and what it holds."""

    buffers: list[memoryview]
    charges: int
    slots: int


class ReplyOutput:
    """The one owner of a connection's outgoing replies: queued as requests finish,
    sent in batches (one writev per batch, not one send per reply: two sends per
    reply halve the IOPS), in one order.

    A batch goes straight to the kernel when it takes it (no task, no wait). What
    it does not take (a 1 MiB READ reply, a client slow to read) is left to this
    output's sender task, so the receiving task goes on to the next request's reads
    meanwhile. A request's memory charge and in-flight slot are given back once its
    reply has left, so a client that never reads replies cannot make the server
    hold more than the budget."""

    def __init__(self, transport: Transport, budget: RequestBudget) -> None:
        self._transport = transport
        self._budget = budget
        self._queued: list[bytes | bytearray] = []
        self._charges = 0  # memory held by the queued replies
        self._slots = 0  # in-flight slots held by them
        self.queued_bytes = 0
        self._unsent: deque[_Unsent] = deque()  # oldest first; the sender's work
        self._more_unsent = trio.Event()
        self._all_sent = trio.Event()
        self._all_sent.set()

    def queue(self, reply: bytes | bytearray, charge: int = 0, slot: bool = False) -> None:
        self._queued.append(reply)
        self.queued_bytes += len(reply)
        self._charges += charge
        self._slots += slot

    @property
    def full(self) -> bool:
        return self.queued_bytes >= REPLY_BATCH_BYTES

    def send(self) -> None:
        """Send everything queued, now if the kernel takes it, else behind what is
        still unsent; never waits."""
        if not self._queued:
            return
        batch = _Unsent([memoryview(reply) for reply in self._queued], self._charges,
                        self._slots)
        self._queued, self._charges, self._slots, self.queued_bytes = [], 0, 0, 0
        if not self._unsent:
            batch.buffers = self._transport.send_now(batch.buffers)
            if not batch.buffers:
                self._release(batch)
                return
            self._all_sent = trio.Event()
            self._more_unsent.set()
        self._unsent.append(batch)

    def _release(self, batch: _Unsent) -> None:
        self._budget.release(batch.charges, batch.slots)

    async def sent(self) -> None:
        """Until every reply handed to `send` has left."""
        await self._all_sent.wait()

    async def run_sender(self) -> None:
        """The task that sends what the kernel did not take at once (until cancelled)."""
        while True:
            await self._more_unsent.wait()
            self._more_unsent = trio.Event()
            await self._send_unsent()
            self._all_sent.set()

    async def _send_unsent(self) -> None:
        while self._unsent:
            batch = self._unsent[0]
            while batch.buffers:
                batch.buffers = await self._transport.send_more(batch.buffers)
            self._unsent.popleft()
            self._release(batch)

    async def send_all_now(self) -> None:
        """At the end, once the sender has stopped: whatever is unsent or queued."""
        if self._transport.cut_off:
            return  # a reply was cut off midway: another cannot follow it
        self.send()
        await self._send_unsent()


class Transmission:
    """One connection's transmission phase: requests from the machine to the device,
    replies back, with no task per request.

    Every request starts on the device the moment it is parsed; the child requests
    of all those parsed from one receive leave together, before the next. Then the
    device's answer decides where it finishes (`_dispatch`, the one place that decides):
    - `ready` (page-cached files): right here, in the receiving task;
    - `reported` (an NBD child with no --child-timeout): in the child's reply reader,
      which tells the connection after each batch of replies (`_finish_reported`);
    - `waits_long` (fsync, or waiting for an earlier overlapping request): a task
      of its own, so that it holds up nothing behind it;
    - the rest (an NBD child's requests that may time out): in order, in one
      completer task per connection (their replies come back in about that order).
    """

    def __init__(self, device: VerifiedDevice, machine: ServerTransmission,
                 transport: Transport, connection_number: int,
                 server_stopping: trio.Event) -> None:
        self.device = device
        self.machine = machine
        self.origin_connection = connection_number
        self._transport = transport
        #: Set when the server stops: serve what the client already sent, then close.
        self._server_stopping = server_stopping
        self._budget = RequestBudget(MAX_IN_FLIGHT, MEMORY_BUDGET)
        self.output = ReplyOutput(self._transport, self._budget)
        self._in_order: deque[tuple[Request, Operation[Any, Any], int]] = deque()
        self._more_in_order = trio.Event()
        #: Started, and to be finished when a child tells `_finish_reported`.
        self._reported: list[tuple[Request, Operation[Any, Any], int]] = []
        self._none_reported: trio.Event | None = None  # made when closing waits for them
        self._listener = self._finish_reported
        self._waiting: trio.CancelScope | None = None  # the wait for the next request
        self._unyielding = 0  # receives in a row that found bytes without waiting
        self._tasks: trio.Nursery | None = None
        self._closing = False  # no more requests will come: finish and end

    async def run(self) -> None:
        self.device.listen(self._listener)
        try:
            async with trio.open_nursery() as sending:
                sending.start_soon(self.output.run_sender)
                async with trio.open_nursery() as tasks:
                    self._tasks = tasks
                    watching = trio.CancelScope()
                    tasks.start_soon(self._stop_reading_when_told, watching)
                    tasks.start_soon(self._complete_in_order)
                    try:
                        await self._receive_requests()
                    finally:
                        # Requests in flight finish (bounded), then the connection closes.
                        watching.cancel()
                        self._closing = True
                        self._more_in_order.set()
                        tasks.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                # Every request is answered: let the replies leave, then stop the sender.
                self.output.send()
                with trio.move_on_after(CLOSE_GRACE_SECONDS):
                    await self.output.sent()
                sending.cancel_scope.cancel()
        finally:
            self.device.unlisten(self._listener)
            self._abandon_in_order()
            with trio.CancelScope(shield=True) as last:
                last.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await self.output.send_all_now()

    async def _stop_reading_when_told(self, watching: trio.CancelScope) -> None:
        """Wake the wait for the next request when the export stops (mismatch) or
        the server is stopping; `_receive_requests` then decides what comes next. A
        reply being sent is never cancelled."""
        with watching:
            async with trio.open_nursery() as race:
                for event in (self.device.policy.stopped, self._server_stopping):
                    race.start_soon(_wait_then_cancel, event, race.cancel_scope)
            if self._waiting is not None:
                self._waiting.cancel()

    async def _receive(self) -> bool:
        """Receive more request bytes; False when reading must stop.

        After a mismatch stopped the export nothing more is served. When the server
        is stopping, requests the client has already sent are still served (they
        are in flight from its side), and the connection closes once it goes quiet.
        """
        if self.device.policy.stopped.is_set():
            return False
        # About to wait for the client: send the children what its last requests need,
        # and the client what is ready.
        self.device.send_requests()
        self.output.send()
        machine = self.machine
        view = machine.receive_buffer()
        count = self._transport.receive_now(view)
        if count is not None and self._unyielding < FAIR_RECEIVES:
            # Bytes were there: no cancel scope, no trip through the scheduler.
            self._unyielding += 1
            machine.received(count)
            return True
        self._unyielding = 0
        if count is not None:
            machine.received(count)
            await trio.lowlevel.checkpoint()  # let the other tasks run now and then
            return True
        if self._server_stopping.is_set():
            with trio.move_on_after(DRAIN_IDLE_SECONDS):
                machine.received(await self._transport.receive_into(view))
                return True
            return False
        try:
            with trio.CancelScope() as self._waiting:
                machine.received(await self._transport.receive_into(view))
                return True
        finally:
            self._waiting = None
        return False

    async def _receive_requests(self) -> None:
        machine = self.machine
        try:
            while True:
                event = machine.next_event()
                if event is NEED_DATA:
                    if not await self._receive():
                        break
                elif isinstance(event, Request):
                    if self.device.policy.stopped.is_set():
                        break
                    # A slot and the request's memory if free now (no coroutine: the usual case).
                    charge = self._budget.try_acquire(_buffer_bytes(event))
                    if charge is None:
                        charge = await self._reserve(event)
                    self._dispatch(event, charge)
                elif isinstance(event, RequestAnswered):
                    self.output.queue(event.reply)
                else:
                    assert isinstance(event, Disconnect | EndOfStream)
                    break
        finally:
            # Nothing held back; replies that are ready leave now, not after the
            # requests still in flight.
            self.device.send_requests()
            self.output.send()

    def _dispatch(self, request: Request, charge: int) -> None:
        """Start a request on the device, and choose where it finishes."""
        self.device.hold_requests()  # until this task next waits (`_receive`, `_reserve`)
        operation = self._start(request)
        if operation.ready:
            self.output.queue(self._reply_now(request, operation), charge, slot=True)
            if self.output.full:
                self.output.send()
        elif operation.waits_long:
            assert self._tasks is not None
            self._tasks.start_soon(self._complete, request, operation, charge)
        elif operation.reported:
            self._reported.append((request, operation, charge))
        else:
            self._in_order.append((request, operation, charge))
            self._more_in_order.set()

    def _finish_reported(self) -> None:
        """A child's replies came: reply to the requests they made ready."""
        waiting = self._reported
        if not waiting:
            return
        output = self.output
        unfinished = []
        for entry in waiting:
            request, operation, charge = entry
            if operation.ready:
                output.queue(self._reply_now(request, operation), charge, slot=True)
            else:
                unfinished.append(entry)
        self._reported = unfinished
        output.send()
        if not unfinished and self._none_reported is not None:
            self._none_reported.set()

    async def _reserve(self, request: Request) -> int:
        """Wait for an in-flight slot and the request's memory: the client is ahead
        of its replies."""
        self.device.send_requests()  # what is held must not wait with us
        self.output.send()  # our own queued replies hold slots and memory: free them first
        return await self._budget.acquire(_buffer_bytes(request))

    def _start(self, request: Request) -> Operation[Any, Any]:
        device = self.device
        command = request.command
        if command == Command.READ:  # first, and before an Origin that only changes need
            return device.read(request.offset, request.length, self.machine.read_headroom)
        origin = Origin(self.origin_connection, request.cookie)
        if command == Command.WRITE:
            assert request.payload is not None
            return device.write(request.offset, request.payload, request.fua, origin)
        if command == Command.WRITE_ZEROES:
            return device.write_zeroes(
                request.offset, request.length,
                may_trim=not request.flags & CommandFlag.NO_HOLE,
                fast=bool(request.flags & CommandFlag.FAST_ZERO),
                fua=request.fua, origin=origin)
        if command == Command.TRIM:
            return device.trim(request.offset, request.length, request.fua, origin)
        if command == Command.FLUSH:
            return device.flush(origin)
        if command == Command.CACHE:
            return device.cache(request.offset, request.length)
        assert command == Command.BLOCK_STATUS
        return device.block_status(request.offset, self.machine.block_status_length(request))

    def _reply_now(self, request: Request, operation: Operation[Any, Any]) -> bytes | bytearray:
        """The reply to a `ready` request, finished in place: no coroutine, no wait."""
        try:
            result = operation.finish_now()
        except (DeviceError, VerificationFailed) as error:
            return self._failure(request, error)
        return self._success(request, result)

    async def _reply(self, request: Request, operation: Operation[Any, Any]) -> bytes | bytearray:
        """The reply to a started request, once it has finished."""
        try:
            result = await operation
        except (DeviceError, VerificationFailed) as error:
            return self._failure(request, error)
        return self._success(request, result)

    def _failure(self, request: Request, error: DeviceError | VerificationFailed) -> bytes:
        if isinstance(error, DeviceError):
            return self.machine.error_reply(request, error.error, str(error))
        finding = error.finding
        return self.machine.error_reply(request, Errno.EIO, finding.client_message(),
                                        finding.error_offset)

    def _success(self, request: Request, result: Any) -> bytes | bytearray:
        machine = self.machine
        command = request.command
        if command == Command.READ:
            return machine.read_reply(request, result)
        if command == Command.BLOCK_STATUS:
            return machine.block_status_reply(
                request, [(extent.length, int(extent.state)) for extent in result])
        return machine.done_reply(request)

    async def _complete(self, request: Request, operation: Operation[Any, Any],
                        charge: int) -> None:
        """Finish a request that was not ready when it started, and queue its reply."""
        self._queue_late(await self._reply(request, operation), charge)

    def _queue_late(self, reply: bytes | bytearray, charge: int) -> None:
        """Queue a reply that did not go out as its request started; send when
        nothing else is about to be ready to go with it."""
        output = self.output
        output.queue(reply, charge, slot=True)
        if output.full or not (self._in_order and self._in_order[0][1].ready):
            output.send()

    async def _complete_in_order(self) -> None:
        while True:
            while self._in_order:
                request, operation, charge = self._in_order.popleft()
                if operation.ready:  # its reply came in the batch just read: no coroutine
                    self._queue_late(self._reply_now(request, operation), charge)
                else:
                    await self._complete(request, operation, charge)
            if self._closing:
                if self._reported:
                    self._none_reported = trio.Event()
                    await self._none_reported.wait()
                return
            await self._more_in_order.wait()
            self._more_in_order = trio.Event()

    def _abandon_in_order(self) -> None:
        while self._in_order:
            _, operation, _ = self._in_order.popleft()
            operation.abandon()
        for _, operation, _ in self._reported:
            operation.abandon()
        self._reported = []


def _buffer_bytes(request: Request) -> int:
    """The memory a request holds while in flight: a READ one buffer per child."""
    command = request.command
    return (2 * request.length if command == Command.READ
            else request.length if command == Command.WRITE else 0)


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
