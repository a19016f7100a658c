"""The per-step exchange with ranks on the driver's node over pipes: ``send(packet) -> ticket``.

Each rank's actor runs ``WorkerActor.serve_pipe``: a loop that reads one packet at a time from
its FIFO, runs ``Worker.advance`` and writes the results back on a second FIFO. The driver reads
them in the thread that waits for them, woken by the kernel (``select``) when a rank's bytes
arrive: no channel to poll, no collector thread to hand them over. Measured on the idle 2-core
CPU, one actor, a 260-byte packet echoed (``benchmarks/results/step-hop-cpu.log``): 22 us a round
trip, against 93 us through a Ray Compiled Graph and 57 us over the same pipes when a collector
thread hands each result to the waiting one. Ranks idle between steps sleep in ``read``: none
spins, so this also suits CPU ranks and the service's idle engine.

On an accelerator each rank replies to a held step before it launches it
(``WorkerActor._pipe_step``), so the driver applies step i's tokens and schedules the next step
while the rank launches step i+2: the two sides no longer take turns. On the H200 that took the
demo model's decode step through one Ray worker from 0.45-0.49 ms to 0.21-0.29, against
0.23-0.31 in process (``step-transports-nvidia-h200-2026-12-04.log``).

Only ranks on the driver's node can share a FIFO with it: groups with a rank elsewhere take the
compiled graph (``cluster.executor.step_transport``). Packets and results are pickled by our own
processes, the driver and its workers, through FIFOs in a directory only this user may open
(``mkdtemp``: mode 0700); nothing else reads or writes them.

A rank whose process ends closes its end of the pipes: the driver's read sees the end of the
file at once and every step in flight fails; the executor then names the rank from its loop's
ref (``loops``), as it does for the graph. A rank that stops without ending is found by the
executor's health check, which ``PipeTicket.wait``'s timeout lets it run.

Frames: driver to rank ``<u32 length><pickled packet>``; rank to driver ``<u8 ok><u32
length><body>``, the body rank 0's pickled results (other ranks send none: nobody reads them) or,
where the step raised, the error's one-line text and, for one of our own errors, the error.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import pickle
import select
import shutil
import struct
import tempfile
import time
from typing import Any

from scheduler.errors import TilerunError

PACKET = struct.Struct("<I")
REPLY = struct.Struct("<BI")
# Seconds the loops may take to open their pipes and answer the first (empty) step.
FIRST_EXECUTION_S = 60.0
# Seconds one wait in select lasts at most: a close from another thread is seen within it.
SLICE_S = 0.5
# Bytes each pipe asks to hold (Linux's default is 64 KiB; the kernel caps the request at
# /proc/sys/fs/pipe-max-size), so that a prefill's packet is written in one go.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class RankError(Exception):
    """A rank's step raised. ``str()``: the error's type and last line, as the rank put it;
    ``cause``: the error itself where it is one of ours (a ``TilerunError``), else None."""

    def __init__(self, text: str, cause: BaseException | None = None) -> None:
        super().__init__(text)
        self.cause = cause


class PipeTicket:
    """One step sent to every rank; ``outcome`` (per rank ``(True, results)`` or ``(False,
    RankError)``) once each rank's reply is in, or ``fatal`` if the pipes broke first."""

    __slots__ = ("outcome", "fatal", "_pipes")

    def __init__(self, pipes: PipeSteps) -> None:
        self.outcome: list[tuple[bool, Any]] | None = None
        self.fatal: BaseException | None = None
        self._pipes = pipes

    def wait(self, timeout: float) -> bool:
        """Read replies until this step's are all in (or the pipes broke); False after
        ``timeout`` seconds without that."""
        return self._pipes._wait(self, timeout)


