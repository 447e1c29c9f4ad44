"""MkDocs hook: expand ``<!-- api-modules: mim.xxx -->`` into one mkdocstrings block per module.

Each marker lists the ``.py`` files inside the package's folder (sorted; ``__init__`` and names starting
with ``_`` left out), then each sub-package (its ``__init__`` first, then its modules, recursively), so a
module added to a package appears in the API reference without editing the page, and a docstring that
fails to render fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"^<!-- api-modules: (?P<package>[\w.]+) -->$", re.MULTILINE)


def _modules(root: Path, package: str) -> list[str]:
    folder = root.joinpath(*package.split("."))
    if not (folder / "__init__.py").is_file():
        raise ValueError(f"api-modules: {package} is not a package under {root}")
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    modules = [f"{package}.{name}" for name in names]
    for sub in sorted(p.parent.name for p in folder.glob("*/__init__.py") if not p.parent.name.startswith("_")):
        modules += [f"{package}.{sub}", *_modules(root, f"{package}.{sub}")]
    return modules


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    root = Path(config.config_file_path).parent

    def expand(match: re.Match) -> str:
        return "\n\n".join(f"::: {module}" for module in _modules(root, match["package"]))

    return MARKER.sub(expand, markdown)
