"""MkDocs hook: expand ``<!-- api-modules: mim.xxx [mim.xxx.sub ...] -->`` into one mkdocstrings block per module.

For each package named (a sub-package after the first gets its own ``__init__`` block first), the marker
lists the ``.py`` files directly inside the package's folder (sorted; ``__init__`` and names starting with
``_`` left out), so a module added to a package appears in the API reference without editing the page, and
a docstring that fails to render fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"^<!-- api-modules: (?P<packages>[\w. ]+) -->$", re.MULTILINE)


def _modules(root: Path, package: str) -> list[str]:
    folder = root.joinpath(*package.split("."))
    if not (folder / "__init__.py").is_file():
        raise ValueError(f"api-modules: {package} is not a package under {root}")
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return [f"{package}.{name}" for name in names]


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    root = Path(config.config_file_path).parent

    def expand(match: re.Match) -> str:
        packages = match["packages"].split()
        modules = [m for i, pkg in enumerate(packages) for m in ([pkg] if i else []) + _modules(root, pkg)]
        return "\n\n".join(f"::: {module}" for module in modules)

    return MARKER.sub(expand, markdown)
