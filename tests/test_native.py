"""The compiled request path (scripts/build-native): in use when current, never when
stale or switched off, and switched off for the suite's pure-Python run."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nbdverify_protocol
from nbdverify.serve import warn_if_uncompiled
from nbdverify_protocol import native

REPOSITORY = Path(nbdverify_protocol.__file__).resolve().parent.parent


def test_each_compiled_module_runs_compiled_unless_switched_off() -> None:
    """scripts/setup builds it, so a run of scripts/test checks the compiled code; the
    pure-Python run (NBDVERIFY_PURE_PYTHON=1) checks the same modules as source."""
    modules = [importlib.import_module(name) for name in native.COMPILED]
    if os.environ.get(native.PURE_PYTHON_VARIABLE):
        assert not any(native.compiled(module) for module in modules)
        assert native.activated == set()
    else:
        assert native.current_build(REPOSITORY) is not None, (
            "build/native is missing or stale: run scripts/setup (scripts/build-native)")
        assert [module.__name__ for module in modules if not native.compiled(module)] == []
        assert native.activated == {"nbdverify", "nbdverify_protocol"}


def test_a_build_of_other_sources_is_never_used(tmp_path: Path) -> None:
    for directory in ("protocol", "nbdverify"):
        shutil.copytree(REPOSITORY / directory, tmp_path / directory)
    built = tmp_path / native.NATIVE_DIR
    built.mkdir(parents=True)
    (built / "SOURCES").write_text(native.sources_digest(tmp_path) + "\n")
    assert native.current_build(tmp_path) == built
    device = tmp_path / "nbdverify" / "device.py"
    device.write_text(device.read_text() + "\n# edited after the build\n")
    native.current_build.cache_clear()
    assert native.current_build(tmp_path) is None


def test_version_says_which_code_runs() -> None:
    nbdverify = Path(sys.executable).parent / "nbdverify"
    environment = {**os.environ, native.PURE_PYTHON_VARIABLE: "1"}
    pure = subprocess.run([nbdverify, "--version"], capture_output=True, text=True,
                          env=environment, check=True, timeout=60)
    assert pure.stdout == "nbdverify 0.1.0 (pure Python: NBDVERIFY_PURE_PYTHON is set)\n"
    environment.pop(native.PURE_PYTHON_VARIABLE)
    default = subprocess.run([nbdverify, "--version"], capture_output=True, text=True,
                             env=environment, check=True, timeout=60)
    assert default.stdout == "nbdverify 0.1.0 (request path compiled with mypyc)\n"


def _calls_in_slice_bounds(source: str) -> list[int]:
    """Lines where a slice bound calls anything but len(): compiled by mypyc 2.4.1,
    such a call runs twice on a memoryview or bytearray (`view[os.write(fd, view):]`
    wrote every journal batch twice)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper, node.step):
                for inner in ast.walk(bound) if bound is not None else ():
                    if isinstance(inner, ast.Call) and not (
                            isinstance(inner.func, ast.Name) and inner.func.id == "len"):
                        lines.append(inner.lineno)
    return lines


def test_no_compiled_module_calls_inside_a_slice_bound() -> None:
    assert _calls_in_slice_bounds("v = v[os.write(fd, v):]\nw = w[:len(w) - 1]\n") == [1]
    found = {}
    for module in native.COMPILED:
        package, name = module.split(".")
        path = REPOSITORY / ("protocol" if package == "nbdverify_protocol" else package)
        lines = _calls_in_slice_bounds((path / f"{name}.py").read_text())
        if lines:
            found[module] = lines
    assert found == {}, "give the call a statement of its own (see _calls_in_slice_bounds)"


def test_serving_from_a_stale_build_says_so(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "unbuilt", set())
    warn_if_uncompiled()
    assert not caplog.records
    monkeypatch.setattr(native, "unbuilt", {REPOSITORY})
    monkeypatch.setattr(native, "activated", set())
    monkeypatch.delenv(native.PURE_PYTHON_VARIABLE, raising=False)
    warn_if_uncompiled()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == ("serving pure Python: build/native is missing or stale; "
                                   "run scripts/build-native")
