"""Built-in demo domains: four clearly different kinds of text that every Python install can produce.

They exist so that the demo, the tests and the default benchmark run offline and deterministically.
They are **demo data**, not a research benchmark: real claims need real corpora (see
``docs/benchmarks.md`` for the runs on the shared real-text domains).

* ``prose``      - English technical prose: the Python language reference topics shipped with the
  interpreter for ``help()`` (``pydoc_data.topics``).
* ``code``       - Python source code of a fixed list of pure-Python standard-library modules.
* ``arithmetic`` - generated integer arithmetic, one ``a op b = c`` equation per line.
* ``unicode``    - the Unicode character database: ``U+XXXX NAME`` lines (``unicodedata``).

Each domain is a list of documents of at most ~2,000 characters, split at line ends. The text is a
function of the Python version (the stdlib changes between releases) and nothing else.
"""

from __future__ import annotations

import importlib.util
import random
import unicodedata
from collections.abc import Callable

DOC_CHARS = 2000
"""Documents are cut at line ends into pieces of at most this many characters."""

_CODE_MODULES = (
    "textwrap", "string", "heapq", "bisect", "fractions", "statistics", "calendar", "colorsys",
    "difflib", "shlex", "functools", "dataclasses", "enum", "argparse", "csv", "json.encoder",
    "json.decoder", "configparser", "ipaddress", "pprint", "copy", "queue", "sched", "fnmatch",
    "glob", "filecmp", "netrc", "plistlib", "quopri", "gettext", "locale", "tokenize", "typing",
    "random", "decimal", "zipfile", "tarfile", "email.message", "email.utils", "http.cookies",
    "urllib.parse", "logging.handlers", "logging.config", "unittest.case", "inspect", "ast",
)  # fmt: skip


def _chunk(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Split ``text`` at line ends into pieces of at most ``max_chars`` (longer lines are cut)."""
    docs, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            docs.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars and current:
            docs.append(current)
            current = ""
        current += line
    if current.strip():
        docs.append(current)
    return [d for d in docs if d.strip()]


def _cap(docs: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def prose_documents(max_chars: int | None = None) -> list[str]:
    """English prose: the language-reference topics behind ``help()``, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped interpreter: fall back to the stdlib's module docstrings
        import sys

        topics = {}
        for name in sorted(sys.stdlib_module_names):
            spec = importlib.util.find_spec(name) if name.isidentifier() else None
            if spec and spec.origin and spec.origin.endswith(".py"):
                doc = _module_docstring(spec.origin)
                if doc:
                    topics[name] = doc
    docs: list[str] = []
    for key in sorted(topics):
        docs.extend(_chunk(topics[key]))
    return _cap(docs, max_chars)


def _module_docstring(path: str) -> str:
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""


def code_documents(max_chars: int | None = None) -> list[str]:
    """Python source of a fixed list of stdlib modules (those missing from this interpreter are skipped)."""
    docs: list[str] = []
    for name in _CODE_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                docs.extend(_chunk(f.read()))
        except (OSError, UnicodeDecodeError):
            continue
    return _cap(docs, max_chars)


def arithmetic_documents(max_chars: int | None = None, seed: int = 1234) -> list[str]:
    """Generated arithmetic: ``a op b = c`` lines, 40 to a document, from a fixed seed."""
    rng = random.Random(seed)
    limit = max_chars if max_chars is not None else 400_000
    docs, total = [], 0
    while total < limit:
        lines = []
        for _ in range(40):
            op = rng.choice("+-*")
            a = rng.randint(0, 999)
            b = rng.randint(0, 999 if op != "*" else 99)
            c = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {c}\n")
        doc = "".join(lines)
        docs.append(doc)
        total += len(doc)
    return _cap(docs, max_chars)


def unicode_documents(max_chars: int | None = None) -> list[str]:
    """Named code points of the Basic Multilingual Plane as ``U+XXXX NAME`` lines, 50 to a document.

    Blocks whose names are generated from the code point (CJK ideographs, Hangul syllables) are skipped.
    """
    lines = []
    for cp in range(0x20, 0x10000):
        name = unicodedata.name(chr(cp), "")
        # Skip the algorithmically named blocks (ideographs, Hangul syllables): no information per line.
        if name and not name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HANGUL SYLLABLE")):
            lines.append(f"U+{cp:04X} {name}\n")
    docs = ["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)]
    return _cap(docs, max_chars)


BUILTIN_DOMAINS: dict[str, Callable[[int | None], list[str]]] = {
    "prose": prose_documents,
    "code": code_documents,
    "arithmetic": arithmetic_documents,
    "unicode": unicode_documents,
}
"""Name -> function(max_chars) returning the domain's documents."""


def builtin_documents(name: str, max_chars: int | None = None) -> list[str]:
    """Documents of built-in domain ``name`` (at most ``max_chars`` characters in total, if given)."""
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"unknown built-in domain {name!r}: expected one of {sorted(BUILTIN_DOMAINS)}")
    return BUILTIN_DOMAINS[name](max_chars)
