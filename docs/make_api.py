"""Build the API reference from the docstrings with pdoc, and fail on broken references.

    python docs/make_api.py                 # writes docs/api/ (HTML; not committed)
    python docs/make_api.py -o /tmp/api     # elsewhere

It documents ``jaxrnn`` and every submodule (``jaxrnn.kernels`` included;
``jaxrnn.nnx``/``jaxrnn.linen`` import flax) in Google docstring format with
math. It fails (exit status 1) when

* pdoc warns (a module that cannot be imported, a docstring it cannot
  process, ...): every warning is an error;
* a cross-reference in a docstring does not resolve: the reST roles
  ``:func:`X```, ``:class:```, ``:mod:```, ``:meth:```, ``:attr:```,
  ``:data:```, ``:exc:```, ``:obj:``` (which pdoc renders as links, and
  silently as plain code when ``X`` does not exist). ``X`` resolves if it is
  importable (``jaxrnn.stack.Stack``, ``jax.lax.scan``) or names something in
  the docstring's module, class or their parents (``Stack.apply``, ``~.xla``).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["jaxrnn", "jaxrnn.kernels"]  # kernels/ is installed as jaxrnn.kernels: pdoc does not find it by walking jaxrnn
_GENERATED_INIT = re.compile(r"^Error parsing type annotation .* for [\w.]+\.__init__\. Import of ")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`~?([^`<>]+?)(?:\s*<([^>]+)>)?`")


def _importable(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - not a module; try a shorter prefix
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _resolves(target: str, doc) -> bool:
    """Whether ``target`` (as written in a role) names something, from ``doc``'s point of view."""
    target = target.strip().removesuffix("()").lstrip("~")
    if target.startswith("."):  # relative to the module (or its package)
        module = (getattr(doc, "taken_from", None) or (doc.modulename,))[0]
        candidates = [module + target, module.rpartition(".")[0] + target]
        return any(_importable(c) for c in candidates)
    if _importable(target):
        return True
    # Relative to the enclosing scopes: module.Class.attr, module.attr, parent packages.
    scopes = []
    module, qual = getattr(doc, "taken_from", None) or (doc.modulename, getattr(doc, "qualname", ""))
    parts = qual.split(".") if qual else []
    for i in range(len(parts), -1, -1):
        scopes.append(".".join([module, *parts[:i]]))
    while "." in module:
        module = module.rpartition(".")[0]
        scopes.append(module)
    return any(_importable(f"{scope}.{target}") for scope in scopes)


def _walk(doc):
    yield doc
    for member in getattr(doc, "own_members", ()) or ():
        if member.modulename != doc.modulename and not hasattr(doc, "submodules"):
            continue
        yield from _walk(member)


def broken_references(modules) -> list[str]:
    problems = []
    for module in modules:
        for doc in _walk(module):
            text = doc.docstring or ""
            for match in ROLE.finditer(text):
                target = match.group(2) or match.group(1)
                if not _resolves(target, doc):
                    problems.append(f"{doc.fullname}: broken reference {match.group(0)}")
    return sorted(set(problems))


def build(output: pathlib.Path) -> list[str]:
    """Render the reference into ``output``; return the problems (pdoc warnings, broken references)."""
    import pdoc
    import pdoc.doc
    import pdoc.extract
    import pdoc.render

    pdoc.render.configure(docformat="google", math=True, show_source=False, search=True)
    problems = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=output)
        names = [n for n in pdoc.extract.walk_specs(MODULES)]
        modules = [pdoc.doc.Module.from_name(n) for n in names]
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)) and "pdoc" not in str(w.filename):
            continue  # a library's deprecation notice while importing, not a documentation problem
        if _GENERATED_INIT.search(str(w.message)):
            continue  # the generated __init__ of a NamedTuple/dataclass: its string annotations live elsewhere
        problems.append(f"pdoc warning: {w.category.__name__}: {w.message}")
    problems += broken_references(modules)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the jaxrnn API reference with pdoc.")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=ROOT / "docs" / "api")
    args = parser.parse_args(argv)
    problems = build(args.output)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} documentation problem(s)", file=sys.stderr)
        return 1
    print(f"API reference written to {args.output}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
