"""Griffe extension for the API reference: Sphinx roles become links, re-wrapped methods stay methods.

StepGuard's docstrings use Sphinx cross-reference roles (:class:`~stepguard.StepReport`,
:func:`radius`, :mod:`.collapse`), which IDEs render but Markdown does not. This extension
rewrites each role into an optional autorefs reference: a link when the target is
documented on the site, plain code otherwise (``torch.nn.Module``, private helpers).

A Google-style ``Example:`` section (singular) is an admonition whose ``>>>`` lines
Markdown would turn into nested quotes; when it holds doctest lines it is read as
``Examples:``, which renders them as Python code.

It also keeps ``name = wrapper(name)`` in a class body (``step =
torch.optim.Optimizer.profile_hook_step(step)``) a method: static analysis would otherwise
record it as an attribute holding the wrapper's result, losing the signature.

Loaded by mkdocstrings from ``mkdocs.yml`` (``extensions:`` of the python handler); not part
of the package.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from griffe import Alias, Attribute, Extension, Function, GriffeLoader, Module, Object

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_EXPLICIT_TITLE = re.compile(r"^(.*?)\s*<([^<>]+)>$")
_DOCTEST_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*\n(?=(?:[ \t]*\n)*[ \t]*>>>)", re.MULTILINE)
_CALLABLE_ROLES = {"func", "meth"}
_MEMBER_ROLES = {"meth", "attr"}


class SphinxRoles(Extension):
    """Rewrite Sphinx roles into autorefs, read doctest examples as code, restore re-wrapped methods."""

    def __init__(self) -> None:
        super().__init__()
        self._functions: dict[str, Function] = {}

    # ------------------------------------------------------------ re-wrapped methods

    def on_function_instance(self, *, node: Any, func: Function, agent: Any, **kwargs: Any) -> None:
        self._functions[func.path] = func

    def on_attribute_instance(self, *, node: Any, attr: Attribute, agent: Any, **kwargs: Any) -> None:
        function = self._functions.get(attr.path)
        parent = attr.parent
        if function is None or parent is None or not _rewraps(node, attr.name):
            return
        parent.set_member(attr.name, function)
        if function.docstring is not None:
            # The attribute took over the function's docstring object; give it back.
            function.docstring.parent = function

    # ------------------------------------------------------------ roles

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            docstring = obj.docstring
            if docstring is None or ":" not in docstring.value:
                continue
            text = _DOCTEST_EXAMPLE.sub(r"\g<indent>Examples:\n", docstring.value)
            docstring.value = _ROLE.sub(lambda m, o=obj: _reference(m, o, loader), text)


def _rewraps(node: Any, name: str) -> bool:
    """Whether ``node`` is ``name = something(name, ...)``."""
    if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
        return False
    first = node.value.args[0] if node.value.args else None
    return isinstance(first, ast.Name) and first.id == name


def _walk(obj: Object) -> list[Object]:
    found = [obj]
    for member in obj.members.values():
        if isinstance(member, Alias):
            continue
        if member.is_module or member.is_class:
            found.extend(_walk(member))
        else:
            found.append(member)
    return found


def _reference(match: re.Match[str], scope: Object, loader: GriffeLoader) -> str:
    role, text = match.group(1), match.group(2).strip()
    explicit = _EXPLICIT_TITLE.match(text)
    if explicit:
        title, target = explicit.group(1), explicit.group(2).strip()
    else:
        target = text.lstrip("~")
        title = target.lstrip(".").rsplit(".", 1)[-1] if text.startswith("~") else target
        if role in _CALLABLE_ROLES:
            title += "()"
    code = f"<code>{title}</code>"
    identifier = _resolve(target, scope, loader, role)
    if identifier is None:
        return code
    return f'<autoref identifier="{identifier}" optional>{code}</autoref>'


def _resolve(target: str, scope: Object, loader: GriffeLoader, role: str) -> str | None:
    """The canonical path of ``target`` as seen from ``scope``'s docstring, or None."""
    for path in _candidates(target, scope, members=role in _MEMBER_ROLES):
        try:
            obj = loader.modules_collection[path]
            return obj.canonical_path
        except Exception:  # unknown, external or unresolvable: try the next candidate
            continue
    return None


def _candidates(target: str, scope: Object, *, members: bool) -> list[str]:
    """Where Sphinx would look: relative module paths, else the scopes from inner to outer.

    Classes are searched only for members (``:meth:``, ``:attr:``), as in Sphinx.
    """
    if target.startswith("."):
        module = scope.module
        base = module.path if module.is_init_module else module.path.rpartition(".")[0]
        rest = target[1:]
        while rest.startswith("."):
            base, rest = base.rpartition(".")[0], rest[1:]
        return [f"{base}.{rest}"]
    paths = [target]
    current: Object | None = scope
    while current is not None:
        if current.is_module or (members and current.is_class):
            paths.append(f"{current.path}.{target}")
        current = current.parent
    return paths
