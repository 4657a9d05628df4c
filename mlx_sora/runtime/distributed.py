"""Several ranks, one job: MLX's distributed group with the failure handling a generation needs.

The ranks are processes started by ``mlx.launch`` (the ring backend: TCP over Ethernet, Wi-Fi or a
Thunderbolt bridge; one rank per Mac) that find each other with ``mx.distributed.init()``. Every
collective of ``RankGroup``:

* runs on the calling thread (MLX's evaluation is not thread-safe) on the CPU stream, where the
  ring backend runs (on Apple Silicon the GPU's arrays are the same unified memory);
* is watched: the ring backend waits forever for a peer that is alive but silent (hung, or never
  started: ``init`` blocks in ``accept``), so a watchdog thread ends the process with one clear
  message when a collective waits longer than ``timeout`` seconds; it only writes and exits, it
  never touches MLX;
* turns the backend's error for a peer that went away ("connection to a peer was lost") into a
  ``RankFailure`` that says what this rank was doing;
* counts the bytes this rank sends (``bytes_sent``), for the reports and the projections.

The ring backend has ``all_gather``, ``all_sum``, ``sum_scatter`` and ``send``/``recv`` between
neighbours on the ring, and no all-to-all: ``all_to_all`` and ``broadcast`` forward blocks around
the ring with ``send``/``recv`` (a send runs on a stream of its own so that the receive beside it
is not queued behind it: two ranks that both send first would otherwise wait for each other).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError

DEFAULT_TIMEOUT = 1800.0
"""Seconds a rank waits for the others at one collective before it ends the job (--rank-timeout).
The longest wait in a healthy job is one rank waiting while another works alone: rank 0's text
encoding, or the slowest rank's share of the videos before they are written."""

EXIT_FAILED = 1


class RankFailure(UserError):
    """Another rank failed, went away or did not answer: this rank stops too, writing nothing."""


class Watchdog:
    """Ends the process when the main thread stays in one watched wait for longer than its timeout.

    A daemon thread sleeps until the deadline of the wait in progress; if the wait is still the same
    one then, it runs the cleanup callbacks (e.g. removing staged output files), writes the message to
    stderr and exits with ``EXIT_FAILED``: a hung collective cannot be interrupted from Python."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._armed: tuple[int, float, str] | None = None  # (token, deadline, message)
        self._token = 0
        self.cleanups: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="mlx-sora-rank-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, seconds: float, message: str) -> Iterator[None]:
        with self._lock:
            self._token += 1
            token = self._token
            self._armed = (token, time.monotonic() + seconds, message)
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                if self._armed is not None and self._armed[0] == token:
                    self._armed = None

    def _run(self) -> None:
        with self._lock:
            while True:
                if self._armed is None:
                    self._lock.wait()
                    continue
                token, deadline, message = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                break
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - exiting anyway; the message below says why
                pass
        os.write(2, f"error: {message}\n".encode())
        os._exit(EXIT_FAILED)


_WATCHDOG: Watchdog | None = None


def watchdog() -> Watchdog:
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog()
    return _WATCHDOG


def lost_peer(rank: int, what: str, error: BaseException) -> RankFailure:
    return RankFailure(f"rank {rank}: another rank stopped or lost its connection ({what}: {error}); the job "
                       "stops here without writing a video (that rank's own output says why, unless it was killed)")


def as_rank_failure(error: RuntimeError, rank: int) -> BaseException:
    """What to report for an MLX error raised after a collective failed: the first RankFailure it
    followed (a failed transfer also fails the MLX calls after it, e.g. ``mx.clear_cache`` in a
    ``finally``), a lost peer for the backend's own errors, else the error itself."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, RankFailure):
            return cause
        cause = cause.__context__
    return lost_peer(rank, "after the last exchange", error) if "[ring]" in str(error) else error


def launched_ranks() -> int | None:
    """How many ranks the launcher started this process among (ring: the hostfile's entries; MPI:
    its world size), None when this process was not started by a launcher."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.environ.get("MLX_RANK") is not None:
        try:
            with open(hostfile) as f:
                return len(json.load(f)) or 1
        except (OSError, ValueError, TypeError):
            return None
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def ranks_on_this_host() -> int:
    """How many ranks of the job run on this rank's machine: the ring hostfile's ranks whose first
    address is this rank's (1 outside a ring job)."""
    hostfile, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK", "")
    if not hostfile or not rank.isdigit():
        return 1
    try:
        with open(hostfile) as f:
            hosts = [entry[0].rsplit(":", 1)[0] for entry in json.load(f)]
        return hosts.count(hosts[int(rank)])
    except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return 1


