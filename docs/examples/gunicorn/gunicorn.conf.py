# The one line that wires shmctx into gunicorn: the master creates the namespace and
# sweeps it, workers attach after fork, dead workers' references are reclaimed at once,
# and the namespace is removed from /dev/shm when the server stops.
from shmctx.gunicorn import *  # noqa: F403

# Optional: choose the namespace and its settings (default: gunicorn-<master pid>).
# import shmctx.gunicorn
# from shmctx import ContextConfig
# shmctx.gunicorn.configure(namespace="lookup", config=ContextConfig(max_idle_time=3600))

bind = "127.0.0.1:8000"
workers = 3
