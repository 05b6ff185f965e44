#!/usr/bin/env python3
"""Entrypoint of the worker images: runs the inference server and the worker agent
side by side, and exits as soon as either dies so the container restarts whole."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: drain and stop."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise StopRequested


def _exit_code(returncode: int) -> int:
    # A child killed by signal N reports -N; shells and Docker expect 128+N.
    return 128 - returncode if returncode < 0 else returncode


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", default=env("WORKER_SERVER_CMD", "inference-server serve"),
                    help="inference server command line; its options come from INFER_* (WORKER_SERVER_CMD)")
    ap.add_argument("--agent", default=env("WORKER_AGENT_CMD", "worker-agent"),
                    help="worker agent command line; its options come from AGENT_* (WORKER_AGENT_CMD)")
    ap.add_argument("--stop-timeout", type=float, default=float(env("WORKER_STOP_TIMEOUT", "15")),
                    help="seconds each process gets to exit on SIGTERM before SIGKILL; keep it above "
                         "AGENT_GRACE so in-flight requests drain (WORKER_STOP_TIMEOUT)")
    a = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in (("inference-server", a.server), ("worker-agent", a.agent)):
            try:
                procs[name] = subprocess.Popen(shlex.split(cmd))
            except OSError as exc:
                print(f"worker-entrypoint: cannot start {name} ({cmd!r}): {exc.strerror}; "
                      "is the package installed in this image?", file=sys.stderr)
                return 127
        by_pid = {p.pid: name for name, p in procs.items()}
        while True:
            # os.wait also reaps orphans re-parented to us when we run as PID 1.
            pid, status = os.wait()
            if pid not in by_pid:
                continue
            name = by_pid[pid]
            procs[name].returncode = os.waitstatus_to_exitcode(status)
            code = _exit_code(procs[name].returncode)
            others = [n for n in procs if n != name]
            print(f"worker-entrypoint: {name} exited with status {code}; stopping {', '.join(others)}",
                  file=sys.stderr, flush=True)
            # An unrequested exit is a failure even if the child said 0: a restart
            # policy such as `on-failure` must bring the pair back.
            code = code or 1
            break
    except StopRequested:
        code = 0
    finally:
        # Ignore repeated signals while draining; a second Ctrl-C must not skip the agent's drain.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Agent first: it stops taking streams and finishes in-flight requests,
        # which still need the inference server.
        for name in ("worker-agent", "inference-server"):
            if name in procs:
                _stop(procs[name], a.stop_timeout)
    return code


if __name__ == "__main__":
    sys.exit(main())
