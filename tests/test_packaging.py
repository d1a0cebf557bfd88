"""What a user installs: the wheel holds the package and nothing else, and the package installs over
itself (plain, editable, plain) in one environment and imports each time.

Both build from a copy of this checkout without its build/ and egg-info folders (setuptools leaves
stale files there that a later build would pick up); its __pycache__ folders come along, so that the
wheel is shown to leave them out.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUBPACKAGES = ("backend", "benchmarks", "cli", "kernels", "kernels/cpu", "kernels/cuda", "kernels/cuda/host",
               "kernels/cuda/host/include", "model")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the checkout, as pip sees a fresh clone (plus whatever __pycache__ the checkout has)."""
    copy = tmp_path_factory.mktemp("source") / "deltaprop"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "dist", ".benchmarks",
                                                              ".pytest_cache", ".hypothesis"))
    return copy


def pip(python, *args, cwd=None):
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, cwd=cwd,
                   timeout=900)


@pytest.fixture(scope="module")
def wheel_files(source, tmp_path_factory):
    """The names of the files in the wheel that `pip wheel . --no-deps` builds."""
    folder = tmp_path_factory.mktemp("wheel")
    pip(sys.executable, "wheel", ".", "--no-deps", "-w", str(folder), cwd=source)
    (wheel,) = folder.glob("deltaprop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.mark.slow
def test_the_wheel_holds_no_tests_scripts_or_caches(wheel_files):
    package = [name for name in wheel_files if not name.startswith("deltaprop-")]  # less the .dist-info
    assert package and all(name.startswith("deltaprop/") for name in package), package
    parts = [pathlib.PurePosixPath(name) for name in package]
    assert not [p for p in parts if p.name.startswith("test_") or p.name == "conftest.py" or "tests" in p.parts]
    assert not [p for p in parts if p.suffix in (".sh", ".pyc", ".nbi", ".nbc", ".png") or "__pycache__" in p.parts]
    assert {p.suffix for p in parts} == {".py", ".cu", ".cuh", ".h", ".cpp", ".json", ".typed"}  # .h/.cpp: the host harness


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_package(wheel_files):
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.cu", "*.cuh", "*.h", "*.cpp", "py.typed",
                              "benchmarks/bench_schema.json"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    shipped = {name.removeprefix("deltaprop/") for name in wheel_files}
    expected = {path for path in tracked
                if os.path.dirname(path) in ("", *SUBPACKAGES) and not os.path.basename(path).startswith("test_")}
    assert expected - shipped == set()
    assert {"__main__.py", "cli/__init__.py", "py.typed", "benchmarks/bench_schema.json"} <= shipped
    metadata = {pathlib.PurePosixPath(name).name for name in wheel_files if ".dist-info/" in name}
    assert {"LICENSE", "entry_points.txt", "METADATA"} <= metadata


@pytest.mark.slow
def test_the_wheel_ships_the_estimators_folder_as_deltaprop_sklearn(wheel_files):
    """estimators/ is installed as deltaprop.sklearn (a root file sklearn.py would shadow scikit-learn)."""
    sources = sorted((ROOT / "estimators").glob("*.py"))
    assert sources, "the estimators/ folder holds no module"
    shipped = {name for name in wheel_files if name.startswith("deltaprop/sklearn/")}
    assert shipped == {f"deltaprop/sklearn/{path.name}" for path in sources}


def numba_cache_files(folder):
    return sorted(path for path in folder.rglob("*") if path.suffix in (".nbi", ".nbc"))


def site_packages(venv):
    return pathlib.Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.mark.slow
def test_the_package_installs_over_itself_plain_editable_plain(source, tmp_path):
    """README order: `pip install .` and a first use, then `pip install -e .`, then `pip install .` again."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # each import runs in a folder of its own, so that `deltaprop` cannot come from the current folder; no
    # cache variable set: the kernels go to the per-user default, here a fresh folder under tmp_path
    env = {name: value for name, value in os.environ.items() if name not in ("NUMBA_CACHE_DIR", "DELTAPROP_CACHE_DIR")}
    env.update(PYTHONPATH="", XDG_CACHE_HOME=str(tmp_path / "user-cache"))
    use = ("import deltaprop, deltaprop.kernels.activations, numpy as np; from deltaprop.model import MLP; "
           "net = MLP([4, 3], backend='numba', seed=0); "
           "net.train_step(np.ones((2, 4), np.float32), np.array([0, 2]), lr=0.1); print(deltaprop.__file__)")
    where = "import deltaprop, deltaprop.kernels.activations, deltaprop.cli; print(deltaprop.__file__)"
    expected = {"plain": site_packages(venv) / "deltaprop" / "__init__.py", "editable": source / "__init__.py"}
    for step, (kind, code) in enumerate([("plain", use), ("editable", where), ("plain", where)]):
        pip(python, "install", *(["-e"] if kind == "editable" else []), str(source), cwd=tmp_path)
        imported = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                                  timeout=600)
        assert imported.returncode == 0, f"step {step} ({kind}): {imported.stderr}"
        assert pathlib.Path(imported.stdout.strip()) == expected[kind], f"step {step} ({kind})"
        if step == 0:  # the first use compiled into the per-user cache, and left nothing in the package
            assert numba_cache_files(tmp_path / "user-cache" / "deltaprop") != []
            assert numba_cache_files(site_packages(venv) / "deltaprop") == []


# Run in a child: hides HIDDEN (an import raises ModuleNotFoundError, importlib.util.find_spec finds
# nothing), then collects the test folder given.
COLLECT_WITHOUT = """
import importlib.util, sys, pytest
HIDDEN = {hidden!r}
class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide)
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.partition(".")[0] in HIDDEN else find_spec(name, *a)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", sys.argv[1]]))
"""


def test_the_suite_is_collected_without_the_optional_test_packages():
    """A device image has pytest but perhaps none of the test extra's other packages: every test module
    must still be collected (a module-level import of one stops `pytest -m gpu` at collection)."""
    hidden = {"jsonschema", "hypothesis", "sklearn", "mypy", "torch", "jax", "matplotlib", "mpi4py"}
    done = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT.format(hidden=hidden), str(ROOT / "tests")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
