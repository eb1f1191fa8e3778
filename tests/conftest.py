"""Shared pytest configuration: `gpu`/`tpu`-marked tests run only on that backend."""

from __future__ import annotations

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` / `tpu` unless JAX's default backend is that accelerator."""
    backend = jax.default_backend()
    for marker in ("gpu", "tpu"):
        if backend == marker:
            continue
        skip = pytest.mark.skip(reason=f"needs a {marker.upper()} backend "
                                       f"(jax.default_backend() == {marker!r})")
        for item in items:
            if item.get_closest_marker(marker) is not None:
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
