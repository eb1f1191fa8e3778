"""The docstring examples of the packages installed from folders outside `gkv_jax/`.

`models/`, `conversion/` and `pallas_kernels/` install as `gkv_jax.models`,
`gkv_jax.conversion` and `gkv_jax.pallas_kernels` (setuptools package-dir), so pytest's
`--doctest-modules` never sees them (`testpaths` holds `tests` and `gkv_jax`), and collecting
them by path would import each module a second time under its folder's name. Here every module
is imported by its installed name and its examples run through `doctest`.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("gkv_jax.models", "gkv_jax.conversion", "gkv_jax.pallas_kernels")


def module_names(package_name: str) -> list[str]:
    """The package and every module and subpackage under it, by installed name."""
    package = importlib.import_module(package_name)
    return [package_name] + [info.name for info in
                             pkgutil.walk_packages(package.__path__, package_name + ".")]


def run_examples(module_name: str) -> tuple[int, str]:
    """(examples failed, doctest's report of the failures) of one module.

    DocTestFinder skips objects a module imports from elsewhere, so a re-exported function's
    examples run once, in the module that defines it."""
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(verbose=False)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    return runner.failures, "".join(report)


MODULES = [name for package in PACKAGES for name in module_names(package)]


@pytest.mark.parametrize("module_name", MODULES)
def test_examples_pass(module_name):
    failed, report = run_examples(module_name)
    assert failed == 0, f"{failed} failing example(s) in {module_name}:\n{report}"


def test_examples_are_found():
    """The walk reaches the kernels' subpackages, whose `__init__` functions have examples
    (a walk that found nothing would pass every test above)."""
    kernel_modules = [name for name in MODULES if name.startswith("gkv_jax.pallas_kernels.")]
    assert "gkv_jax.pallas_kernels.topk_retention" in kernel_modules
    found = sum(len(test.examples) for name in kernel_modules
                for test in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert found >= 1
