"""gunicorn config of the membench scenarios without shmctx (baseline, own-copy,
preload-cow, ray). Bind address, workers and ``--preload`` come from the command line
that tools/membench.py builds, so that this file and conf_shmctx.py differ only in the
shmctx line."""

worker_class = "sync"
timeout = 120  # loading 512 MiB in 8 workers at once on 2 cores takes a while
graceful_timeout = 10