class PipeSteps:
    """``send(packet) -> PipeTicket``; ``loops``: each rank's ``serve_pipe`` call (it ends when
    the rank's actor dies, or when ``close`` ends its input). Same contract as
    ``cluster.compiled_steps.CompiledSteps``: a packet is ``(batch | None, logits, hold)``, each
    rank's results the list ``Worker.advance`` returned, tickets resolved in the order sent.
    Not thread-safe: one thread sends and waits (the executor's)."""

    def __init__(self, workers: list) -> None:
        import ray

        self._ray = ray
        self._dir = tempfile.mkdtemp(prefix="tilerun-pipe-")  # mode 0700
        self._readers: list[int] = []  # the ranks' results, ours to read
        self._writers: list[int] = []  # the ranks' steps, ours to write
        self._rank_of: dict[int, int] = {}  # reader fd -> rank
        self._steps_paths: list[str] = []  # each rank's step FIFO, in rank order
        self._bufs = [bytearray() for _ in workers]
        self._replies: list[collections.deque] = [collections.deque() for _ in workers]
        self._tickets: collections.deque[PipeTicket] = collections.deque()
        self._fatal: BaseException | None = None
        self._closed = False
        self.ended = False  # a rank's loop ended (its process, most likely)
        self.loops: list = []
        try:
            paths = []
            for rank in range(len(workers)):
                steps = os.path.join(self._dir, f"steps-{rank}")
                results = os.path.join(self._dir, f"results-{rank}")
                os.mkfifo(steps, 0o600)
                os.mkfifo(results, 0o600)
                # open before the loop starts: the rank's open for writing then does not wait
                self._readers.append(os.open(results, os.O_RDONLY | os.O_NONBLOCK))
                self._rank_of[self._readers[-1]] = rank
                _grow(self._readers[-1])
                paths.append((steps, results))
                self._steps_paths.append(steps)
            self.loops = [w.serve_pipe.remote(s, r) for w, (s, r) in zip(workers, paths)]
            for (steps, _), loop in zip(paths, self.loops):
                self._writers.append(self._open_writer(steps, loop))
                _grow(self._writers[-1])
            first = self.send((None, "none", 0))
            if not first.wait(FIRST_EXECUTION_S):
                raise RuntimeError(
                    f"the step pipes' first (empty) step took over {FIRST_EXECUTION_S:.0f} s"
                )
            if first.fatal is not None or not all(ok for ok, _ in first.outcome or []):
                raise RuntimeError(
                    f"the step pipes' first (empty) step failed: {first.fatal or first.outcome}"
                )
        except BaseException:
            self.close(broken=True)
            raise

    def _open_writer(self, path: str, loop) -> int:
        """Our end of a rank's step FIFO, once its loop holds the other end (until then the
        open fails with ENXIO); the loop's own error if it ended first."""
        deadline = time.monotonic() + FIRST_EXECUTION_S
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            done, _ = self._ray.wait([loop], timeout=0.002)
            if done:
                self._ray.get(done[0])  # raises the loop's error
                raise RuntimeError("a worker's step loop ended before it opened its pipe")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"a worker's step loop did not open its pipe in {FIRST_EXECUTION_S:.0f} s"
                )

    def send(self, packet: Any) -> PipeTicket:
        """Write one step to every rank, in rank order. Raises where a rank's pipe is gone (its
        loop ended): the caller names the rank."""
        if self._fatal is not None:
            raise RuntimeError(f"the step pipes broke: {self._fatal}")
        ticket = PipeTicket(self)
        body = pickle.dumps(packet, pickle.HIGHEST_PROTOCOL)
        frame = PACKET.pack(len(body)) + body
        self._tickets.append(ticket)  # before writing: replies read meanwhile are matched to it
        try:
            for rank, fd in enumerate(self._writers):
                self._write(rank, fd, frame)
        except BaseException as e:
            self._fail(e)
            raise
        return ticket

    def _write(self, rank: int, fd: int, frame: bytes) -> None:
        view = memoryview(frame)
        last = time.monotonic()
        while view:
            try:
                n = os.write(fd, view)
                view, last = view[n:], time.monotonic()
                continue
            except BlockingIOError:
                pass
            # the rank's pipe is full: it is still writing a reply, which it must finish before
            # it reads again, so take replies in while waiting for room
            ready, writable, _ = select.select(self._readers, [fd], [], SLICE_S)
            self._take_in(ready)
            if self._fatal is not None:
                raise RuntimeError(f"the step pipes broke: {self._fatal}")
            if not writable and time.monotonic() - last > FIRST_EXECUTION_S:
                raise RuntimeError(
                    f"rank {rank} has read none of its step for {FIRST_EXECUTION_S:.0f} s"
                )

    def _wait(self, ticket: PipeTicket, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while ticket.outcome is None and ticket.fatal is None:
            if self._closed:
                self._fail(RuntimeError("the step pipes were closed"))
                break
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                ready, _, _ = select.select(self._readers, [], [], min(left, SLICE_S))
            except (OSError, ValueError) as e:  # closed under us (a shutdown elsewhere)
                self._fail(e)
                break
            self._take_in(ready)
        return True

    def _take_in(self, ready: list[int]) -> None:
        """Read what the ranks in ``ready`` have written; settle the tickets it completes."""
        ended = None
        for fd in ready:
            rank = self._rank_of.get(fd)
            if rank is None:  # closed meanwhile (a shutdown from another thread)
                continue
            try:
                data = os.read(fd, PIPE_BYTES)
            except BlockingIOError:
                continue
            except OSError as e:
                self._fail(e)
                return
            if not data:  # the rank's loop ended: its process died, or it was told to stop
                ended = rank
                continue
            buf = self._bufs[rank]
            buf += data
            while len(buf) >= REPLY.size:
                ok, n = REPLY.unpack_from(buf)
                if len(buf) < REPLY.size + n:
                    break
                self._replies[rank].append((bool(ok), bytes(buf[REPLY.size : REPLY.size + n])))
                del buf[: REPLY.size + n]
        while self._tickets and all(self._replies):
            ticket = self._tickets.popleft()
            ticket.outcome = [_outcome(*q.popleft()) for q in self._replies]
        if ended is not None:
            self.ended = True
            self._fail(RuntimeError(f"rank {ended}'s step loop ended"))

    def _fail(self, error: BaseException) -> None:
        if self._fatal is None:
            self._fatal = error
        while self._tickets:
            self._tickets.popleft().fatal = self._fatal

    def close(self, broken: bool) -> None:
        """End the loops (their input ends) and free the pipes; steps in flight fail. The
        actors stay for the calls that follow (their shutdown)."""
        del broken  # the loops end either way: their input closes, or their process is gone
        if self._closed:
            return
        self._closed = True
        self._release_waiting(self._steps_paths[len(self._writers) :])
        for fd in self._writers + self._readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._writers, self._readers, self._rank_of = [], [], {}
        self._fail(RuntimeError("the step pipes were closed"))
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _release_waiting(steps_paths: list[str], patience_s: float = 0.5) -> None:
        """A rank whose step FIFO we never opened (bring-up failed first) waits in ``open``
        for a writer, its actor's step thread with it: open each such FIFO ourselves and close
        it at once, so that the rank reads end-of-file and its loop returns. ENXIO means the
        rank is not in ``open`` yet: tried again for ``patience_s``; a rank that gets there
        after the directory is gone finds no FIFO and its loop ends with that error."""
        deadline = time.monotonic() + patience_s
        for path in steps_paths:
            while True:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError as e:
                    if e.errno != errno.ENXIO or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)


