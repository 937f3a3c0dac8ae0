"""Packaging: what an sdist and a wheel carry, what the extras declare, and how an installed (not
editable) package finds its C++ sources and its git commit. Metadata only: nothing is compiled."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# imports whose distribution has another name, or that no import shows
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "torch.utils.tensorboard": "tensorboard"}
BUILT = (".so", ".pyc", ".o")
UNDECLARED = {"wandb", "inf_cl"}  # named in their own messages: --wandb, the Inf-CL bench contender


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tree as a user's checkout has it (a built `_C`, bytecode), run through egg_info (the sdist's
    file list) and build_py (the wheel's package files) without the extension build."""
    tree = tmp_path_factory.mktemp("pkg")
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for name in (".ci", "csrc", "tests", "benchmarks", "wmkernels"):
        shutil.copytree(ROOT / name, tree / name)
    (tree / "wmkernels" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tree / "tests" / "__pycache__").mkdir(exist_ok=True)
    (tree / "tests" / "__pycache__" / "conftest.cpython-311.pyc").write_bytes(b"")
    env = {**os.environ, "WMKERNELS_BUILD_EXT": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "build_py", "--build-lib", "lib"], cwd=tree,
                   env=env, check=True, capture_output=True, timeout=120)
    sdist = set((tree / "wmkernels.egg-info" / "SOURCES.txt").read_text().split())
    wheel = {p.relative_to(tree / "lib").as_posix() for p in (tree / "lib").rglob("*") if p.is_file()}
    return sdist, wheel


def test_sdist_has_the_sources_and_what_the_tests_read(built):
    sdist, _ = built
    needed = [p.relative_to(ROOT).as_posix() for d in ("csrc", "tests", "benchmarks")
              for p in (ROOT / d).rglob("*") if p.is_file() and not p.name.endswith(BUILT)]
    assert "tests/conftest.py" in needed and "csrc/binding.cpp" in needed
    assert not [p for p in needed if p not in sdist]
    assert not [p for p in sdist if p.endswith(BUILT)]


def test_wheel_ships_csrc_inside_the_package_and_no_stray_files(built):
    _, wheel = built
    csrc = {"wmkernels/csrc/" + p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*")
            if p.is_file()}
    assert "wmkernels/csrc/binding.cpp" in csrc and csrc <= wheel
    assert not [p for p in wheel if not p.startswith("wmkernels/") or p.endswith(BUILT)]


def _load_ext(pkg: Path):
    shutil.copy(ROOT / "wmkernels" / "_ext.py", pkg / "_ext.py")
    spec = importlib.util.spec_from_file_location("wmkernels_installed_ext", pkg / "_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_installed_package_builds_from_its_own_csrc(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    pkg = tmp_path / "site-packages" / "wmkernels"
    (pkg / "csrc" / "cpu").mkdir(parents=True)
    (pkg / "csrc" / "binding.cpp").write_text("")
    (pkg / "csrc" / "cpu" / "mse.cpp").write_text("")
    ext = _load_ext(pkg)
    assert ext.cpu_sources() == [str(pkg / "csrc" / "cpu" / "mse.cpp"), str(pkg / "csrc" / "binding.cpp")]
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["sources"]))
    with caplog.at_level("WARNING", logger="wmkernels"):
        ext._jit_build()
    assert built == [ext.cpu_sources()]
    assert "just in time" in caplog.text  # visible by default: the first call stalls for minutes
    shutil.rmtree(pkg / "csrc")
    with pytest.raises(ImportError, match="sources are not at"):
        _load_ext(pkg)._jit_build()


def test_installed_bench_does_not_report_the_enclosing_repos_commit(tmp_path, monkeypatch):
    """A venv inside the user's own git repo (project/.venv) must not lend its commit to results.json."""
    import wmkernels.bench.__main__ as bench

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "user's project"], check=True)
    site = tmp_path / ".venv" / "lib" / "site-packages"
    (site / "wmkernels" / "bench").mkdir(parents=True)
    monkeypatch.setattr(bench, "__file__", str(site / "wmkernels" / "bench" / "__main__.py"))
    monkeypatch.delenv("WMKERNELS_GIT_COMMIT", raising=False)
    assert bench._git_commit() is None


def _imported_distributions() -> set[str]:
    found = set()
    for path in (ROOT / "wmkernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name in DISTRIBUTION or top in DISTRIBUTION:
                    found.add(DISTRIBUTION.get(name, DISTRIBUTION.get(top)))
                elif top not in sys.stdlib_module_names and top not in ("wmkernels", "torch"):
                    found.add(top)
    return found - UNDECLARED


def test_extras_declare_exactly_what_the_package_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs):
        return {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}

    declared = names(project["dependencies"]) | set().union(*(names(v) for k, v in extras.items() if k != "test"))
    imported = _imported_distributions()
    assert not imported - declared, "imported but in no dependency or extra"
    assert not (names(extras["train"]) | names(extras["video"])) - imported, "declared but never imported"
    assert isinstance(project["license"], str)  # SPDX: the table form is deprecated in setuptools
