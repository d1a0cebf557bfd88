"""The public API of deltaprop.model and deltaprop.backend is annotated, and mypy agrees with the code."""

import inspect
import os
import subprocess
import sys

import pytest

import deltaprop.backend
from deltaprop.backend import Backend
from deltaprop.model import MLP, get_loss
from deltaprop.model import optim
from deltaprop.model.mlp import ForwardCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_callables():
    """{qualified name: function} of every public function and public method of a public class."""
    found = {f"backend.{name}": getattr(deltaprop.backend, name) for name in deltaprop.backend.__all__
             if inspect.isfunction(inspect.unwrap(getattr(deltaprop.backend, name)))}
    found.update({"model.get_loss": get_loss, "optim.get_optimizer": optim.get_optimizer,
                  "optim.get_schedule": optim.get_schedule})
    classes = [Backend, MLP, ForwardCache, optim.Optimizer, *optim.OPTIMIZERS.values(), *optim.SCHEDULES.values()]
    for cls in classes:
        for name, member in vars(cls).items():
            if name.startswith("_") and name != "__init__":
                continue
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if inspect.isfunction(function):
                found[f"{cls.__name__}.{name}"] = function
    return found


@pytest.mark.parametrize("name, function", sorted(public_callables().items()))
def test_every_public_function_has_annotated_arguments_and_result(name, function):
    signature = inspect.signature(inspect.unwrap(function))
    unannotated = [p.name for p in signature.parameters.values()
                   if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
    assert unannotated == [], f"{name}: arguments without a type: {unannotated}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type"


@pytest.mark.slow
def test_mypy_finds_no_error_in_model_and_backend(tmp_path):
    pytest.importorskip("mypy")
    # mypy cannot follow setuptools' editable finder: a link named deltaprop to this checkout stands in
    (tmp_path / "deltaprop").symlink_to(ROOT, target_is_directory=True)
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), "-p", "deltaprop.model", "-p", "deltaprop.backend"],
                            cwd=tmp_path, env={**os.environ, "MYPYPATH": str(tmp_path)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