def _grow(fd: int) -> None:
    with contextlib.suppress(OSError):  # capped or refused: the default size still works
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)


def _outcome(ok: bool, body: bytes) -> tuple[bool, Any]:
    if ok:
        return True, (pickle.loads(body) if body else None)
    text, cause = pickle.loads(body)
    return False, RankError(text, cause)


# --- the rank's side (``WorkerActor.serve_pipe``) ---


class PacketReader:
    """The rank's end of its step FIFO: ``next()`` is the next packet (waiting for it asleep in
    ``read``), None once the driver closed the pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def next(self) -> bytes | None:
        while True:
            if len(self._buf) >= PACKET.size:
                (n,) = PACKET.unpack_from(self._buf)
                if len(self._buf) >= PACKET.size + n:
                    body = bytes(self._buf[PACKET.size : PACKET.size + n])
                    del self._buf[: PACKET.size + n]
                    return body
            data = os.read(self._fd, PIPE_BYTES)
            if not data:
                return None
            self._buf += data


def write_reply(fd: int, ok: bool, body: bytes) -> None:
    """One reply, whole (a blocking pipe: the driver takes replies in while it writes)."""
    view = memoryview(REPLY.pack(int(ok), len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def error_body(e: BaseException) -> bytes:
    """A failed step's reply: its one-line text, and the error itself where it is ours."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
    if isinstance(e, TilerunError):
        with contextlib.suppress(Exception):
            body = pickle.dumps((text, e), pickle.HIGHEST_PROTOCOL)
            pickle.loads(body)  # it must come back whole on the other side
            return body
    return pickle.dumps((text, None), pickle.HIGHEST_PROTOCOL)
