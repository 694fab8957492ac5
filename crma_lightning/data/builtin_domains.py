"""Built-in demo domains: four clearly different kinds of text, frozen into package data.

They exist so that the demo, the tests and the default benchmark run offline and deterministically.
They are **demo data**, not a research benchmark: real claims need real corpora (see
``docs/benchmarks.md`` for the runs on the shared real-text domains).

* ``prose``      - English technical prose: the Python language reference topics shipped with the
  interpreter for ``help()`` (``pydoc_data.topics``).
* ``code``       - Python source code of a fixed list of pure-Python standard-library modules.
* ``arithmetic`` - generated integer arithmetic, one ``a op b = c`` equation per line.
* ``unicode``    - the Unicode character database: ``U+XXXX NAME`` lines (``unicodedata``).

Each domain is a list of documents of at most ~2,000 characters, split at line ends. The text was
produced once, by :func:`regenerate` on CPython 3.11.7, and is read from
``crma_lightning/data/builtin/<domain>.json.xz``: an xz-compressed JSON array of strings
(UTF-8), the first :data:`FROZEN_CHARS` characters of the domain. Reading it instead of the
running interpreter's standard library makes the text - and so every number measured on it -
byte-identical on every Python version. :data:`FROZEN_SHA256` pins each file's content; loading
checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

DOC_CHARS = 2000
"""Documents are cut at line ends into pieces of at most this many characters."""

FROZEN_CHARS = 400_000
"""Each frozen domain holds the documents whose running total first reaches this many characters.

The largest size any shipped config asks for (``max_chars_per_domain: 400000``); any
``max_chars`` up to it gives exactly the documents the original stdlib-based generators gave.
"""

FROZEN_DIR = ("builtin",)
"""Where the frozen files live, relative to the ``crma_lightning`` package."""

FROZEN_SHA256 = {
    "prose": "f8afa9f772a106f9028632ccc0bf7a986c616ad1c221b1f70153c09eda6c080b",
    "code": "3dbf92f1de8987b794aba07673df8a237bfc112bc2f20eff014e36f1519efe34",
    "arithmetic": "9fcafb03722410871c417d6fa7a809360c5c427452529c5b6fd54e4e49a2758e",
    "unicode": "df4eebbd29e9fa4ce70c76499ff6cd4692544f2508bc56a005fac0dc6da3f55b",
}
"""sha256 of each domain's documents as :func:`documents_sha256` computes it (``"\\x1e"``-joined UTF-8)."""


def documents_sha256(docs: list[str]) -> str:
    """sha256 (hex) of documents joined with the ASCII record separator, which no document holds."""
    return hashlib.sha256("\x1e".join(docs).encode("utf-8")).hexdigest()


def _cap(docs: list[str], max_chars: int | None) -> list[str]:
    """The leading documents until their total first reaches ``max_chars`` (all of them for ``None``)."""
    if max_chars is None:
        return list(docs)
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


@cache
def _frozen(name: str) -> tuple[str, ...]:
    """The frozen documents of built-in domain ``name``, read once per process and checked."""
    try:
        import lzma
    except ImportError as err:  # some source builds of Python lack liblzma
        raise RuntimeError(
            "the built-in demo domains are stored xz-compressed, but this Python has no `lzma` module; "
            "use a Python built with liblzma (xz), or give the domains as local files"
        ) from err
    resource = resources.files("crma_lightning.data").joinpath(*FROZEN_DIR, f"{name}.json.xz")
    try:
        raw = resource.read_bytes()
    except FileNotFoundError as err:
        raise RuntimeError(
            f"the frozen text of built-in domain {name!r} ({'/'.join(FROZEN_DIR)}/{name}.json.xz) is missing "
            "from the installed package; reinstall crma-lightning"
        ) from err
    docs = json.loads(lzma.decompress(raw).decode("utf-8"))
    if documents_sha256(docs) != FROZEN_SHA256[name]:
        raise RuntimeError(
            f"the frozen text of built-in domain {name!r} does not match its pinned sha256: the package data "
            "is corrupt or was regenerated without updating FROZEN_SHA256"
        )
    return tuple(docs)


