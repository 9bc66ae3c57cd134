"""Child processes that never outlive their parent (`ralmspec up`, tests)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent exits (PR_SET_PDEATHSIG), so children of `ralmspec up` never
    outlive it. Called by the child itself after exec: a `preexec_fn` would run Python between fork and exec
    in a parent with JVM and torch threads, which is unsafe (seen here: a SIGSEGV in the forked child)."""
    ppid = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != ppid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# `python -c` wrapper that sets the parent-death signal, then execs the real program (it survives exec).
DIE_WITH_PARENT = [sys.executable, "-c", "import sys; from services.common.process import die_with_parent, exec_argv; "
                   "die_with_parent(); exec_argv(sys.argv[1:])"]


def exec_argv(argv: list[str]) -> None:
    os.execv(argv[0], argv)
