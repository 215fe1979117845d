"""gunicorn.conf.py of the test server (tests/test_gunicorn.py). The namespace comes from
SHMCTX_NAMESPACE; bind address and worker class from the command line.

gunicorn executes this file again on every reload (SIGHUP). A test asks for other
``configure()`` arguments on a reload by writing them, as JSON, to the file named by
SHMCTX_TEST_CONFIGURE: ``{"namespace": ..., "config": {field: value}, "mode": ...}``."""

import json
import os

import shmctx.gunicorn
from shmctx import ContextConfig
from shmctx.gunicorn import *  # noqa: F403  (the hooks)

_override_path = os.environ.get("SHMCTX_TEST_CONFIGURE")
_override = {}
if _override_path and os.path.exists(_override_path):
    with open(_override_path) as _f:
        _override = json.load(_f)

# Sweeping only once an hour: whatever is reclaimed during a test is child_exit's doing.
shmctx.gunicorn.configure(
    _override.get("namespace"),
    config=ContextConfig(**{"cleanup_interval": 3600, "max_idle_time": 3600,
                            "lock_timeout": 0.2, **_override.get("config", {})}),
    mode=_override.get("mode"),
)

workers = 3
graceful_timeout = 5
preload_app = os.environ.get("SHMCTX_TEST_PRELOAD") == "1"
loglevel = "info"
# gunicorn >= 24 opens a control socket under ~/.gunicorn, one path for every server:
# parallel test servers must not fight over it.
control_socket_disable = True
