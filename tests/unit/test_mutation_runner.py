"""The mutation runner itself: catalogues valid, bad entries refused, a survivor reported as one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
sys.path.insert(0, str(ROOT / "tests" / "mutations"))

import run as runner
from model import Mutation


def test_every_catalogue_entry_applies_exactly_once():
    mutations, problems = runner.load_catalogues()
    assert problems == []
    assert runner.validate(mutations) == []
    assert len(mutations) >= 30
    assert {
        "e2e-root-without-dh",
        "e2e-skipped-key-not-deleted",
        "auth-dummy-bcrypt-for-unknown-users",
        "server-puzzle-source-binding",
        "client-reply-deadline",
    } <= {m.name for _c, m in mutations}


def _fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "guard.py").write_text("def allowed(x):\n    return x > 0\n")
    (repo / "tests" / "test_guard.py").write_text(
        "import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parent.parent))\n"
        "import guard\n\ndef test_refuses_zero():\n    assert not guard.allowed(0)\n\n"
        "def test_weak():\n    assert guard.allowed(5)\n"
    )
    return repo


def test_validation_refuses_duplicates_missing_and_repeated_find_text(tmp_path):
    repo = _fake_repo(tmp_path)
    good = Mutation("m", "guard.py", "x > 0", "True", ("tests/test_guard.py",), "why")
    entries = [
        ("catalog_a.py", good),
        ("catalog_b.py", good),
        ("catalog_a.py", Mutation("gone", "guard.py", "x >= 0", "True", ("tests/test_guard.py",), "")),
        ("catalog_a.py", Mutation("twice", "guard.py", "x", "y", ("tests/test_guard.py",), "")),
        ("catalog_a.py", Mutation("no-file", "nope.py", "x", "y", ("tests/test_guard.py",), "")),
        ("catalog_a.py", Mutation("no-tests", "guard.py", "return", "return", (), "")),
        # matched inside a deeper line, the replacement leaves a file that cannot run: the
        # tests would fail on the import and "kill" a mutation that switched nothing off
        (
            "catalog_a.py",
            Mutation(
                "bad-indent",
                "guard.py",
                "return x > 0\n",
                "return True\n        pass\n",
                ("tests/test_guard.py",),
                "",
            ),
        ),
    ]
    problems = "\n".join(runner.validate(entries, root=repo))
    assert "also used in catalog_a.py" in problems
    assert "gone: find text occurs 0 times" in problems
    assert "twice: find text occurs 2 times" in problems
    assert "no-file: nope.py does not exist" in problems
    assert "no-tests: names no tests" in problems and "replace equals find" in problems
    assert "bad-indent: the mutated guard.py does not compile" in problems
    assert "m: the mutated" not in problems


def test_killed_survived_and_error_are_told_apart(tmp_path):
    repo = _fake_repo(tmp_path)
    files = ["guard.py", "tests/test_guard.py"]
    killed = Mutation("k", "guard.py", "x > 0", "True", ("tests/test_guard.py::test_refuses_zero",), "")
    survivor = Mutation("s", "guard.py", "x > 0", "x > 1", ("tests/test_guard.py::test_weak",), "")
    broken = Mutation("e", "guard.py", "x > 0", "x >", ("tests/test_guard.py",), "")
    assert runner.run_one(killed, repo, files, 60).result == "killed"
    assert runner.run_one(survivor, repo, files, 60).result == "SURVIVED"
    assert runner.run_one(broken, repo, files, 60).result == "ERROR"
    assert runner.run_one(killed, repo, files, 60, mutate=False).result == "passed"
    assert (repo / "guard.py").read_text().count("x > 0") == 1  # the repository itself is never touched


@pytest.mark.parametrize("args", [["--list"], ["--only", "no-such-mutation"]])
def test_command_line(args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mutations" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if args == ["--list"]:
        assert proc.returncode == 0 and "e2e-root-without-dh" in proc.stdout
    else:
        assert proc.returncode == 2 and "unknown mutation" in proc.stderr
