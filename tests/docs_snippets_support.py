"""The machinery behind tests/test_docs_snippets.py: it finds the fenced blocks of a
Markdown page and runs them as that file's docstring describes (the convention for
authors is written there, and in docs/architecture.md, "How the docs are tested")."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from helpers import wait_for
from servers import children, free_port, kill_session, spawn_in_session

from shmctx import _shm

ROOT = Path(__file__).resolve().parent.parent
# The environment the tests run in is the one a page's commands set up: `.venv/bin/X`
# in a page means this X, and a bare `python` or `gunicorn` finds it first on PATH.
BIN = Path(sys.executable).parent

RUN = {"python", "bash", "sh"}  # languages whose blocks are run
SHOWN = {"text", "console", "json", "toml", "ini", "yaml"}  # shown to the reader only
SCRIPT_TIMEOUT = 120.0  # seconds for one program or command; far above what any takes
SERVER_REQUESTS = 5  # GET / requests a started server must answer with 200
SERVERS = {"gunicorn", "uvicorn"}  # commands that serve until stopped
# The only programs a page's command may start. A page's commands run on the machine
# of whoever runs the tests, so anything else (git, rm, twine, a package upload) is
# refused before the page runs at all: such a block needs `<!-- not run: REASON -->`.
PROGRAMS = {"python", "python3", "pytest", "ctx-inspect", "head", "echo", "cat", "ls"} | SERVERS
PYTHON_MODULES = {"shmctx", "pytest"} | SERVERS

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(\S.*?)\s*-->\s*$")
_FILE = re.compile(r"^#\s*([\w.-]+\.py)\b")
# A command, or the part of a command between `&&`, that installs software: the tests
# run in an environment that already has it (the suite's own venv).
_INSTALL = re.compile(
    r"^\s*(sudo\s+)?(\S*/)?(pip3?\s+install|python3?\s+-m\s+(pip\s+install|venv)"
    r"|apt(-get)?\s+install)\b")
_OPERATORS = set("();<>|&")
_EXPANSIONS = set("$`*?")
_REDIRECTS = {">", ">>", "<", "2>", "&>", ">&"}
_READABLE = {"/dev/urandom", "/dev/zero", "/dev/null"}
_NS_PY = re.compile(r"""\bnamespace\s*=\s*(["'])([A-Za-z0-9._-]+)\1""")
_NS_SH = re.compile(r"(?:\bSHMCTX_NAMESPACE=|--namespace[= ])([A-Za-z0-9._-]+)")


class DocError(AssertionError):
    """A block that is not written as the convention asks, or that failed when run."""


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason given by `<!-- not run: REASON -->`, if any

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """`app.py` for a python block whose first line is `# app.py` (a file of a
        multi-file example), else None."""
        if self.lang != "python":
            return None
        m = _FILE.match(self.text)
        return m.group(1) if m else None


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order. A fence without a language is an
    error: it would leave the reader (and this harness) guessing whether it is code."""
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        i += 1
        body = []
        while i < len(lines) and not close.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        if i == len(lines):
            raise DocError(f"{page}:{start + 1}: the fence is never closed")
        i += 1
        marker = _NOT_RUN.match(lines[start - 1]) if start else None
        if not lang:
            raise DocError(f"{page}:{start + 1}: the fence names no language; write "
                           f"```text for output or diagrams, ```python or ```bash for code")
        if lang not in RUN | SHOWN:
            raise DocError(f"{page}:{start + 1}: unknown block language {lang!r}: run are "
                           f"{sorted(RUN)}, shown only are {sorted(SHOWN)}")
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n",
                         marker.group(1) if marker else None))
    return out


def commands(block: Block) -> list[str]:
    """The commands of a bash block, one a line (`\\` continues a line), with comment
    lines and the install steps left out; `.venv/bin/` means the tests' environment."""
    joined = re.sub(r"\\\n", " ", block.text)
    out = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p for p in line.split("&&") if not _INSTALL.match(p)]
        if parts:
            out.append(re.sub(r"(?<![\w/.])\.venv/bin/", f"{BIN}/", "&&".join(parts).strip()))
    return out


