"""A broker for this demo that needs no server: kombu's filesystem transport, with the
queue and the results in a local directory (EXAMPLE_DIR, default
/tmp/shmctx-celery-example). In production, point Celery at redis:// or amqp://
instead; nothing in shmctx.celery depends on the broker."""

from __future__ import annotations

import os
import tempfile
import uuid
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ROOT = os.environ.get("EXAMPLE_DIR") or os.path.join(tempfile.gettempdir(),
                                                     "shmctx-celery-example")


class _AtomicChannel(filesystem.Channel):
    # kombu creates a message file and then fills it: a worker polling the folder in
    # between would read it empty and stop. Write it under another name, then rename.
    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, f"staging-{uuid.uuid4().hex}")
        with open(staging, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.rename(staging, os.path.join(self.data_folder_out, name))


class Transport(filesystem.Transport):
    Channel = _AtomicChannel


def settings() -> dict:
    """Celery settings: the queue and the results under ROOT."""
    queue, done, results, control = (os.path.join(ROOT, d) for d in
                                     ("queue", "processed", "results", "control"))
    for d in (queue, done, results, control):
        os.makedirs(d, exist_ok=True)
    return {
        "broker_transport": "broker:Transport",
        "broker_transport_options": {"data_folder_in": queue, "data_folder_out": queue,
                                     "store_processed": True, "processed_folder": done,
                                     # broadcasts (remote control), else ./control
                                     "control_folder": control,
                                     "polling_interval": 0.05},
        "result_backend": "file://" + results,
        "broker_connection_retry_on_startup": True,
    }
