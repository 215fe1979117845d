"""Run the worker of celery_app.py with Celery's event loop and its AsynPool, as with the
redis and amqp transports (the filesystem transport of the tests would give it the
blocking pool). It receives no tasks: the filesystem transport cannot feed an event loop.
What it shows is the pool's handling of its processes. Arguments: the worker's name."""

from __future__ import annotations

import socket
import sys

from celery_app import app

if __name__ == "__main__":
    app.Worker(hostname=f"{sys.argv[1]}@{socket.gethostname()}", pool="prefork",
               concurrency=2, loglevel="INFO", use_eventloop=True, without_heartbeat=True,
               without_gossip=True, without_mingle=True).start()
