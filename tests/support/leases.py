"""A worker that dies holding a delivery: what service/worker_leases.py must clean up after."""

from __future__ import annotations

import signal
import subprocess
import sys

TAKE_AND_DIE = """
import json, os, signal, sys
from kombu import Connection
from config.keys import worker_transport_options
broker, incarnation, queue, body = sys.argv[1:5]
conn = Connection(broker, transport_options=worker_transport_options(incarnation))
box = conn.SimpleQueue(queue)
box.put({"body": body})
box.get(timeout=5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def deliver_and_die(broker: str, incarnation: str, queue: str, body: str) -> None:
    """What a worker killed mid-step leaves: a delivery under its own keys, never acked."""
    done = subprocess.run(
        [sys.executable, "-c", TAKE_AND_DIE, broker, incarnation, queue, body], timeout=60
    )
    assert done.returncode == -signal.SIGKILL
