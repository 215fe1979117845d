"""Celery settings for the shmctx.celery tests: kombu's filesystem transport and a file
result backend under one directory, so that no broker server is needed."""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class _AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, writing each message under a temporary name and
    renaming it into place. kombu's own ``_put`` creates the message file and then
    writes it: a worker polling the folder in between moves and reads an empty file,
    fails to decode it and stops ("Unrecoverable error: JSONDecodeError")."""

    def _put(self, queue, payload, **kwargs):
        # The same name as kombu's (time first: the consumer takes them in sorted order).
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        # No dot in the temporary name: the consumer only takes "<...>.<queue>.msg".
        staging = os.path.join(self.data_folder_out, f"staging-{uuid.uuid4().hex}")
        with open(staging, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.rename(staging, os.path.join(self.data_folder_out, name))


class AtomicFilesystemTransport(filesystem.Transport):
    """kombu's ``filesystem://`` transport with atomic message files, and shorter waits.

    Celery's loop for a transport without an event loop waits for a message up to 2 s
    per round, and its warm shutdown lets two rounds finish: 2-4 s of every worker's
    stop spent waiting for nothing. Each wait here ends after 0.1 s instead (the loop
    simply waits again), which keeps the test file within its time budget."""

    Channel = _AtomicChannel

    def drain_events(self, connection, timeout=None):
        return super().drain_events(connection, timeout=min(timeout or 0.1, 0.1))


def settings(root: str) -> dict:
    """Celery configuration whose broker queues and results live under ``root``."""
    for sub in ("queue", "processed", "results", "control"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    queue = os.path.join(root, "queue")
    return {
        "broker_url": None,
        "broker_transport": f"{__name__}:AtomicFilesystemTransport",
        "broker_transport_options": {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "store_processed": True,  # taken messages move here, not to the shared /tmp
            "processed_folder": os.path.join(root, "processed"),
            # Broadcast exchanges (the worker's remote control): "control" in the working
            # directory by default, which would leave files in the source tree.
            "control_folder": os.path.join(root, "control"),
            "polling_interval": 0.02,  # how often an idle worker looks for a message
        },
        "result_backend": "file://" + os.path.join(root, "results"),
        "broker_connection_retry_on_startup": True,
        # One task per pool process at a time: a process blocked in a task takes no other.
        "worker_prefetch_multiplier": 1,
        # How long the pool waits for the result of a killed process's task before it
        # reports it lost (default 10 s).
        "worker_lost_wait": 1.0,
    }
