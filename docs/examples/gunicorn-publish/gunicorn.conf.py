# The one line that wires shmctx into gunicorn (see ../gunicorn for the basics). The
# namespace comes from SHMCTX_NAMESPACE (see README.md), so that an outside process,
# publish.py, can find it.
from shmctx.gunicorn import *  # noqa: F403

bind = "127.0.0.1:8000"
workers = 3
