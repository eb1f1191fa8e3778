"""Shared pytest configuration: `gpu`-marked tests run only on a GPU backend."""

from __future__ import annotations

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` unless JAX's default backend is a GPU."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU backend (jax.default_backend() == 'gpu')")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. A long single-process run
    otherwise accumulates hundreds of XLA:CPU executables, and the suite hit a segfault
    inside XLA's compiler near its end that no module shows when run alone."""
    yield
    from gkv_jax import generation

    generation._COMPILED.clear()
    jax.clear_caches()
