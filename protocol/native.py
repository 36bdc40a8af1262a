"""Where the compiled twins of the request path's modules are, and whether to use them.

`scripts/build-native` compiles the modules in COMPILED with mypyc into build/native/
beside the sources. Each package's ``__init__`` calls `activate`, which puts that
directory first on the package's ``__path__``, so ``import nbdverify.device`` finds
the extension module before the .py file, unless

- ``NBDVERIFY_PURE_PYTHON`` is set (the test suite runs its in-process tests so too), or
- the build is stale: it is used only if built from the sources as they are now (all
  of them), so an edited module is never shadowed by an old build of it.

It lives in the lowest package so that both packages can ask it; it imports nothing of
either.
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import cache
from pathlib import Path

#: The modules compiled: the request path, from bytes in to both children and back.
#: Not server.py (accepting and negotiating: mypyc cannot compile its `except*`) nor
#: the negotiation machine (its decision table names methods, looked up at run time).
COMPILED = (
    "nbdverify_protocol.buffers",
    "nbdverify_protocol.client",
    "nbdverify_protocol.transmission",
    "nbdverify.changes",
    "nbdverify.children",
    "nbdverify.device",
    "nbdverify.journal",
    "nbdverify.journal_format",
    "nbdverify.nbd_child",
    "nbdverify.provenance",
    "nbdverify.ranges",
    "nbdverify.statistics",
    "nbdverify.transmission",
    "nbdverify.transport",
)
#: mypyc's shared library of the compiled modules: nbdverify_protocol._native__mypyc.
GROUP = "nbdverify_protocol._native"
#: Below the repository's root (which holds protocol/ and nbdverify/).
NATIVE_DIR = Path("build") / "native"
PURE_PYTHON_VARIABLE = "NBDVERIFY_PURE_PYTHON"

_SOURCE_DIRS = ("protocol", "nbdverify")


def sources_digest(repository: Path) -> str:
    """What a build is a build of: the interpreter and every source of both packages,
    not only the compiled ones (mypyc copies other modules' Final constants in)."""
    digest = hashlib.sha256(sys.version.encode())
    for directory in _SOURCE_DIRS:
        for source in sorted((repository / directory).glob("*.py")):
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


@cache
def current_build(repository: Path) -> Path | None:
    """The build below `repository`, if it was built from its sources as they are."""
    native = repository / NATIVE_DIR
    try:
        built_from = (native / "SOURCES").read_text().strip()
        return native if built_from == sources_digest(repository) else None
    except OSError:  # never built, or not a source checkout (an installed wheel)
        return None


#: The packages whose compiled modules are in use.
activated: set[str] = set()
#: Source checkouts whose build is missing or stale (an installed copy has none to build).
unbuilt: set[Path] = set()


def activate(package: str, path: list[str], init_file: str) -> None:
    """Let `package` (whose ``__path__`` is `path`) import its compiled modules."""
    if os.environ.get(PURE_PYTHON_VARIABLE):
        return
    # __init__.py may be a link (the editable install's tree): its target is in the source tree.
    repository = Path(init_file).resolve().parent.parent
    native = current_build(repository)
    if native is not None and (native / package).is_dir():
        path.insert(0, str(native / package))
        activated.add(package)
    elif (repository / "scripts" / "build-native").exists():
        unbuilt.add(repository)


def describe() -> str:
    """For --version: which code runs."""
    if {"nbdverify", "nbdverify_protocol"} <= activated:
        return "request path compiled with mypyc"
    if os.environ.get(PURE_PYTHON_VARIABLE):
        return f"pure Python: {PURE_PYTHON_VARIABLE} is set"
    if unbuilt:
        return "pure Python: build/native is missing or stale; run scripts/build-native"
    return "pure Python"


def compiled(module: object) -> bool:
    """Whether `module` is its compiled twin."""
    return not str(getattr(module, "__file__", "")).endswith(".py")
