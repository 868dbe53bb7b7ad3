"""Every public function and method of paddle_glm4/ and converters/, and every `forward`, has type hints on
its parameters and its result (mypy, run by `make lint`, then checks them). Read from the source, not imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("paddle_glm4", "converters")


def missing_hints(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, function, what lacks a hint) for the public functions and methods of a module and every forward."""
    found = []

    def visit(node: ast.AST, public: bool, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, public and not child.name.startswith("_"), True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name  # functions nested in a function are not API: not visited
                if not (
                    (public and (not name.startswith("_") or name in ("__init__", "__call__"))) or name == "forward"
                ):
                    continue
                args = child.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                if in_class and params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                lacking = [p.arg for p in params if p.annotation is None]
                lacking += [f"*{a.arg}" for a in (args.vararg,) if a is not None and a.annotation is None]
                lacking += [f"**{a.arg}" for a in (args.kwarg,) if a is not None and a.annotation is None]
                if child.returns is None and name != "__init__":
                    lacking.append("the result")
                if lacking:
                    found.append((child.lineno, name, lacking))

    visit(tree, True, False)
    return found


def test_public_functions_and_forwards_have_type_hints():
    problems = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name, lacking in missing_hints(ast.parse(path.read_text(encoding="utf-8"))):
                problems.append(f"{path.relative_to(ROOT)}:{line} {name}: no hint for {', '.join(lacking)}")
    assert not problems, "\n".join(problems)


def test_the_check_sees_what_lacks_a_hint():
    tree = ast.parse(
        "def f(a, b: int): ...\n"
        "def _private(a): ...\n"
        "class C:\n"
        "    def method(self, x: int) -> None: ...\n"
        "    def forward(self, x): ...\n"
        "    def _forward_helper(self, x): ...\n"
        "class _Hidden:\n"
        "    def method(self, x): ...\n"
        "    def forward(self, x) -> int: ...\n"
    )
    assert missing_hints(tree) == [
        (1, "f", ["a", "the result"]),
        (5, "forward", ["x", "the result"]),
        (9, "forward", ["x"]),
    ]