@dataclass
class PageRun:
    """What running one page did: the blocks run, the namespaces it named (as renamed
    for this run), the processes it started, and everything they printed."""
    ran: list[str] = field(default_factory=list)
    namespaces: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    output: list[str] = field(default_factory=list)


def environment() -> dict[str, str]:
    """The environment of a reader's shell: nothing of pytest's (an inner pytest would
    take itself for an xdist worker), of shmctx's or of a server's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "SHMCTX_")) and k != "GUNICORN_CMD_ARGS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def rename_namespaces(page_blocks: list[Block]) -> dict[str, str]:
    """Every namespace a page names gets a name of its own for this run, so that two runs
    (or two pages naming "myapp") never meet in /dev/shm."""
    names: set[str] = set()
    for b in page_blocks:
        if b.not_run is None and b.lang == "python":
            names |= {m.group(2) for m in _NS_PY.finditer(b.text)}
        elif b.not_run is None and b.lang in ("bash", "sh"):
            names |= {m.group(1) for m in _NS_SH.finditer(b.text)}
    run_id = uuid.uuid4().hex[:8]
    return {n: f"{n}-{run_id}" for n in names}


def _renamed(block: Block, names: dict[str, str]) -> str:
    text = block.text
    for old, new in names.items():
        if block.lang == "python":  # only where it is a string: `namespace="myapp"`
            text = re.sub(rf"""(["']){re.escape(old)}\1""", rf"\g<1>{new}\g<1>", text)
        else:  # as a whole word: `SHMCTX_NAMESPACE=myapp`, `ctx-inspect myapp`
            text = re.sub(rf"(?<![\w.-]){re.escape(old)}(?![\w.-])", new, text)
    return text


def run_page(path: Path, workdir: Path, run: PageRun) -> PageRun:
    """Run a page's blocks in order, in ``workdir``, recording into ``run`` (which keeps
    what it has when a block fails, for the cleanup). Raises DocError naming the block
    that failed."""
    page_blocks = blocks(path)
    refused = [f"{b.where}: {cmd!r}: {why}" for b in page_blocks
               if b.lang in ("bash", "sh") and b.not_run is None
               for cmd in commands(b) if (why := refusal(cmd))]
    if refused:  # before anything of the page runs
        raise DocError("commands the docs test does not run (add `<!-- not run: REASON "
                       "-->` before a block that cannot run here):\n" + "\n".join(refused))
    names = rename_namespaces(page_blocks)
    run.namespaces |= set(names.values())
    env = environment()
    last_command: Block | None = None
    unused_files: list[Block] = []  # file blocks written since the last command ran

    def command_block(b: Block, again: bool = False) -> None:
        nonlocal unused_files
        if again:  # say so in the list of what ran
            run.ran[-len(unused_files):] = [f"{entry}, run by :{b.line} again"
                                           for entry in run.ran[-len(unused_files):]]
        for cmd in commands(b):
            run_command(cmd, b, workdir, env, run)
        unused_files = []

    for b in page_blocks:
        if b.not_run is not None or b.lang not in RUN:
            if b.lang == "json" and b.not_run is None:
                try:  # a sample of a documented format must at least be one
                    json.loads(b.text)
                except ValueError as e:
                    raise DocError(f"{b.where}: the json block does not parse: {e}") from e
            continue
        text = _renamed(b, names)
        if b.file_name:
            (workdir / b.file_name).write_text(text)
            unused_files.append(b)
            run.ran.append(f"{b.where} file {b.file_name}")
            continue
        if unused_files and b.lang == "python" and last_command is not None:
            command_block(last_command, again=True)  # the files above are for it
        if b.lang == "python":
            script = workdir / f"block_L{b.line}.py"
            script.write_text(text)
            _run([sys.executable, script.name], b, workdir, env, run, shown=text)
        else:
            cmds = commands(Block(b.page, b.line, b.lang, text, None))
            if not cmds:
                continue  # install steps only
            last_command = Block(b.page, b.line, b.lang, text, None)
            command_block(last_command)
        run.ran.append(f"{b.where} {b.lang}")
    if unused_files:
        if last_command is None:
            raise DocError(f"{unused_files[0].where}: file {unused_files[0].file_name} is "
                           f"used by no command of the page")
        command_block(last_command, again=True)
    return run


def _words(cmd: str) -> list[str]:
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)  # drops comments
    lexer.whitespace_split = True  # words as the shell splits them, operators apart
    return list(lexer)


