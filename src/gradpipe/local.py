"""Worker processes on this machine, without Ray: BlockSets in child processes.

Work too large for one process but run without Ray (`--workers 0`) is computed by one
child process per core, each holding a contiguous run of the blocks as a Ray actor does.
Two block threads in one process share one GIL, and every numpy call of a chunk waits for
it: on workload L the same blocks took 0.92 of the time in two processes that they took
in two threads (float64, 8 interleaved rounds), and the per-sample rows' encoding no
longer waits for the other block's numpy calls.

Each child is a fresh interpreter (`python -c`), never a fork of the caller (which may
hold Arrow's threads) and never a re-run of the caller's main script, as multiprocessing's
spawn and forkserver would do for a script without a `__main__` guard. A child runs calls
in order: (method, args) in, ("ok", result) or ("error", exception, traceback) out, over
one socket. It ignores Ctrl-C (the caller stops the run and then closes the pool), and it
exits when the caller goes away (end of file on its socket).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import GradpipeError, JobError

CHILD = "from gradpipe.local import serve; serve({fd})"


def _child_env() -> dict[str, str]:
    """This process's environment, with this gradpipe first on the child's import path."""
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


def serve(fd: int) -> None:
    """A child's life: its BlockSet's arguments first, then calls until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .worker import BlockSet

    conn = Connection(fd)
    try:
        blocks = BlockSet(*conn.recv())
    except (EOFError, OSError):
        return
    try:
        while True:
            try:
                method, call_args = conn.recv()
            except (EOFError, OSError):
                return
            try:
                reply: tuple = ("ok", getattr(blocks, method)(*call_args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                reply = ("error", e, traceback.format_exc())
            try:
                conn.send(reply)
            except (BrokenPipeError, OSError):
                return
            except Exception:  # an exception that does not pickle: its text does
                conn.send(("error", RuntimeError(f"{reply[1]!r}"), reply[2]))
    finally:
        blocks.close()


class LocalWorkers:
    """One child process per group of blocks; `call` runs a BlockSet method on all."""

    def __init__(self, groups: list[tuple]) -> None:
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        self.broken = False
        try:
            for args in groups:
                ours, theirs = socket.socketpair()
                fd = theirs.fileno()
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", CHILD.format(fd=fd)], pass_fds=(fd,),
                    stdin=subprocess.DEVNULL, env=_child_env(),
                    start_new_session=True))  # the terminal's Ctrl-C is the caller's
                theirs.close()
                self.conns.append(Connection(ours.detach()))
                self.conns[-1].send(args)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args: Any) -> list:
        """BlockSet.method(*args) in every child at once; results in child order. A
        child's exception is raised here (the first, in child order) after all answered."""
        if self.broken:
            raise JobError("the local worker processes were stopped by an earlier error")
        self.broken = True  # until every answer is in: an interrupted call leaves replies
        for c in self.conns:
            c.send((method, args))
        replies = [self._receive(i, method) for i in range(len(self.conns))]
        self.broken = False
        for r in replies:
            if r[0] == "error":
                e = r[1]
                if not isinstance(e, Exception):  # KeyboardInterrupt and the like
                    raise RuntimeError(f"a local worker process failed: {e!r}\n{r[2]}")
                if not isinstance(e, GradpipeError) and hasattr(e, "add_note"):
                    e.add_note(f"raised in a local worker process:\n{r[2]}")  # a bug's trace
                raise e
        return [r[1] for r in replies]

    def _receive(self, i: int, method: str) -> tuple:
        try:
            return self.conns[i].recv()
        except (EOFError, OSError):
            p = self.procs[i]
            try:
                code: int | None = p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            how = (f"was killed by signal {-code}" if code is not None and code < 0
                   else f"exited with status {code}")
            raise JobError(
                f"local worker process {p.pid} {how} (in its {method!r} call)"
                + (" (out of memory? try --memory-budget or Ray workers)"
                   if code == -signal.SIGKILL else "")) from None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        """Stop every child and wait for it: none may still write when this returns."""
        for c in self.conns:
            c.close()  # an idle child sees the end of its pipe and exits
        for p in self.procs:
            if self.broken:  # a call was cut short (Ctrl-C, an error): stop it now
                p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.conns, self.procs = [], []
