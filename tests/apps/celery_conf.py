"""Celery settings for the shmctx.celery tests: kombu's filesystem transport and a file
result backend under one directory, so that no broker server is needed."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _example_broker():
    """docs/examples/celery/broker.py: its transport writes each message atomically
    (kombu's own creates the file, then fills it, and a worker polling in between reads
    it empty and stops)."""
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "celery" / "broker.py"
    spec = importlib.util.spec_from_file_location("shmctx_celery_example_broker", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class AtomicFilesystemTransport(_example_broker().Transport):
    """kombu's ``filesystem://`` transport with atomic message files, and shorter waits.

    Celery's loop for a transport without an event loop waits for a message up to 2 s
    per round, and its warm shutdown lets two rounds finish: 2-4 s of every worker's
    stop spent waiting for nothing. Each wait here ends after 0.1 s instead (the loop
    simply waits again), which keeps the test file within its time budget."""

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