def refusal(cmd: str) -> str | None:
    """Why the harness will not run ``cmd``, or None. Every program it starts must be in
    PROGRAMS (and in the tests' environment, when named by a path); `python -m` only
    runs PYTHON_MODULES; nothing is written outside the working directory; no command
    substitution (which could start anything)."""
    if "$(" in cmd or "`" in cmd:
        return "command substitution"
    words = _words(cmd)
    shell = _needs_shell(words)
    argv: list[str] = []
    for i, w in enumerate([*words, ";"]):
        if i and words[i - 1] in _REDIRECTS:
            if w not in _READABLE and (w.startswith(("/", "~")) or ".." in Path(w).parts):
                return f"a redirection outside the working directory: {words[i - 1]} {w}"
            continue
        if w in _REDIRECTS:
            continue
        if not set(w) <= _OPERATORS:
            if argv or not re.match(r"^[A-Za-z_]\w*=", w):  # VAR=value before a program
                argv.append(w)
            continue
        if argv and (why := _program_refusal(argv, shell)):  # an operator ends a command
            return why
        argv = []
    return None


def _program_refusal(argv: list[str], shell: bool) -> str | None:
    if shell and _server(argv):
        return "a server runs until Ctrl-C: write it as a command of its own, with no " \
               "pipe, redirection or `&&`"
    program = Path(argv[0])
    if program.name not in PROGRAMS:
        return f"{program.name!r} is not among the programs the docs test runs"
    if len(program.parts) > 1 and program.parent != BIN:
        return f"{argv[0]!r} is not the tests' environment's (write .venv/bin/{program.name})"
    if program.name.startswith("python") and "-c" not in argv:
        if "-m" in argv:
            module = argv[argv.index("-m") + 1] if argv[-1] != "-m" else ""
            if module not in PYTHON_MODULES:
                return f"`python -m {module}` is not among the modules the docs test runs"
        elif any(a.startswith("/") or ".." in Path(a).parts for a in argv[1:2]):
            return f"{argv[1]!r} is not a script of the page's directory"
    return None


def _needs_shell(words: list[str]) -> bool:
    """Pipes, redirections, `&&`, variables, globs: the shell's business."""
    return any(set(w) <= _OPERATORS or _EXPANSIONS & set(w) for w in words)


def _server(argv: list[str]) -> str | None:
    """`gunicorn` for `gunicorn ...` or `python -m gunicorn ...`: a server, or None."""
    program = Path(argv[0]).name
    if program.startswith("python") and "-m" in argv[:-1]:
        program = argv[argv.index("-m") + 1]
    return program if program in SERVERS else None


def run_command(cmd: str, b: Block, workdir: Path, env: dict[str, str], run: PageRun) -> None:
    words = _words(cmd)
    if _needs_shell(words):
        _run(["bash", "-o", "pipefail", "-c", cmd], b, workdir, env, run, shown=cmd)
        return
    cmd_env = dict(env)
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        k, v = words.pop(0).split("=", 1)
        cmd_env[k] = v
    if server := _server(words):
        serve(words, server, b, workdir, cmd_env, run, shown=cmd)
    else:
        _run(words, b, workdir, cmd_env, run, shown=cmd)


def _run(argv: list[str], b: Block, workdir: Path, env: dict[str, str], run: PageRun,
         shown: str) -> None:
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    run.pids.add(proc.pid)
    try:
        out, _ = proc.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise DocError(f"{b.where}: still running after {SCRIPT_TIMEOUT:.0f} s:\n{shown}\n"
                       f"--- output ---\n{out}") from None
    run.output.append(out)
    if proc.returncode != 0:
        raise DocError(f"{b.where}: exit status {proc.returncode}:\n{shown}\n"
                       f"--- output ---\n{out}")


def _get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (sig - 1) & 1)


def _gunicorn_has_control_socket() -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(setting.name == "control_socket" for setting in KNOWN_SETTINGS)


