"""Every code block of README.md and docs/*.md runs as written and leaves nothing behind.

Readers copy the docs' blocks and run them, so each page is run here the way a reader
would: its blocks in order, in a fresh directory of its own (the machinery is in
docs_snippets_support.py). The convention for a page, also in docs/architecture.md,
"How the docs are tested":

* Every fence names its language. `python` and `bash`/`sh` blocks are run; `text`
  (output, diagrams), `console`, `json`, `toml`, `ini` and `yaml` blocks are only shown
  (a `json` block must parse). A fence with no language fails.
* A `python` block is a complete program: it runs on its own, as `python block.py` in a
  new interpreter, and it shows its own cleanup (`m.unlink()`).
* A `python` block whose first line is `# NAME.py` (`# app.py`, `# gunicorn.conf.py`,
  `# conftest.py`) is a file of a multi-file example: it is written to the directory
  under that name, not run. The page's next `bash` block runs against it. Files that no
  later command uses (a second `gunicorn.conf.py`, say) are run by the page's previous
  `bash` block again.
* A `bash`/`sh` block holds commands, one a line (`\\` continues one), each of which
  must exit with status 0. Install steps (`pip install`, `python -m venv`,
  `apt-get install`, also between `&&`) are skipped: the tests' environment has what
  they install, and `.venv/bin/X` means its X. Only the programs of
  docs_snippets_support.PROGRAMS run (python with a script of the page, `-c`, or `-m` of
  PYTHON_MODULES; pytest, ctx-inspect, gunicorn, uvicorn, head, echo, cat, ls), and
  nothing is written outside the directory: a page with any other command (git, rm,
  celery) fails before anything of it runs. `gunicorn ...` and `uvicorn ...` serve: each
  is started as written (on a free port, given through GUNICORN_CMD_ARGS or
  UVICORN_PORT), must answer `GET /` with 200 five times, and must exit 0 on Ctrl-C.
* `<!-- not run: REASON -->` on the line right before a fence leaves that block out.
  Only for a block that cannot run here (a five-minute benchmark, the test suite
  itself), and always with the reason.
* A namespace is written as a literal, `namespace="NAME"` (or `SHMCTX_NAMESPACE=NAME`,
  `--namespace NAME` in a command): each run renames it `NAME-<random>` throughout the
  page, so that parallel runs never meet. After the page, nothing may be left in
  /dev/shm of those namespaces, of one named after a process the page started
  (`gunicorn-<pid>`, `pytest-<pid>-...`), or of one its output names.
* RUN_COUNTS below says how many blocks of each page run. A new page fails until it
  has its line, and a page that runs another number of blocks fails too: a snippet
  cannot drop out unnoticed.

docs/examples/*/ are run by their integration's tests (tests/test_gunicorn.py ...), as
their README.md says to run them.
"""

from __future__ import annotations

import pytest
from docs_snippets_support import (
    ROOT,
    DocError,
    PageRun,
    blocks,
    leftovers,
    run_page,
    shmctx_namespaces,
)

from shmctx import _shm

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# Blocks run per page: programs, files written, command blocks.
RUN_COUNTS = {
    "README.md": 2,
    "docs/api.md": 0,
    "docs/architecture.md": 0,
    "docs/asgi.md": 6,
    "docs/celery.md": 2,
    "docs/dask.md": 4,
    "docs/data.md": 3,
    "docs/gunicorn.md": 9,
    "docs/hosts.md": 0,
    "docs/index.md": 0,
    "docs/inspect.md": 0,
    "docs/multiprocessing.md": 6,
    "docs/performance.md": 0,
    "docs/pytest.md": 4,
    "docs/releasing.md": 0,
    "docs/reliability.md": 0,
}


def test_every_page_has_its_count():
    assert sorted(RUN_COUNTS) == PAGES, (
        "RUN_COUNTS must name every page of README.md and docs/*.md: "
        f"missing {sorted(set(PAGES) - set(RUN_COUNTS))}, "
        f"gone {sorted(set(RUN_COUNTS) - set(PAGES))}")


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written_and_leaves_nothing(page, tmp_path):
    before = shmctx_namespaces()
    run = PageRun()
    try:
        run = run_page(ROOT / page, tmp_path, run)
    finally:
        left = leftovers(run, before)
        for ns in left:  # so that one leak does not fail the next run too
            _shm.remove_namespace_objects(ns)
    assert not left, f"{page} left in /dev/shm: {left}"
    assert len(run.ran) == RUN_COUNTS.get(page), (
        f"{page} ran {len(run.ran)} blocks, RUN_COUNTS says {RUN_COUNTS.get(page)}:\n"
        + "\n".join(run.ran))


# --- the harness itself: each of its checks can fail ---------------------------------

def _page(tmp_path, text: str):
    path = tmp_path / "page.md"
    path.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    return path, work


def test_a_fence_without_a_language_fails(tmp_path):
    path, _ = _page(tmp_path, "Text.\n\n```\nprint(1)\n```\n")
    with pytest.raises(DocError, match="names no language"):
        blocks(path)


def test_a_failing_block_fails_and_a_leftover_namespace_is_found(tmp_path):
    path, work = _page(tmp_path, (
        "```python\n"
        "from shmctx import ContextManager\n"
        "ContextManager(namespace=\"forgotten\", sweeper=False).close()\n"
        "```\n\n"
        "```bash\n"
        "pip install nothing-at-all   # an install step: skipped\n"
        "python -c 'raise SystemExit(3)'\n"
        "```\n"))
    before = shmctx_namespaces()
    run = PageRun()
    try:
        with pytest.raises(DocError, match=r"page.md:6: exit status 3:\npython -c"):
            run_page(path, work, run)
        left = leftovers(run, before)
    finally:
        for ns in run.namespaces:
            _shm.remove_namespace_objects(ns)
    [ns] = run.namespaces
    assert ns.startswith("forgotten-") and list(left) == [ns]


def test_a_not_run_block_and_shown_blocks_are_left_out(tmp_path):
    path, work = _page(tmp_path, (
        "<!-- not run: it would fail -->\n"
        "```bash\nfalse\n```\n\n"
        "```text\nnot code\n```\n\n"
        "```json\n{\"a\": 1}\n```\n\n"
        "```python\nprint('ran')\n```\n"))
    run = run_page(path, work, PageRun())
    assert len(run.ran) == 1 and run.output == ["ran\n"]


def test_a_page_with_a_command_outside_the_list_runs_nothing(tmp_path):
    path, work = _page(tmp_path, (
        "```bash\necho ran > marker\n```\n\n"
        "```sh\ngit status && rm -rf build\n```\n"))
    with pytest.raises(DocError, match=r"page.md:5: 'git status && rm -rf build': 'git' is not"):
        run_page(path, work, PageRun())
    assert not (work / "marker").exists()
