"""The mutation run: switch each named defence off in a scratch copy and check that its tests fail.

    python tests/mutations/run.py            # every mutation, 2 at a time
    python tests/mutations/run.py --list     # what is in the catalogues
    python tests/mutations/run.py --only e2e-root-without-dh -j 1
    python tests/mutations/run.py --each     # every named test must fail on its own

Every ``catalog_*.py`` beside this file is imported; each defines
``MUTATIONS: list[Mutation]`` (model.py).  Before anything runs, every entry is
checked: names unique, the file present, ``find`` present exactly once, tests
named.  Then each mutation is applied to its own copy of the repository (the
files git knows about, or a copy without .git and virtual environments) and
``python -m pytest -q -x -p no:cacheprovider <its tests>`` runs there under a time
limit (with ``--each``, every named test runs on its own and each must fail).  Results:

- ``killed``: the tests failed (or hung past the limit): the defence is proven.
- ``SURVIVED``: the tests passed with the defence switched off.
- ``ERROR``: the tests could not run (collection error, unknown node id).

The exit status is 0 only if every mutation was killed and every entry was valid.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))  # catalogues import the Mutation record as `from model import Mutation`

DEFAULT_JOBS = 2
DEFAULT_TIMEOUT_S = 180.0
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    ".ci-venv",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "*.pyc",
    "secureim-data",
    "bench/results",
)
FIELDS = ("name", "file", "find", "replace", "tests", "why")
# pytest exit codes (pytest.ExitCode): 0 passed, 1 tests failed; anything else means the tests did not run.
PYTEST_OK, PYTEST_FAILED = 0, 1


@dataclass
class Outcome:
    name: str
    result: str  # killed | SURVIVED | ERROR
    seconds: float
    detail: str = ""


# =============================================================================
# Catalogues
# =============================================================================
def load_catalogues(folder: Path = HERE) -> tuple[list, list[str]]:
    """Every mutation of every catalog_*.py, and the problems found while loading them."""
    mutations, problems = [], []
    for path in sorted(folder.glob("catalog_*.py")):
        spec = importlib.util.spec_from_file_location(f"_secureim_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken catalogue is reported, not a crash
            problems.append(f"{path.name}: cannot be imported: {exc!r}")
            continue
        entries = getattr(module, "MUTATIONS", None)
        if not isinstance(entries, (list, tuple)):
            problems.append(f"{path.name}: defines no MUTATIONS list")
            continue
        for entry in entries:
            # Duck-typed: a catalogue may import Mutation under another module path.
            if not all(hasattr(entry, f) for f in FIELDS):
                problems.append(f"{path.name}: {entry!r} is not a Mutation")
                continue
            mutations.append((path.name, entry))
    return mutations, problems


def validate(mutations: list, root: Path = ROOT) -> list[str]:
    """Everything wrong with the catalogue entries (an empty list if nothing is)."""
    problems, seen = [], {}
    for catalogue, m in mutations:
        where = f"{catalogue}: {m.name}"
        if m.name in seen:
            problems.append(f"{where}: the name is also used in {seen[m.name]}")
        seen[m.name] = catalogue
        if not m.tests or isinstance(m.tests, str):
            problems.append(f"{where}: names no tests (a tuple of pytest node ids is expected)")
        if m.find == m.replace:
            problems.append(f"{where}: replace equals find (nothing is switched off)")
        path = root / m.file
        if not path.is_file():
            problems.append(f"{where}: {m.file} does not exist")
            continue
        source = path.read_text(encoding="utf-8")
        count = source.count(m.find)
        if count != 1:
            problems.append(f"{where}: find text occurs {count} times in {m.file} (exactly once is required)")
        elif m.file.endswith(".py"):
            try:  # a find that matches inside a deeper-indented line leaves a file that cannot run
                compile(source.replace(m.find, m.replace, 1), m.file, "exec")
            except SyntaxError as exc:
                problems.append(
                    f"{where}: the mutated {m.file} does not compile ({exc.msg}, line {exc.lineno})"
                )
        for test in m.tests:
            test_file = test.split("::", 1)[0]
            if not (root / test_file).is_file():
                problems.append(f"{where}: test file {test_file} does not exist")
    return problems


# =============================================================================
# Scratch copies
# =============================================================================
def repository_files(root: Path) -> list[str] | None:
    """Files git tracks plus untracked ones it does not ignore (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def make_copy(root: Path, files: list[str] | None, dest: Path) -> None:
    if files is None:
        shutil.copytree(root, dest, ignore=COPY_IGNORE, symlinks=True)
        return
    for name in files:
        src = root / name
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def apply(copy_root: Path, m) -> None:
    path = copy_root / m.file
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(m.find, m.replace, 1), encoding="utf-8")