def share_cpu_threads() -> None:
    """With several ranks on one machine (tests; mlx.launch -n R), give each rank its share of the
    cores for the BLAS threads (where not set): two ranks' spinning OpenMP threads on the same 2 cores
    made a demo step 100x slower (0.15 s -> 22 s, MKL). Call it before the BLAS library starts."""
    local = ranks_on_this_host()
    if local > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
            os.environ.setdefault(name, str(max(1, cores // local)))


def init_group(timeout: float = DEFAULT_TIMEOUT, backend: str = "any") -> "RankGroup":
    """Join the job ``mlx.launch`` started (``mx.distributed.init``), within ``timeout`` seconds.

    Outside a launcher this is a group of one. A rank that cannot reach the others raises
    ``RankFailure`` (the ring backend gives up connecting after ~15 s) or, when it waits for a peer
    that never connects, is ended by the watchdog with the same kind of message."""
    expected = launched_ranks()
    where = os.environ.get("MLX_HOSTFILE", "")
    hint = ("check that mlx.launch started every rank, that the IPs in --hosts / the hostfile are this "
            f"machine's and reachable from the others, and that the ports are free{f' ({where})' if where else ''}")
    late = f"rank {os.environ.get('MLX_RANK', '?')}: the other ranks did not connect within {timeout:.0f} s; {hint}"
    start = time.monotonic()
    with watchdog().watch(timeout + 10, late), _alarm(timeout):  # the alarm first, where there is one
        try:
            group = mx.distributed.init(strict=expected is not None and expected > 1, backend=backend)
        except RuntimeError as e:
            if time.monotonic() - start >= timeout:  # (the alarm's Python handler may not have run yet)
                raise RankFailure(late) from e
            raise RankFailure(f"rank {os.environ.get('MLX_RANK', '?')} could not connect to the other "
                              f"ranks ({e}); {hint}") from e
    return RankGroup(group, timeout)


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds``, interrupting a blocking system call of the main thread: the ring
    backend's ``init`` waits in ``accept`` holding the GIL, so the watchdog thread cannot run then;
    the interrupted ``accept`` fails and ``init`` raises."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.siginterrupt(signal.SIGALRM, True)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class RankGroup:
    """A group of ranks (``mx.distributed.Group``) with watched, counted collectives."""

    def __init__(self, group: mx.distributed.Group, timeout: float = DEFAULT_TIMEOUT):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise UserError(f"--rank-timeout must be a positive number of seconds, got {timeout!r}")
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.timeout = float(timeout)
        self.bytes_sent = 0
        self._send_stream = mx.new_stream(mx.cpu) if self.size > 1 else None

    @property
    def right(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def left(self) -> int:
        return (self.rank - 1) % self.size

    # ------------------------------------------------------------ running a collective

    def _evaluate(self, what: str, arrays: list[mx.array]) -> None:
        """Evaluate the collective's arrays, watched; a lost peer becomes a RankFailure."""
        message = (f"rank {self.rank}: waited more than {self.timeout:.0f} s for the other ranks ({what}); "
                   "a rank is hung or unreachable, so the job stops here without writing a video "
                   "(--rank-timeout sets the wait)")
        with watchdog().watch(self.timeout, message):
            try:
                mx.eval(arrays)
            except RuntimeError as e:
                raise lost_peer(self.rank, what, e) from e

    # ------------------------------------------------------------ collectives

    def all_gather(self, x: mx.array, what: str) -> mx.array:
        """Every rank's ``x`` (same shape everywhere) concatenated along axis 0 in rank order."""
        if self.size == 1:
            return x
        mx.eval(x)  # its own work first, outside the watched wait
        out = mx.distributed.all_gather(x, group=self.group, stream=mx.cpu)
        self._evaluate(what, [out])
        self.bytes_sent += (self.size - 1) * x.nbytes
        return out

    def all_gather_rows(self, x: mx.array, rows: Sequence[int], what: str) -> list[mx.array]:
        """Every rank's ``x`` with ``rows[r]`` rows (axis 0) on rank r, padded to the longest for
        ``all_gather`` and cut back: the list of all ranks' arrays."""
        longest = max(rows)
        if x.shape[0] < longest:
            x = mx.concatenate([x, mx.zeros((longest - x.shape[0], *x.shape[1:]), x.dtype)], axis=0)
        gathered = self.all_gather(x, what)
        return [gathered[r * longest: r * longest + n] for r, n in enumerate(rows)]

    def agree(self, ok: bool, what: str) -> None:
        """All ranks learn whether every rank is ready (``ok``); a RankFailure on every rank otherwise,
        naming the ranks that were not."""
        flags = np.array(self.all_gather(mx.array([0 if ok else 1], mx.int32), what))
        failed = [r for r, flag in enumerate(flags.tolist()) if flag]
        if failed and ok:
            names = ", ".join(str(r) for r in failed)
            raise RankFailure(f"rank {self.rank}: rank {names} failed ({what}); its own output says why. "
                              "The job stops here without writing a video")

    def gather_objects(self, value: Any, what: str) -> list[Any]:
        """Every rank's JSON-serialisable ``value``, in rank order, on every rank."""
        data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        lengths = np.array(self.all_gather(mx.array([data.size], mx.int32), what)).tolist()
        pieces = self.all_gather_rows(mx.array(data), lengths, what)
        return [json.loads(bytes(np.array(p))) for p in pieces]

    def broadcast(self, x: mx.array | None, shape: Sequence[int], dtype: mx.Dtype, what: str, root: int = 0) -> mx.array:
        """``x`` of the root on every rank (the others pass None): forwarded once around the ring,
        so each link carries it once."""
        if self.size == 1:
            assert x is not None
            return x
        if self.rank == root:
            assert x is not None and tuple(x.shape) == tuple(shape), (x.shape if x is not None else None, shape)
            mx.eval(x)
        else:
            x = mx.distributed.recv(tuple(shape), dtype, self.left, group=self.group, stream=mx.cpu)
            self._evaluate(what, [x])
        if self.right != root:
            sent = mx.distributed.send(x, self.right, group=self.group, stream=self._send_stream)
            self._evaluate(what, [sent])
            self.bytes_sent += x.nbytes
        return x

    def gather_to_root(self, x: mx.array | None, shapes: Sequence[Sequence[int]], dtype: mx.Dtype, what: str,
                       root: int = 0) -> list[mx.array | None] | None:
        """Every rank's ``x`` (of ``shapes[r]``; None where a shape is empty) on the root, in rank
        order; None on the other ranks. Sent around the ring towards the root, each rank passing on
        what the ranks before it sent: rank root+k sends the pieces of k ranks."""
        if self.size == 1:
            return [x]
        if (tuple(x.shape) if x is not None else None) != (tuple(shapes[self.rank]) if _count(shapes[self.rank]) else None):
            raise ValueError(f"gather_to_root: rank {self.rank} has {None if x is None else tuple(x.shape)}, "
                             f"its shape says {tuple(shapes[self.rank])}")
        distance = (self.rank - root) % self.size
        by_distance = [(root + d) % self.size for d in range(self.size)]
        counts = [_count(shapes[r]) for r in by_distance]
        incoming = sum(counts[1:distance]) if distance else sum(counts[1:])
        bundle = None
        if incoming:
            bundle = mx.distributed.recv((incoming,), dtype, self.left, group=self.group, stream=mx.cpu)
            self._evaluate(what, [bundle])
        if distance == 0:
            pieces: list[mx.array | None] = [None] * self.size
            pieces[root] = x
            offset = 0
            for d in range(1, self.size):
                r = by_distance[d]
                if counts[d]:
                    pieces[r] = bundle[offset: offset + counts[d]].reshape(tuple(shapes[r]))
                    offset += counts[d]
            return pieces
        parts = ([bundle] if bundle is not None else []) + ([x.reshape(-1)] if x is not None and x.size else [])
        if parts:
            payload = mx.concatenate(parts) if len(parts) > 1 else parts[0]
            mx.eval(payload)
            sent = mx.distributed.send(payload, self.right, group=self.group, stream=self._send_stream)
            self._evaluate(what, [sent])
            self.bytes_sent += payload.nbytes
        return None

    def all_to_all(self, blocks: Sequence[mx.array], block_shape: Callable[[int, int], tuple[int, ...]],
                   what: str) -> list[mx.array]:
        """Rank r's ``blocks[d]`` arrive at rank d: returns the blocks every rank sent to this one, in
        rank order (``blocks[rank]`` stays here). ``block_shape(origin, dest)`` is the shape of the
        block rank ``origin`` sends to rank ``dest`` (every rank must be able to compute it: blocks
        travelling past a rank are forwarded by it).

        Hop h (1 .. R-1) sends right the blocks that started h - 1 ranks to the left and still have
        to go at least h ranks from where they started, and receives from the left the next such
        bundle: R(R-1)/2 blocks sent per rank (two ranks: one block each way).
        """
        size, rank = self.size, self.rank
        dtype = blocks[0].dtype
        mx.eval(list(blocks))
        received: list[mx.array | None] = [None] * size
        received[rank] = blocks[rank]
        carried = {(rank, d): blocks[d] for d in range(size) if d != rank}
        for hop in range(1, size):
            send_origin = (rank - hop + 1) % size
            send_keys = [(send_origin, (send_origin + k) % size) for k in range(hop, size)]
            recv_origin = (rank - hop) % size
            recv_keys = [(recv_origin, (recv_origin + k) % size) for k in range(hop, size)]
            payload = mx.concatenate([carried.pop(key).reshape(-1) for key in send_keys])
            counts = [_count(block_shape(*key)) for key in recv_keys]
            sent = mx.distributed.send(payload, self.right, group=self.group, stream=self._send_stream)
            bundle = mx.distributed.recv((sum(counts),), dtype, self.left, group=self.group, stream=mx.cpu)
            self._evaluate(what, [sent, bundle])
            self.bytes_sent += payload.nbytes
            offset = 0
            for key, count in zip(recv_keys, counts):
                block = bundle[offset: offset + count].reshape(block_shape(*key))
                offset += count
                if key[1] == rank:
                    received[key[0]] = block
                else:
                    carried[key] = block
        return received  # type: ignore[return-value]


def all_to_all_sent(size: int, block_bytes: Callable[[int, int], int]) -> list[int]:
    """The bytes each rank sends in ``RankGroup.all_to_all`` (``block_bytes(origin, dest)``): the
    blocks it passes on at every hop, its own and those it forwards."""
    sent = [0] * size
    for rank in range(size):
        for hop in range(1, size):
            origin = (rank - hop + 1) % size
            sent[rank] += sum(block_bytes(origin, (origin + k) % size) for k in range(hop, size))
    return sent


# ---------------------------------------------------------------- stopping from outside


def stop_on_termination() -> None:
    """Make SIGTERM raise ``RankFailure`` in the main thread, so that a rank stopped by the launcher
    (``mlx.launch`` ends every rank once one has failed) says so and removes what it staged, instead
    of vanishing without a word."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise RankFailure("stopped from outside (SIGTERM); under mlx.launch this means another rank failed, "
                          "and its own output says why. The job stops here without writing a video")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------- ranks on this machine


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that were free a moment ago (the OS picks them)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spawn_local_ranks(argv: Sequence[str], ranks: int, folder: str | os.PathLike, env: dict[str, str] | None = None,
                      cpus: Sequence[Sequence[int]] | None = None, logs: Sequence[Any] | None = None,
                      **popen: Any) -> list[subprocess.Popen]:
    """Start ``argv`` as ``ranks`` ring-backend ranks on this machine, what ``mlx.launch --backend
    ring -n R`` does, but on free ports (a hostfile written into ``folder``), with ``cpus`` each rank
    pinned to its own cores, with ``logs`` each rank's stdout and stderr into its own file. Returns the
    processes; the caller waits for them (and reads their exit codes, which mlx.launch does not pass on)."""
    hostfile = os.path.join(folder, "hostfile.json")
    with open(hostfile, "w") as f:
        json.dump([[f"127.0.0.1:{port}"] for port in free_ports(ranks)], f)
    processes = []
    for rank in range(ranks):
        rank_env = dict(os.environ if env is None else env, MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
        pin = None if cpus is None else set(cpus[rank])
        output = {} if logs is None else dict(stdout=logs[rank], stderr=logs[rank])
        processes.append(subprocess.Popen(list(argv), env=rank_env, preexec_fn=(lambda p=pin: os.sched_setaffinity(0, p))
                                          if pin else None, **output, **popen))
    return processes
