"""Where compiled CPU kernels are cached (never inside the package), `deltaprop cache` and `deltaprop warmup`,
and what the warm-up compiles."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

numba = pytest.importorskip("numba")
from numba.core import caching, config  # noqa: E402

import deltaprop  # noqa: E402
from deltaprop.backend import get_backend  # noqa: E402
from deltaprop.cli import main  # noqa: E402
from deltaprop.kernels import cache  # noqa: E402

PACKAGE = Path(deltaprop.__file__).resolve().parent


def numba_cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc"))


def run_python(code, env_updates, check=True):
    """``code`` in a new interpreter with these environment variables (None removes one)."""
    env = {**os.environ, **{k: v for k, v in env_updates.items() if v is not None}}
    for name in [k for k, v in env_updates.items() if v is None]:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          check=check)


@pytest.fixture
def fresh_location(monkeypatch):
    """No cache variable set and the key recomputed; restored afterwards."""
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setattr(config, "CACHE_DIR", "")
    cache.cache_key.cache_clear()
    yield
    cache.cache_key.cache_clear()


# ---- the location rules ------------------------------------------------------------------------------


def test_deltaprop_cache_dir_wins_over_numba_cache_dir(fresh_location, monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "ours"))
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "numba"))
    location = cache.cache_location()
    assert location.origin == "DELTAPROP_CACHE_DIR"
    assert location.path == tmp_path / "ours" / cache.cache_key()


def test_numba_cache_dir_puts_the_kernels_where_numba_would(fresh_location, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    provided = getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator
    from deltaprop.kernels.cpu import step

    numba_says = provided(step.small_dense.py_func, step.__file__).get_cache_path()
    assert cache.cache_location() == cache.CacheLocation(Path(numba_says), "NUMBA_CACHE_DIR", Path(numba_says))


@pytest.mark.parametrize("platform, environ, expected", [
    ("linux", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/deltaprop"),
    ("linux", {}, "~/.cache/deltaprop"),
    ("linux", {"XDG_CACHE_HOME": "relative/ignored"}, "~/.cache/deltaprop"),
    ("darwin", {"XDG_CACHE_HOME": "/xdg"}, "~/Library/Caches/deltaprop"),
    ("win32", {"LOCALAPPDATA": "/appdata/local"}, "/appdata/local/deltaprop/Cache"),
])
def test_the_per_user_default_of_each_platform(fresh_location, monkeypatch, tmp_path, platform, environ, expected):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert cache.user_cache_root() == Path(expected.replace("~", str(tmp_path)))
    monkeypatch.setattr(sys, "platform", "linux")  # cache_location itself on this machine's rules
    location = cache.cache_location()
    assert location.origin == "per-user default"
    assert location.path.parent == cache.user_cache_root()


def test_the_key_names_the_versions_and_the_cpu(fresh_location):
    import llvmlite.binding

    key = cache.cache_key()
    cpu = config.CPU_NAME or llvmlite.binding.get_host_cpu_name()
    assert key.startswith(f"deltaprop-{deltaprop.__version__}_numba-{numba.__version__}_"
                          f"{sys.implementation.cache_tag}_{cpu}-")


def test_another_cpu_or_edited_sources_get_another_folder(fresh_location, monkeypatch, tmp_path):
    code = "from deltaprop.kernels import cache; print(cache.cache_key())"
    here = run_python(code, {"NUMBA_CPU_NAME": None, "NUMBA_CPU_FEATURES": None}).stdout.strip()
    generic = run_python(code, {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": None}).stdout.strip()
    assert "_generic-" in generic and generic != here
    sources = tmp_path / "kernels"
    (sources / "cpu").mkdir(parents=True)
    (sources / "cpu" / "step.py").write_text("A = 1\n")
    monkeypatch.setattr(cache, "KERNELS", sources)
    before = cache.cache_key()
    (sources / "cpu" / "step.py").write_text("A = 2\n")
    cache.cache_key.cache_clear()
    assert cache.cache_key() != before


# ---- compiled kernels: in the cache folder, loaded by the next process, never in the package -----------

STEP = (
    "import numpy as np; from deltaprop import MLP\n"
    "net = MLP([4, 5, 3], backend='numba', dtype='float64', seed=0)\n"
    "ref = MLP([4, 5, 3], backend='numpy', dtype='float64', seed=0)\n"
    "x = np.linspace(-1, 1, 40).reshape(10, 4); y = np.arange(10) % 3\n"
    "print(net.train_step(x, y, 0.5), ref.train_step(x, y, 0.5), float(np.abs(net.params - ref.params).max()))\n"
    "print(sum(net._fused_step[10].stats.cache_hits.values()))\n"
)


def test_a_cached_step_loads_in_the_next_process_and_nothing_lands_in_the_package(tmp_path):
    before = numba_cache_files(PACKAGE)
    first = run_python(STEP, {cache.ENV: str(tmp_path), "NUMBA_CACHE_DIR": None})
    second = run_python(STEP, {cache.ENV: str(tmp_path), "NUMBA_CACHE_DIR": None})
    assert first.stdout.split()[-1] == "0" and second.stdout.split()[-1] == "1"
    assert [p.parent.name for p in numba_cache_files(tmp_path)] and all(
        p.parent.parent == tmp_path and p.parent.name.startswith("deltaprop-") for p in numba_cache_files(tmp_path))
    assert numba_cache_files(PACKAGE) == before
    assert "KernelCacheWarning" not in first.stderr + second.stderr


def _read_only_folder(tmp_path):
    """A folder nobody may write into: a read-only one (the superuser ignores permissions: /sys then)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys"):
            pytest.skip("as the superuser, a read-only folder needs /sys")
        return "/sys"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return str(folder)


