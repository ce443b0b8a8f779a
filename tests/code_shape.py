"""The shape of our packages, checked in the lint step (``make lint``): what import-linter's
contracts cannot say.

* No import cycle among the modules of a package, counting ``TYPE_CHECKING`` and function-local
  imports: a cycle hidden from the runtime still ties the modules together for a reader.
* No module reaches into another object's private members (``obj._name``). Allowed: ``self``,
  ``cls`` and ``super()``; another instance of the enclosing class (``other._raw`` in
  ``__eq__``); the public API of named tuples (``_make``, ``_replace``...); and the third-party
  internals listed in ``THIRD_PARTY``, each with the reason we reach into it.

Run: ``python tests/code_shape.py [PACKAGE...]`` (all of ours by default; exit status 1 and a
list when something is wrong).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "kalandra_core")
NAMEDTUPLE_API = frozenset({"_make", "_replace", "_asdict", "_fields", "_field_defaults"})

# (file, attribute): why we touch a library's internals there.
THIRD_PARTY: dict[tuple[str, str], str] = {
    ("bridge/app.py", "_pool"): "mautrix's PostgresDatabase refuses a second start() otherwise",
    ("bridge/config.py", "_data"): "mautrix's ConfigUpdateHelper has no read of an explicit null",
    (
        "bridge/encryption/ghost_devices.py",
        "_id_prefix",
    ): "mautrix's EncryptionManager: the ghost namespace",
    (
        "bridge/encryption/ghost_devices.py",
        "_id_suffix",
    ): "mautrix's EncryptionManager: the ghost namespace",
    (
        "bridge/encryption/ghost_devices.py",
        "_ignore_user",
    ): "mautrix's EncryptionManager: ghosts it skips",
    ("kalandra_core/client/cli.py", "_SubParsersAction"): "argparse's type of add_subparsers()",
    ("kalandra_core/transport/quic.py", "_streams"): (
        "aioquic's QuicConnection gives no public access to a stream's send state"
    ),
    ("kalandra_core/transport/quic.py", "_buffer"): (
        "aioquic's stream sender keeps bytes until ACKed and has no public count of them"
    ),
    ("kalandra_core/transport/quic.py", "_timer"): (
        "aioquic's protocol has no public way to stop its timer after a failed handshake"
    ),
}
# Files that wrap a library's internals as their whole purpose (every private access there is
# into that library), with the reason.
WRAPPERS: dict[str, str] = {
    "kalandra_core/mls/_lib.py": "the one adapter of rfc9420: its corrections patch internals",
    "kalandra_core/mls/corrections.py": "rfc9420's defects corrected in place",
    "kalandra_core/mls/fastpaths.py": "rfc9420's quadratic paths replaced in place",
    "kalandra_core/mls/fastcommit.py": "rfc9420's commit and join paths sped up in place",
    "kalandra_core/mls/conformance/_trees.py": "the official test vectors drive rfc9420's trees",
    "kalandra_core/mls/conformance/_framing.py": "the official test vectors drive rfc9420 framing",
}


# --- modules and their imports ------------------------------------------------------------------


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    for alias in node.names:
        yield f"{target}.{alias.name}"  # a submodule, or a name in ``target``
        yield target


def import_graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(module, path, node):
                # The package itself is only its __init__ (a face, importing nothing back).
                inside = module.startswith(name + ".")  # (a package's own __init__)
                if name in modules and name not in (module, package) and not inside:
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# --- private members ----------------------------------------------------------------------------


def _own_names(cls: ast.ClassDef) -> set[str]:
    """Names a class defines for its instances: methods, class attributes, ``self.x = ...``."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    slots = [n for n in cls.body if isinstance(n, ast.Assign)]
    for assign in slots:
        if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in assign.targets):
            names.update(
                e.value
                for e in ast.walk(assign.value)
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return names


def private_accesses(path: Path) -> Iterator[tuple[int, str]]:
    relative = str(path.relative_to(ROOT))
    if relative in WRAPPERS:
        return
    tree = ast.parse(path.read_text())
    classes = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)]
    enclosing: dict[int, set[str]] = {}
    for cls in classes:
        own = _own_names(cls)
        for node in ast.walk(cls):
            enclosing.setdefault(id(node), set()).update(own)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in NAMEDTUPLE_API:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Call) and ast.unparse(value.func) == "super":
            continue
        if name in enclosing.get(id(node), set()):
            continue  # another instance of the same class
        if (relative, name) in THIRD_PARTY:
            continue
        yield node.lineno, ast.unparse(node)


def main(packages: list[str]) -> int:
    problems = []
    for package in packages or PACKAGES:
        for component in cycles(import_graph(package)):
            problems.append(f"import cycle in {package}: {' -> '.join(component)}")
        for path in _modules(package).values():
            for line, expression in private_accesses(path):
                relative = path.relative_to(ROOT)
                problems.append(
                    f"{relative}:{line}: another object's private member: {expression}"
                )
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problems of code shape (see tests/code_shape.py)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