def _loader(name: str) -> Callable[[int | None], list[str]]:
    def documents(max_chars: int | None = None) -> list[str]:
        return _cap(list(_frozen(name)), max_chars)

    documents.__name__ = f"{name}_documents"
    documents.__doc__ = (
        f"Documents of the frozen built-in domain {name!r}: the leading ones until their total reaches "
        f"``max_chars`` (all {FROZEN_CHARS:,}-odd characters for ``None`` or a larger cap)."
    )
    return documents


prose_documents = _loader("prose")
code_documents = _loader("code")
arithmetic_documents = _loader("arithmetic")
unicode_documents = _loader("unicode")

BUILTIN_DOMAINS: dict[str, Callable[[int | None], list[str]]] = {
    "prose": prose_documents,
    "code": code_documents,
    "arithmetic": arithmetic_documents,
    "unicode": unicode_documents,
}
"""Name -> function(max_chars) returning the domain's documents."""


def builtin_documents(name: str, max_chars: int | None = None) -> list[str]:
    """Documents of built-in domain ``name`` (at most ``max_chars`` characters in total, if given).

    ``max_chars`` above :data:`FROZEN_CHARS` (or ``None``) gives all the frozen documents.
    """
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"unknown built-in domain {name!r}: expected one of {sorted(BUILTIN_DOMAINS)}")
    return BUILTIN_DOMAINS[name](max_chars)


# ---------------------------------------------------------------------- how the frozen files were made
# The generators below read the running interpreter's standard library, so their output depends on
# the Python version. They ran once, on CPython 3.11.7, to write the frozen files; the library never
# calls them otherwise. Kept so the provenance of the demo data is reproducible and reviewable.

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


def _generate_prose() -> list[str]:
    from pydoc_data.topics import topics  # the language-reference topics behind help()

    docs: list[str] = []
    for key in sorted(topics):
        docs.extend(_chunk(topics[key]))
    return docs


def _generate_code() -> list[str]:
    import importlib.util

    docs: list[str] = []
    for name in _CODE_MODULES:
        spec = importlib.util.find_spec(name)
        with open(spec.origin, encoding="utf-8") as f:
            docs.extend(_chunk(f.read()))
    return docs


def _generate_arithmetic(seed: int = 1234) -> list[str]:
    import random

    rng = random.Random(seed)
    docs, total = [], 0
    while total < FROZEN_CHARS:
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
    return docs


def _generate_unicode() -> list[str]:
    import unicodedata

    lines = []
    for cp in range(0x20, 0x10000):
        name = unicodedata.name(chr(cp), "")
        # Skip the algorithmically named blocks (ideographs, Hangul syllables): no information per line.
        if name and not name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HANGUL SYLLABLE")):
            lines.append(f"U+{cp:04X} {name}\n")
    return ["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)]


_GENERATORS: dict[str, Callable[[], list[str]]] = {
    "prose": _generate_prose,
    "code": _generate_code,
    "arithmetic": _generate_arithmetic,
    "unicode": _generate_unicode,
}


def regenerate(out_dir: str | Path | None = None) -> dict[str, str]:
    """Write the frozen files from this interpreter's standard library; returns each file's sha256.

    Only needed to change the demo data (which changes every number measured on it). On another
    Python version than 3.11.7 the text differs: the returned hashes then differ from
    :data:`FROZEN_SHA256`, which must be updated together with the files (and the README's numbers).

    Args:
        out_dir: Target directory; default the package's own ``data/builtin``.

    Returns:
        ``{domain: sha256}`` as :func:`documents_sha256` computes it.
    """
    import lzma

    out = Path(out_dir) if out_dir is not None else Path(__file__).parent.joinpath(*FROZEN_DIR)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, generate in _GENERATORS.items():
        docs = _cap(generate(), FROZEN_CHARS)
        payload = json.dumps(docs, ensure_ascii=False).encode("utf-8")
        (out / f"{name}.json.xz").write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
        hashes[name] = documents_sha256(docs)
    return hashes


if __name__ == "__main__":  # python -m crma_lightning.data.builtin_domains [OUT_DIR]
    import sys

    for domain, digest in regenerate(sys.argv[1] if len(sys.argv) > 1 else None).items():
        print(f"{domain}: {digest}")