def serve(argv: list[str], program: str, b: Block, workdir: Path, env: dict[str, str],
          run: PageRun, shown: str) -> None:
    """Start a server command as written, on a free port of 127.0.0.1 (through the
    server's own environment settings, so the command stays as written); it must answer
    `GET /` with 200 SERVER_REQUESTS times, then stop on Ctrl-C (SIGINT) with status 0."""
    port = free_port()
    env = dict(env)
    ctl_dir = Path(tempfile.mkdtemp(prefix="docs-ctl-"))  # short: a socket path has a limit
    control = ctl_dir / "gunicorn.ctl"
    if program == "gunicorn":
        # A control socket of its own: gunicorn >= 24 opens one path for every server of
        # a user by default, which parallel runs would fight over. gunicorn opens it once
        # it has forked its first workers, which tells when they all exist.
        flags = f"--control-socket {control}" if _gunicorn_has_control_socket() else ""
        env["GUNICORN_CMD_ARGS"] = f"--bind 127.0.0.1:{port} {flags}"
    else:
        env.update(UVICORN_HOST="127.0.0.1", UVICORN_PORT=str(port))
    log_path = workdir / f"server-L{b.line}-{port}.log"
    proc = spawn_in_session(argv, log_path, cwd=workdir, env=env)
    run.pids.add(proc.pid)

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def alive() -> None:
        if proc.poll() is not None:
            raise DocError(f"{b.where}: {shown!r} exited with {proc.returncode} before "
                           f"serving:\n{log_text()}")

    def answered() -> tuple[int, bytes] | None:
        alive()
        try:
            return _get(port)
        except OSError:
            return None

    def workers_ready() -> bool:
        """Every worker gunicorn started has its own signal handlers: the master's, which
        a worker inherits (SIGHUP's among them), are gone, and its own stop handler
        (SIGQUIT's) is in place. A worker still booting ignores Ctrl-C, and the master
        would then wait out graceful_timeout for it."""
        alive()
        if program != "gunicorn" or not _gunicorn_has_control_socket():
            return True
        workers = children(proc.pid)
        return control.exists() and bool(workers) and all(
            _catches(w, signal.SIGQUIT) and not _catches(w, signal.SIGHUP) for w in workers)

    try:
        answers = [wait_for(answered, 30, f"{shown!r} to serve")]
        answers += [_get(port) for _ in range(SERVER_REQUESTS - 1)]
        bad = [(status, body[:200]) for status, body in answers if status != 200]
        if bad:
            raise DocError(f"{b.where}: {shown!r} answered GET / with {bad}\n{log_text()}")
        wait_for(workers_ready, 30, f"the workers of {shown!r} to finish booting")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the whole process group
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise DocError(f"{b.where}: {shown!r} did not stop on Ctrl-C:\n"
                           f"{log_text()}") from None
        if rc != 0:
            raise DocError(f"{b.where}: {shown!r} stopped with status {rc}:\n{log_text()}")
    finally:
        kill_session(proc)
        shutil.rmtree(ctl_dir, ignore_errors=True)
        run.output.append(log_text())


def shmctx_namespaces() -> set[str]:
    """The namespaces that have anything in /dev/shm now."""
    found = set()
    for entry in os.listdir(_shm.SHM_DIR):
        name = entry.removeprefix("sem.")
        if name.startswith(_shm.PREFIX):
            found.add(name[len(_shm.PREFIX):].split("@", 1)[0])
    return found


def leftovers(run: PageRun, before: set[str]) -> dict[str, list[str]]:
    """What the page left in /dev/shm: objects of the namespaces it named; of a namespace
    named after a process it started (`gunicorn-<pid>`, `pytest-<pid>-<hex>`); of the
    default namespace; and of any namespace made while it ran that its output names
    (`python -m shmctx demo` prints its own). Other tests running at the same time make
    namespaces of their own, which none of these rules matches."""
    printed = "\n".join(run.output)
    pids = {str(p) for p in run.pids}

    def is_mine(ns: str) -> bool:
        return (ns in run.namespaces or ns == "default"
                or bool(pids & set(ns.split("-")))
                or (ns not in before
                    and re.search(rf"(?<![\w.-]){re.escape(ns)}(?![\w.-])", printed) is not None))

    mine = {ns for ns in shmctx_namespaces() if is_mine(ns)}
    return {ns: objs for ns in sorted(mine) if (objs := _shm.namespace_objects(ns))}
