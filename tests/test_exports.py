"""Every module says what it exports, and exports what it defines (httpx's habit)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import producers
import worker


def _modules() -> list[str]:
    names = []
    for package in (worker, producers):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.endswith(".__main__"):  # a script, not an import API
                names.append(info.name)
    return sorted(names)


def _defined_here(module: ModuleType) -> set[str]:
    return {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    }


@pytest.mark.parametrize("name", _modules())
def test_all_names_exist_and_cover_the_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    unlisted = _defined_here(module) - set(exported)
    assert not unlisted, f"{name} defines public names outside __all__: {sorted(unlisted)}"


def test_versions_come_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert worker.__version__ == version("inference-worker")
    assert producers.__version__ == version("inference-worker")