# =============================================================================
# Running
# =============================================================================
def run_tests(copy_root: Path, tests, timeout_s: float) -> tuple[int | None, str]:
    """(pytest's exit status or None on timeout, the tail of its output)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(
        cmd,
        cwd=copy_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the tests and anything they started
        out, _ = proc.communicate()
        return None, (out or "")[-3000:]


def run_one(
    m, root: Path, files: list[str] | None, timeout_s: float, *, mutate: bool = True, each: bool = False
) -> Outcome:
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"secureim-mut-{m.name}-"))
    try:
        copy_root = scratch / "repo"
        make_copy(root, files, copy_root)
        if mutate:
            apply(copy_root, m)
        if each:  # every named test on its own: each one must fail
            survivors = []
            for test in m.tests:
                status, tail = run_tests(copy_root, (test,), timeout_s)
                if status not in (None, PYTEST_FAILED):
                    survivors.append(
                        f"{test}: pytest exit status {status}\n{tail if status != PYTEST_OK else ''}"
                    )
            seconds = time.monotonic() - t0
            return Outcome(m.name, "SURVIVED" if survivors else "killed", seconds, "\n".join(survivors))
        status, tail = run_tests(copy_root, m.tests, timeout_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - t0
    if status is None:
        return Outcome(m.name, "killed", seconds, f"timed out after {timeout_s:.0f} s")
    if status == PYTEST_OK:
        return Outcome(m.name, "SURVIVED" if mutate else "passed", seconds)
    if status == PYTEST_FAILED:
        return Outcome(m.name, "killed" if mutate else "FAILED", seconds, tail)
    return Outcome(m.name, "ERROR", seconds, f"pytest exit status {status}\n{tail}")


def print_table(outcomes: list[Outcome]) -> None:
    width = max([len("mutation")] + [len(o.name) for o in outcomes])
    print(f"{'mutation':<{width}}  {'result':<8}  {'seconds':>7}")
    for o in outcomes:
        print(f"{o.name:<{width}}  {o.result:<8}  {o.seconds:7.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Switch each named defence off and check that its tests fail.")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this mutation (repeatable, or comma-separated)",
    )
    p.add_argument(
        "-j", "--jobs", type=int, default=DEFAULT_JOBS, help=f"mutations at once (default {DEFAULT_JOBS})"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per mutation's tests (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the end of each killed mutation's test output (why it was killed)",
    )
    p.add_argument(
        "--each",
        action="store_true",
        help="run every named test on its own and require each to fail (slower; checks the "
        "claims in docs/SECURITY.md, where each listed test is cited as a proof)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="instead: run each entry's tests on an unmutated copy (they must pass)",
    )
    args = p.parse_args(argv)

    mutations, problems = load_catalogues()
    problems += validate(mutations)
    if args.list:
        for catalogue, m in mutations:
            print(f"{m.name}  [{catalogue}: {m.file}]\n    {m.why}\n    tests: {' '.join(m.tests)}")
        print(f"{len(mutations)} mutations in {len({c for c, _ in mutations})} catalogues")
    for problem in problems:
        print(f"catalogue problem: {problem}", file=sys.stderr)
    if args.list:
        return 1 if problems else 0

    wanted = {name for item in args.only for name in item.split(",") if name}
    unknown = wanted - {m.name for _, m in mutations}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    selected = [m for _, m in mutations if not wanted or m.name in wanted]
    files = repository_files(ROOT)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(
            pool.map(
                lambda m: run_one(
                    m,
                    ROOT,
                    files,
                    args.timeout,
                    mutate=not args.baseline,
                    each=args.each and not args.baseline,
                ),
                selected,
            )
        )
    elapsed = time.monotonic() - t0
    print_table(outcomes)
    bad = [o for o in outcomes if o.result not in ("killed", "passed")]
    for o in outcomes if args.verbose else bad:
        print(f"\n--- {o.name}: {o.result}\n{o.detail}".rstrip())
    counts = {
        r: sum(o.result == r for o in outcomes) for r in ("killed", "SURVIVED", "ERROR", "passed", "FAILED")
    }
    summary = ", ".join(f"{n} {r.lower()}" for r, n in counts.items() if n)
    print(
        f"\n{len(outcomes)} mutations{' (baseline)' if args.baseline else ''}: {summary or 'none run'}; "
        f"{len(problems)} catalogue problems; {elapsed:.0f} s with -j {args.jobs}"
    )
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
