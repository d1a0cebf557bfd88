"""Every backend override keeps the base signature exactly (names, defaults, order, kind)."""

from __future__ import annotations

import inspect

import pytest

from deltaprop.backend import Backend, available_backends
from deltaprop.backend import _backend_class as backend_class


def overrides(cls):
    """(name, override, base) for each attribute of ``cls`` (below Backend) that replaces one of Backend's."""
    for klass in cls.__mro__[: cls.__mro__.index(Backend)]:
        for name, attribute in vars(klass).items():
            if name in vars(Backend) and not name.startswith("__"):
                yield name, attribute, vars(Backend)[name]


def _signature(attribute):
    """[(name, kind, default)] per parameter: the base's annotations hold for an override that leaves them out."""
    function = attribute.fget if isinstance(attribute, property) else attribute
    parameters = inspect.signature(getattr(function, "__func__", function)).parameters.values()
    return [(p.name, p.kind, p.default) for p in parameters]


@pytest.mark.parametrize("name", [n for n in available_backends() if n != "numpy"])
def test_overrides_keep_the_base_signature(name):
    found = list(overrides(backend_class(name)))
    assert found, f"{name} overrides nothing"
    for attribute_name, override, base in found:
        assert type(override) is type(base), attribute_name  # a method stays a method, a classmethod a classmethod
        if callable(base) or isinstance(base, (classmethod, staticmethod, property)):
            assert _signature(override) == _signature(base), attribute_name
