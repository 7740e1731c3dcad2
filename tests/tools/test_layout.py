"""The layout rules of ``tools/check_layout.py`` hold on ``src/`` and catch each kind of break."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _checker():
    path = ROOT / "tools" / "check_layout.py"
    spec = importlib.util.spec_from_file_location("check_layout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checker():
    return _checker()


def test_the_source_tree_keeps_the_layout(checker):
    assert checker.check(ROOT / "src") == []


def _planted(tmp_path: Path, relpath: str, code: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "pbrf", src / "pbrf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.npz", "*.gz", "*.toml"))
    path = src / relpath
    path.write_text(path.read_text(encoding="utf-8") + "\n" + code + "\n", encoding="utf-8")
    return src


@pytest.mark.parametrize("relpath, code, needle", [
    # an upward import: analysis (layer 2) imports the run layer (4)
    ("pbrf/experiment/analysis/decomposition.py", "from pbrf.experiment.run import store",
     "imports must point downward"),
    # the library imports the experiment layer
    ("pbrf/problem.py", "from pbrf.experiment.run.store import Store",
     "imports must point downward"),
    # studies and bench are one layer: neither imports the other
    ("pbrf/experiment/bench/evaluate.py", "from pbrf.experiment.studies import sweep",
     "imports must point downward"),
    # a function-level import of an own module
    ("pbrf/experiment/run/store.py", "def f():\n    from pbrf import kinds\n    return kinds",
     "inside a function"),
    # a private name crossing a module, imported and as an attribute
    ("pbrf/experiment/run/store.py", "from pbrf.experiment.config.schema import _fail",
     "private name _fail"),
    ("pbrf/experiment/run/store.py", "import pbrf.fileio as fio\nX = fio._umask",
     "private name _umask"),
    # a long function
    ("pbrf/stats.py", "def long():\n" + "    x = 1\n" * 60 + "    return x",
     "stats.long is 62 lines"),
])
def test_each_break_is_reported(checker, tmp_path, relpath, code, needle):
    errors = checker.check(_planted(tmp_path, relpath, code))
    assert any(needle in e for e in errors), errors


def test_an_import_cycle_is_reported(checker, tmp_path):
    src = _planted(tmp_path, "pbrf/stats.py", "from pbrf import tasks")
    (src / "pbrf" / "tasks.py").write_text(
        (src / "pbrf" / "tasks.py").read_text(encoding="utf-8") + "\nfrom pbrf import stats\n",
        encoding="utf-8")
    errors = checker.check(src)
    assert any(e.startswith("import cycle:") and "pbrf.stats" in e and "pbrf.tasks" in e
               for e in errors), errors


def test_ray_and_kronfluence_may_be_imported_lazily(checker, tmp_path):
    src = _planted(tmp_path, "pbrf/stats.py", "def f():\n    import ray\n    return ray")
    assert not any("pbrf/stats.py" in e for e in checker.check(src))
