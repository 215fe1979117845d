"""shmctx.gunicorn with uvicorn's worker class: a real gunicorn
(``-k uvicorn_worker.UvicornWorker``, 3 workers, tests/apps/gunicorn_conf.py) on
127.0.0.1 serving the ASGI app tests/apps/asgi_gunicorn_app.py."""

from __future__ import annotations

import os
import signal

from helpers import wait_for
from test_asgi import APPS_DIR, holders, serve

import shmctx.gunicorn
from shmctx import ContextManager, _shm


def _gunicorn(port: int) -> list[str]:
    return ["-b", f"127.0.0.1:{port}"]


def test_uvicorn_workers_share_the_masters_namespace_and_child_exit_reclaims(ns, tmp_path):
    argv = ["-m", "gunicorn", "-c", str(APPS_DIR / "gunicorn_conf.py"),
            "-k", "uvicorn_worker.UvicornWorker", "asgi_gunicorn_app:app"]
    env = {shmctx.gunicorn.ENV_NAMESPACE: ns}
    with serve(argv, tmp_path, cwd=APPS_DIR, env=env, bind=_gunicorn) as srv:
        workers = wait_for(lambda: len(c := srv.children()) == 3 and c, 20, "3 workers")
        pids = lambda rs: {r["pid"] for r in rs}  # noqa: E731

        # shmctx.asgi, wrapped around the app, hands out the gunicorn worker's manager.
        who = srv.gather("/whoami", lambda rs: len(pids(rs)) >= 2)
        assert {(r["same_manager"], r["namespace"]) for r in who} == {(True, ns)}
        counts = srv.gather("/count", lambda rs: len(pids(rs)) >= 2, at_least=48)
        assert sorted(r["value"] for r in counts) == list(range(1, len(counts) + 1))
        srv.gather("/lease", lambda rs: pids(rs) == workers)
        assert holders(ns, "leased") == dict.fromkeys(workers, 1)

        with ContextManager(namespace=ns, create=False, sweeper=False) as tm:
            # The sweep runs once an hour: only the master's child_exit can reclaim.
            assert tm.config.cleanup_interval == 3600
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in holders(ns, "leased"), 20,
                 "the killed worker's reference to be reclaimed")
        # The master logs the reclaim right after making it: wait for the line too.
        wait_for(lambda: f"reclaimed 1 reference(s) of dead worker {victim}" in srv.log(),
                 20, "the master's reclaim line")
        new = wait_for(lambda: len(c := srv.children()) == 3 and victim not in c and c - workers,
                       20, "gunicorn to replace the killed worker")
        srv.gather("/ping", lambda rs: new <= pids(rs), at_least=1)  # it serves

        # The workers still hold their leases. uvicorn's worker ends by raising the
        # stop signal again once its server has shut down, so gunicorn's worker_exit
        # does not run in it: child_exit reclaims what each worker held, and the
        # master finds no live holder when it unlinks.
        os.kill(srv.pid, signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log()
        assert _shm.namespace_objects(ns) == [], srv.log()
        assert f"namespace {ns!r} unlinked" in srv.log()
        assert "unlinking anyway" not in srv.log()