@pytest.mark.parametrize("where", ["read-only folder", "path through a file"])
def test_an_unwritable_cache_warns_once_and_still_computes(tmp_path, where):
    if where == "read-only folder":
        target = _read_only_folder(tmp_path)
    else:
        (tmp_path / "a-file").write_text("not a folder")
        target = str(tmp_path / "a-file")
    before = numba_cache_files(PACKAGE)
    result = run_python(STEP + "net.loss_and_grads(x, y); net.predict(x)\n", {cache.ENV: target})
    net_loss, ref_loss, params_error, hits = result.stdout.split()
    assert float(net_loss) == pytest.approx(float(ref_loss), rel=1e-12) and float(params_error) < 1e-12
    assert hits == "0"
    assert result.stderr.count("KernelCacheWarning") == 1, result.stderr
    assert f"cannot write the kernel cache at {target}" in result.stderr
    assert numba_cache_files(PACKAGE) == before


# ---- the fused steps' variants ------------------------------------------------------------------------


def test_fit_compiles_one_step_variant_for_its_batches_and_the_last_smaller_one(tmp_path):
    code = (
        "import numpy as np; from deltaprop import MLP; from deltaprop.kernels.cpu import built_kernels\n"
        "net = MLP([4, 6, 3], activation='softplus', backend='numba', dtype='float32', seed=0)\n"
        "X = np.linspace(-1, 1, 35 * 4, dtype=np.float32).reshape(35, 4); y = np.arange(35) % 3\n"
        "net.fit(X, y, epochs=2, batch_size=16, progress=False)\n"  # 16, 16 and 3 rows
        "print(sorted(str(k[-1]) for k in built_kernels() if k[0] in ('grads_step', 'sgd_step')))\n"
    )
    assert run_python(code, {cache.ENV: str(tmp_path)}).stdout.strip() == "['False']"


