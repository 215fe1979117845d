"""gunicorn config of the membench scenarios that use shmctx: the documented wiring
(docs/gunicorn.md), one line. The namespace comes from SHMCTX_NAMESPACE, which
tools/membench.py sets, so that an outside process (the publisher) can attach to it."""

from shmctx.gunicorn import *  # noqa: F403  (the hooks: the whole set-up)

worker_class = "sync"
timeout = 120
graceful_timeout = 10
