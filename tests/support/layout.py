"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

Each checker takes a root directory (the repository, or a small tree a test
writes) and answers every offender as an ``Offence``: file, line, what is
wrong. tests/test_layout.py runs them on the real tree and on synthetic ones.

The wings of ``onion_twisted`` (issue 13):

* ``protocol``: the I/O-free core; imports no other wing;
* ``net``: HTTP, configuration, keys; imports only ``protocol``;
* the roles ``node``, ``tracker``, ``peer``: each imports only ``protocol``,
  ``net`` and itself, never another role (nor ``ops``);
* any of them may take ``PROTOCOL`` and ``__version__`` from the package root.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

PACKAGE = "onion_twisted"
ROOT_NAMES = frozenset({"PROTOCOL", "PROTOCOL_V1", "PROTOCOL_V2", "PROTOCOLS", "__version__"})
ROLES = ("node", "tracker", "peer")
MAX_LINES = 400


class Offence(NamedTuple):
    path: str   # relative to the root checked, with forward slashes
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def allowed_wings(wing: str) -> frozenset | None:
    """The wings a module of ``wing`` may import (its own included); None: no rule for it."""
    if wing == "protocol":
        return frozenset({"protocol"})
    if wing == "net":
        return frozenset({"protocol", "net"})
    if wing in ROLES:
        return frozenset({"protocol", "net", wing})
    return None


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """The dotted name of the module at ``path``, and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(tree: ast.AST, module: str, is_package: bool = False):
    """Every ``(line, target)`` imported anywhere in ``tree``: a module, or ``package.NAME`` of a from-import
    of the package root (so ``from onion_twisted import PROTOCOL`` is ``onion_twisted.PROTOCOL``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            if target == PACKAGE:
                for alias in node.names:
                    yield node.lineno, f"{PACKAGE}.{alias.name}"
            else:
                yield node.lineno, target


def _wing_of(target: str) -> str | None:
    """``protocol`` for ``onion_twisted.protocol.wire``; ``ROOT`` for the root's own names; None outside."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return ""  # the bare package: which of its names is used cannot be told
    if len(parts) == 2 and parts[1] in ROOT_NAMES:
        return "ROOT"
    return parts[1]


def _sources(root: Path):
    package = root / PACKAGE
    return sorted(p for p in package.rglob("*.py") if p.is_file())


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def import_offences(root) -> list[Offence]:
    """Every import across the wings that the rules above forbid."""
    root = Path(root)
    offences = []
    for path in _sources(root):
        module, is_package = _module_name(path, root)
        parts = module.split(".")
        if len(parts) < 2:
            continue  # the package root and __main__ may use every wing
        wing = parts[1]
        allowed = allowed_wings(wing)
        if allowed is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in imported(tree, module, is_package):
            target_wing = _wing_of(target)
            if target_wing is None or target_wing == "ROOT" or target_wing in allowed:
                continue
            what = "the package root" if target_wing == "" else target
            offences.append(Offence(_relative(path, root), line,
                                    f"a {wing} module imports {what} (allowed: {', '.join(sorted(allowed))}"
                                    f" and the root's {', '.join(sorted(ROOT_NAMES))})"))
    return sorted(offences)


def long_modules(root, limit: int = MAX_LINES) -> list[Offence]:
    """Every module of the package over ``limit`` lines."""
    root = Path(root)
    offences = []
    for path in _sources(root):
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > limit:
            offences.append(Offence(_relative(path, root), count, f"{count} lines, over {limit}"))
    return offences


def _import_time_nodes(tree: ast.AST):
    """The nodes run when the module is imported: all but the bodies of functions and lambdas."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            todo.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _dynamic_import(node: ast.AST) -> str | None:
    """The module named by ``__import__("x")`` or ``import_module("x")``, when it is a literal."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    first = node.args[0]
    if name in ("__import__", "import_module") and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def plugin_offences(root) -> list[Offence]:
    """``twisted/plugins`` is a namespace (no ``__init__.py``) whose plugin files import none of the
    package when twistd imports them to list its plugins."""
    root = Path(root)
    plugins = root / "twisted" / "plugins"
    offences = []
    init = plugins / "__init__.py"
    if init.exists():
        offences.append(Offence(_relative(init, root), 1,
                                "twisted/plugins must have no __init__.py (it would hide Twisted's own plugins)"))
    for path in sorted(plugins.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_time_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                targets = [t for t in [_dynamic_import(node)] if t]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    offences.append(Offence(_relative(path, root), node.lineno,
                                            f"imports {target} when the plugin file is imported"))
    return sorted(offences)