def test_each_batch_size_gets_its_variant():
    from deltaprop.kernels.cpu import get_kernel
    from deltaprop.kernels.cpu.step import SMALL_BATCH

    steps = get_backend("numba").fused_sgd_step("relu", "softmax_xent", "float32")
    assert steps[1] is steps[SMALL_BATCH] is get_kernel("sgd_step", "float32", "relu", "softmax_xent", True)
    assert steps[SMALL_BATCH + 1] is steps[256] is get_kernel("sgd_step", "float32", "relu", "softmax_xent", False)


# ---- warmup --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    ({"losses": ["mse"]}, "warmup: losses: expected a list of names among"),
    ({"losses": "softmax_xent"}, "warmup: losses: expected a list of names"),
    ({"uses": ["train"]}, "warmup: uses: expected a list of names among"),
    ({"batches": [0]}, "warmup: batches: expected a list of positive integer batch sizes"),
    ({"batches": 32}, "warmup: batches: expected a list of positive integer batch sizes"),
    ({"activations": "relu"}, "warmup: activations: expected a list of names"),
])
@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_warmup_refuses_bad_choices_on_every_backend(backend_name, arguments, message):
    with pytest.raises(ValueError, match=message):
        get_backend(backend_name).warmup(["float32"], **arguments)


def test_warmup_fills_what_the_next_process_loads(tmp_path):
    warmup = [sys.executable, "-m", "deltaprop", "warmup", "--dtype", "float64", "--for", "train_step",
              "--batch", "10"]
    env = {**os.environ, cache.ENV: str(tmp_path)}
    first = subprocess.run(warmup, env=env, capture_output=True, text=True, check=True)
    assert first.stderr.splitlines()[0] == ("compiling CPU kernels (first run only): 1/1 sgd_step float64 relu "
                                            "softmax_xent (batch > 8)")
    assert "ready in" in first.stdout and "1 part compiled" in first.stdout
    again = subprocess.run(warmup, env=env, capture_output=True, text=True, check=True)
    assert again.stderr == "" and "nothing needed compiling" in again.stdout
    assert run_python(STEP, {cache.ENV: str(tmp_path)}).stdout.split()[-1] == "1"  # loaded, not compiled


def test_warmup_flag_errors_are_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["warmup", "--activation", "rlu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--activation: expected comma-separated names among" in err
    assert main(["warmup", "--backend", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("deltaprop warmup: error: --backend: ")


# ---- deltaprop cache and info ---------------------------------------------------------------------------


def test_cache_lists_and_clears_only_deltaprop_files(tmp_path, monkeypatch, capsys):
    subprocess.run([sys.executable, "-m", "deltaprop", "warmup", "--dtype", "float64", "--for",
                    "predict"], env={**os.environ, cache.ENV: str(tmp_path)}, check=True, capture_output=True)
    stale = tmp_path / "deltaprop-0.0.1_numba-0.1_cpython-30_cpu-000000000000"
    stale.mkdir()
    (stale / "old.nbi").write_bytes(b"x" * 1000)
    (tmp_path / "someone-elses.nbi").write_text("not deltaprop's")
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    folder = cache.cache_dir()
    index_files = sorted(folder.glob("*.nbi"))
    assert index_files

    assert main(["cache", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kernel cache: {folder} (DELTAPROP_CACHE_DIR): {len(index_files)} kernels, "
                          f"{len(list(folder.glob('*.nbc')))} compiled versions, ")
    assert "stale: 1 folders beside it" in out
    assert "bias_act_float64_relu " in out and "gemm_float64_False_True " in out

    assert main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"cleared: {2 * len(index_files) + 1} files")
    assert not folder.exists() and not stale.exists()
    assert (tmp_path / "someone-elses.nbi").exists()
    assert main(["cache"]) == 0
    assert f"{folder} (DELTAPROP_CACHE_DIR): 0 kernels" in capsys.readouterr().out


def test_info_says_where_the_kernel_cache_is(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    assert main(["info"]) == 0
    assert f"kernel cache: {cache.cache_dir()} (DELTAPROP_CACHE_DIR): 0 kernels" in capsys.readouterr().out
