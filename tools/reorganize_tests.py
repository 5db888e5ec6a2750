#!/usr/bin/env python3
"""Reorganise tests/ by behaviour (issue 17, point 7): apply tools/reorg_plan.py with Python's ``ast``.

    python tools/reorganize_tests.py            # apply the plan to tests/ (then ruff --fix I,F401 on what changed)
    python tools/reorganize_tests.py --check    # say what would happen; exit 1 if the plan does not fit the tree

Run it from anywhere; it works on the repository it lives in (``--repo`` to point elsewhere). What it does:

* every ``test_*`` function of every ``tests/test_*.py`` goes where ``MOVES`` says (its decorators, the comment
  block right above it and its parametrize data travel with it); a test the plan does not name goes to its
  file's ``"*"`` default; a test file the plan does not know, or a test with no destination, is an error
  listed on stderr (exit 1) before anything is written;
* the module-level helpers, constants and fixtures a moved test needs (transitively) travel with it: those
  named in ``SHARED`` get one home in tests/conftest.py (folded into the conftest definition when there is
  one, moved there otherwise), the others are copied to the destination (renamed with a suffix where the
  destination already holds a different definition of that name) and deleted from the source once nothing
  left there uses them; the imports they use are merged into the destination; ``pytest.importorskip`` guards
  of the source come along;
* names renamed by ``SHARED`` are renamed in the files that stay too (references and fixture arguments:
  ``ast`` names only, never strings or comments); ``from test_x import name`` elsewhere in tests/ and bench/
  follows a name whose file is deleted;
* a source left without tests is deleted; a test whose name is already taken in its destination is an error
  (pytest would silently run only one of them), fixed with ``RENAMES``;
* it is idempotent: once applied, every file is a ``"*": KEEP`` file and no SHARED helper is left outside
  conftest, so a second run writes nothing.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_plan(path: Path):
    spec = importlib.util.spec_from_file_location("reorg_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PlanError(Exception):
    """The plan does not fit the tree: nothing is written."""


# ----- reading a module -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportSpec:
    """One name bound by an import: ``import module [as name]`` or ``from module import attr [as name]``."""

    module: str
    attr: str | None  # None: `import module`
    name: str  # the bound name
    level: int = 0

    def statement(self) -> str:
        if self.attr is None:
            return f"import {self.module}" + ("" if self.name == self.module.split(".")[0] else f" as {self.name}")
        alias = "" if self.name == self.attr else f" as {self.name}"
        return f"from {'.' * self.level}{self.module} import {self.attr}{alias}"


def is_guard(node: ast.stmt) -> str | None:
    """The module a top-level ``[name =] pytest.importorskip("m")`` guards, else None."""
    value = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "importorskip"
            and value.args and isinstance(value.args[0], ast.Constant)):
        return value.args[0].value
    return None


def is_fixture(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list)


@dataclass
class Module:
    path: Path
    text: str
    tree: ast.Module = field(init=False)
    lines: list[str] = field(init=False)
    defs: dict[str, ast.stmt] = field(default_factory=dict)  # top-level def/class/assignment by bound name
    imports: dict[str, ImportSpec] = field(default_factory=dict)  # top-level imports by bound name
    guards: list[ast.stmt] = field(default_factory=list)
    others: list[ast.stmt] = field(default_factory=list)  # any other top-level statement (pytestmark, ...)
    tests: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.tree = ast.parse(self.text)
        self.lines = self.text.splitlines(keepends=True)
        for node in self.tree.body:
            if is_guard(node):
                self.guards.append(node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    name = a.asname or a.name.split(".")[0]
                    self.imports[name] = ImportSpec(a.name, None, name)
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    self.imports[a.asname or a.name] = ImportSpec(node.module or "", a.name, a.asname or a.name,
                                                                  node.level)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
                if node.name.startswith("test_") and not isinstance(node, ast.ClassDef):
                    self.tests.append(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                for n in names:
                    self.defs[n] = node
                if not names:
                    self.others.append(node)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is self.tree.body[0]:
                continue  # the docstring
            else:
                self.others.append(node)

    @property
    def name(self) -> str:
        return self.path.name

    def start(self, node: ast.stmt) -> int:
        """First line (1-based) of ``node``: its decorators and the comment block directly above it."""
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while first > 1 and self.lines[first - 2].lstrip().startswith("#"):
            first -= 1
        return first

    def refs(self, node: ast.stmt) -> set[str]:
        """Names ``node`` uses: every ast name in it, and a top-level function's arguments (fixtures)."""
        out = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            out |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
        return out

    def closure(self, roots: set[str]) -> set[str]:
        """Module-level defs reachable from ``roots`` (names), roots included when they are defs."""
        seen, todo = set(), [r for r in roots if r in self.defs]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo += [r for r in self.refs(self.defs[name]) if r in self.defs and r not in seen]
        return seen

    def rename_spans(self, node: ast.AST, mapping: dict[str, str]) -> list[tuple[int, int, int, str]]:
        """(line, byte start, byte end, new) for every ast name in ``node`` that ``mapping`` renames."""
        spans = []
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in mapping:
                spans.append((n.lineno, n.col_offset, n.end_col_offset, mapping[n.id]))
            elif isinstance(n, ast.arg) and n.arg in mapping:
                spans.append((n.lineno, n.col_offset, n.col_offset + len(n.arg.encode()), mapping[n.arg]))
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name in mapping:
                line = self.lines[n.lineno - 1].encode()
                m = re.compile(rb"(def|class)\s+(" + re.escape(n.name.encode()) + rb")\b").search(line, n.col_offset)
                spans.append((n.lineno, m.start(2), m.end(2), mapping[n.name]))
            elif isinstance(n, (ast.Global, ast.Nonlocal)) and set(n.names) & set(mapping):
                raise PlanError(f"{self.name}:{n.lineno}: `global`/`nonlocal` of a renamed name: rename it by hand")
        return spans

    def render(self, node: ast.stmt, mapping: dict[str, str]) -> str:
        """The source text of ``node`` (from ``start``) with ``mapping`` applied to its names."""
        first, last = self.start(node), node.end_lineno
        lines = [ln.encode() for ln in self.lines[first - 1:last]]
        for lineno, a, b, new in sorted(self.rename_spans(node, mapping), reverse=True):
            i = lineno - first
            lines[i] = lines[i][:a] + new.encode() + lines[i][b:]
        return b"".join(lines).decode().rstrip() + "\n"


def used_names(text: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}


def top_names(text: str) -> dict[str, str]:
    """name -> text of the top-level definitions in ``text`` (to compare two definitions of one name)."""
    mod = Module(Path("x.py"), text)
    return {n: ast.unparse(node) for n, node in mod.defs.items()}


# ----- the plan against the tree ------------------------------------------------------------------------
@dataclass
class Outgoing:
    """What one destination receives from one source."""

    tests: list[str] = field(default_factory=list)


def destinations(mods: dict[str, Module], plan) -> tuple[dict[tuple[str, str], str], list[str], list[str]]:
    """(source, test) -> destination file name; errors; warnings."""
    errors, warnings, dest = [], [], {}
    unknown = sorted(set(mods) - set(plan.MOVES) - {"conftest.py"})
    if unknown:
        errors.append("test files the plan does not know (add them to MOVES in tools/reorg_plan.py, with a \"*\"): "
                      + ", ".join(unknown))
    for name, mod in sorted(mods.items()):
        if name == "conftest.py" or name not in plan.MOVES:
            continue
        moves = plan.MOVES[name]
        for key in moves:
            target = (mods.get(moves[key]) if moves[key] != plan.KEEP else None)
            if key != "*" and key not in mod.tests and not (target and key in target.tests) and not (
                    target and plan.RENAMES.get((name, key)) in target.tests):
                warnings.append(f"{name}: the plan names {key}, which is not in the file (renamed or gone?)")
        for test in mod.tests:
            d = moves.get(test, moves.get("*"))
            if d is None:
                errors.append(f"{name}::{test}: no destination and the file has no \"*\" default")
                continue
            dest[(name, test)] = name if d == plan.KEEP else d
        for node in mod.others:
            if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in getattr(node, "targets", [])) and any(
                    dest.get((name, t), name) != name for t in mod.tests):
                errors.append(f"{name}: has a module-level pytestmark and tests that move: give them the marks "
                              "by hand first")
    for src, test in plan.RENAMES:
        if (src, test) not in dest and src in mods:
            warnings.append(f"RENAMES names {src}::{test}, which is not in the tree")
    return dest, errors, warnings


# ----- applying it ----------------------------------------------------------------------------------------
@dataclass
class Target:
    """A file being written: its kept text and what is appended to it."""

    name: str
    base: Module | None  # the existing file, when there is one
    names: dict[str, str] = field(default_factory=dict)  # top-level name -> normalised definition text
    bound: dict[str, ImportSpec] = field(default_factory=dict)
    new_imports: list[ImportSpec] = field(default_factory=list)
    new_guards: list[str] = field(default_factory=list)
    guarded: set[str] = field(default_factory=set)
    chunks: list[str] = field(default_factory=list)
    future: bool = False


class Reorganizer:
    def __init__(self, repo: Path, plan):
        self.repo, self.plan = repo, plan
        self.tests_dir = repo / "tests"
        self.mods = {p.name: Module(p, p.read_text()) for p in sorted(self.tests_dir.glob("test_*.py"))}
        self.conftest = Module(self.tests_dir / "conftest.py", (self.tests_dir / "conftest.py").read_text())
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.report: list[str] = []
        self.removed: dict[str, set[str]] = collections.defaultdict(set)  # source -> defs deleted from it
        self.homes: dict[tuple[str, str], tuple[str, str]] = {}  # (source, name) -> (module stem, new name)
        self.copies: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self.moved: collections.Counter[str] = collections.Counter()

    # -- names ------------------------------------------------------------------------------------------
    def shared(self, src: str) -> dict[str, str]:
        """SHARED renames that apply to ``src`` (only those it still defines or already uses)."""
        return {old: new for (s, old), new in self.plan.SHARED.items() if s == src}

    def external_imports(self) -> dict[str, set[str]]:
        """test module stem -> names other files import from it (ast imports in tests/ and bench/)."""
        out = collections.defaultdict(set)
        for path in sorted(self.tests_dir.glob("*.py")) + sorted((self.repo / "bench").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                    if node.module != path.stem:
                        out[node.module] |= {a.name for a in node.names}
        return out

    # -- the plan -------------------------------------------------------------------------------------
    def run(self) -> dict[Path, str | None]:
        """path -> new text (None: delete). Raises PlanError, listing every problem, before anything is written."""
        dest, errors, warnings = destinations(self.mods, self.plan)
        self.errors += errors
        self.warnings += warnings
        external = self.external_imports()
        outgoing: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for (src, test), d in dest.items():
            if d != src:
                outgoing[src][d].append(test)
        shared_present = {(s, n) for (s, n) in self.plan.SHARED if s in self.mods and n in self.mods[s].defs}
        if self.errors:
            raise PlanError("\n".join(self.errors))
        if not outgoing and not shared_present:
            return {}

        targets: dict[str, Target] = {}

        def target(name: str) -> Target:
            if name not in targets:
                base = self.conftest if name == "conftest.py" else self.mods.get(name)
                t = Target(name, base)
                if base is not None:
                    own = self.shared(name)
                    t.names = {n: self.norm(base, node, own) for n, node in base.defs.items()
                               if (name, n) not in self.plan.SHARED}
                    t.bound = dict(base.imports)
                    t.guarded = {is_guard(g) for g in base.guards}
                    t.future = "__future__" in {s.module for s in base.imports.values()}
                    for g in base.guards:
                        if isinstance(g, ast.Assign):
                            for n in g.targets:
                                t.names[n.id] = "guard"
                targets[name] = t
            return targets[name]

        conf = target("conftest.py")
        # 1. SHARED definitions: fold into conftest or move there
        conftest_defs = {n: node for n, node in self.conftest.defs.items()}
        for (src, old), new in sorted(self.plan.SHARED.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if (src, old) not in shared_present:
                continue
            mod = self.mods[src]
            self.removed[src].add(old)
            self.homes[(src, old)] = ("conftest", new)
            if new in conftest_defs or new in conf.names:
                self.report.append(f"fold    {src}::{old} -> conftest.{new}")
                continue
            self.report.append(f"move    {src}::{old} -> conftest.{new}")
            text = self.plan.SHARED_TEXT.get(new)
            mapping = self.shared(src)
            if text is None:  # a section header above it belongs to the source's tests, not to conftest
                text = re.sub(r"\A(#\s*-{3,}.*\n)+", "", mod.render(mod.defs[old], mapping))
                deps = mod.closure(mod.refs(mod.defs[old])) - {old}
            else:
                text = text.strip() + "\n"
                deps = set()
            for dep in sorted(deps, key=lambda n: mod.defs[n].lineno):
                if (src, dep) in self.plan.SHARED:
                    continue  # it has its own entry
                dep_text = mod.render(mod.defs[dep], mapping)
                if dep in conf.names and conf.names[dep] != self.norm(mod, mod.defs[dep], mapping):
                    self.errors.append(f"conftest already defines {dep} differently from {src}'s (which "
                                       f"conftest.{new} needs): add ({src!r}, {dep!r}) to SHARED")
                    continue
                if dep not in conf.names:
                    conf.names[dep] = self.norm(mod, mod.defs[dep], mapping)
                    conf.chunks.append(dep_text)
            conf.names[new] = text
            conf.chunks.append(text)
            self.add_imports(conf, mod, text, src)

        # 2. moved tests and the helpers they need
        for src in sorted(outgoing):
            mod = self.mods[src]
            base_map = {**self.shared(src),
                        **{h: n for (s, h), n in self.plan.HELPER_RENAMES.items() if s == src}}
            for d in sorted(outgoing[src]):
                tests = sorted(outgoing[src][d], key=lambda t: mod.defs[t].lineno)
                t = target(d)
                mapping = dict(base_map)
                for test in tests:
                    mapping[test] = self.plan.RENAMES.get((src, test), test)
                helpers = mod.closure({r for test in tests for r in mod.refs(mod.defs[test])}) - set(tests)
                helpers = {h for h in helpers if (src, h) not in self.plan.SHARED}
                helpers -= {h for h in helpers if h.startswith("test_")}
                reuse = set()
                for h in sorted(helpers, key=lambda n: mod.defs[n].lineno):
                    cand = mapping.get(h, h)
                    text = self.norm(mod, mod.defs[h], mapping)
                    if cand in t.names or cand in t.bound:
                        if t.names.get(cand) == text:
                            reuse.add(h)
                            mapping[h] = cand
                            continue
                        suffix = src.removeprefix("test_").removesuffix(".py")
                        new = f"{cand}_{suffix}" if not cand.isupper() else f"{cand}_{suffix.upper()}"
                        self.warnings.append(f"{d}: {cand} from {src} differs from the one already there: "
                                             f"renamed {new}")
                        cand = new
                    mapping[h] = cand
                    t.names[cand] = text
                seen_nodes = set()
                for h in sorted(helpers - reuse, key=lambda n: mod.defs[n].lineno):
                    node = mod.defs[h]
                    if id(node) in seen_nodes:  # `a = b = ...` or `a, b = ...`: one statement
                        continue
                    seen_nodes.add(id(node))
                    t.chunks.append(self.retarget(mod.render(node, mapping), src, d))
                    self.copies[(src, h)].add(d)
                    self.homes.setdefault((src, h), (d.removesuffix(".py"), mapping[h]))
                for test in tests:
                    new = mapping[test]
                    if new in t.names or new in t.bound:
                        self.errors.append(f"{d}: {new} (from {src}) is already defined there: add a RENAMES entry")
                        continue
                    t.names[new] = "test"
                    text = self.retarget(mod.render(mod.defs[test], mapping), src, d)
                    t.chunks.append(text)
                    self.homes[(src, test)] = (d.removesuffix(".py"), new)
                    self.report.append(f"test    {src}::{test} -> {d}" + ("" if new == test else f" as {new}"))
                    self.moved[d] += 1
                body = "".join(t.chunks)
                self.add_imports(t, mod, body, src)
                for g in mod.guards:
                    if is_guard(g) not in t.guarded:
                        t.guarded.add(is_guard(g))
                        t.new_guards.append(mod.render(g, {}))
                        for n in getattr(g, "targets", []):
                            t.names[n.id] = "guard"
                t.future |= "__future__" in {s.module for s in mod.imports.values()}

        # 3. what leaves each source, and which sources are left without tests
        for src, by_dest in outgoing.items():
            mod = self.mods[src]
            gone = {test for tests in by_dest.values() for test in tests}
            self.removed[src] |= gone
            left = [test for test in mod.tests if test not in gone]
            moved_helpers = mod.closure({r for test in gone for r in mod.refs(mod.defs[test])}) - gone
            keep_roots = set(left) | {n for g in mod.guards for n in mod.refs(g)}
            keep_roots |= {n for node in mod.others for n in mod.refs(node)}
            keep_roots |= external.get(src.removesuffix(".py"), set())
            keep_roots |= {n for n in mod.defs if n not in moved_helpers and n not in gone}
            keep_roots -= {n for (s, n) in self.plan.SHARED if s == src}
            kept = mod.closure(keep_roots)
            if not left:
                lost = external.get(src.removesuffix(".py"), set()) - {n for (s, n) in self.homes if s == src}
                if lost:
                    self.errors.append(f"{src} is emptied but other files import {sorted(lost)} from it, and those "
                                       "move nowhere: add them to SHARED")
            else:
                self.removed[src] |= (moved_helpers - kept)
        if self.errors:
            raise PlanError("\n".join(self.errors))

        # 4. render every file that changes
        out: dict[Path, str | None] = {}
        for name, mod in self.mods.items():
            if name in outgoing and not [t for t in mod.tests if t not in self.removed[name]]:
                out[mod.path] = None
                self.report.append(f"delete  {name}")
        names_to_render = set(targets) | {n for n in self.removed if self.removed[n]} | {
            s for (s, _) in shared_present}
        for name in sorted(names_to_render):
            path = self.tests_dir / name
            if out.get(path, "") is None:
                continue
            out[path] = self.render_file(targets.get(name) or target(name))
        if self.errors:
            raise PlanError("\n".join(self.errors))
        # 5. imports of moved names elsewhere
        files = set(self.tests_dir.glob("*.py")) | set((self.repo / "bench").glob("*.py")) | set(out)
        for path in sorted(files):
            if out.get(path, "") is None:
                continue
            text = out.get(path) or path.read_text()
            fixed = self.follow_imports(path, text, out)
            if fixed != text:
                out[path] = fixed
        return {p: t for p, t in out.items() if t is None or not p.exists() or t != p.read_text()}

    def norm(self, mod: Module, node: ast.stmt, mapping: dict[str, str]) -> str:
        text = mod.render(node, mapping)
        try:
            return ast.unparse(ast.parse(text))
        except SyntaxError:
            return text

    @staticmethod
    def retarget(text: str, src: str, dest: str) -> str:
        """`from test_src import` inside moved text (a child process's script) now names the destination."""
        return text.replace(f"from {src.removesuffix('.py')} import", f"from {dest.removesuffix('.py')} import")

    def add_imports(self, t: Target, mod: Module, text: str, src: str) -> None:
        used = used_names(text)
        wanted = [mod.imports[n] for n in sorted(used) if n in mod.imports]
        for (s, old), new in self.plan.SHARED.items():
            if new in used and new not in t.names and new not in t.bound and t.name != "conftest.py":
                node = self.conftest.defs.get(new)
                fixture = is_fixture(node) if node is not None else self.shared_is_fixture(s, old, new)
                if not fixture:
                    wanted.append(ImportSpec("conftest", new, new))
        for spec in wanted:
            if spec.module == "__future__":
                continue
            if t.name == "conftest.py" and spec.module == "conftest":
                continue
            have = t.bound.get(spec.name)
            if have == spec:
                continue
            if have is not None or (spec.name in t.names and t.names[spec.name] != "guard"):
                self.errors.append(f"{t.name}: {spec.statement()} (for {src}'s tests) clashes with "
                                   f"{have.statement() if have else 'a definition of ' + spec.name} there")
                continue
            t.bound[spec.name] = spec
            t.new_imports.append(spec)

    def shared_is_fixture(self, src: str, old: str, new: str) -> bool:
        if new in self.plan.SHARED_TEXT:
            return "fixture" in self.plan.SHARED_TEXT[new]
        mod = self.mods.get(src)
        return mod is not None and old in mod.defs and is_fixture(mod.defs[old])

    def render_file(self, t: Target) -> str:
        mod = t.base
        if mod is None:
            doc = self.plan.DESTINATIONS.get(t.name) or f"Tests moved here by tools/reorganize_tests.py ({t.name})."
            head = f'"""{doc}"""\n\n' + ("from __future__ import annotations\n\n" if t.future else "")
            imports = self.import_block(t.new_imports, noqa=False)
            guards = "".join(t.new_guards)
            text = head + imports + ("\n" + guards if guards else "")
        else:
            # the existing file: deletions and SHARED renames of its own names, new imports after its imports
            removed = self.removed.get(t.name, set())
            mapping = {old: new for old, new in self.shared(t.name).items()}
            drop = [(mod.start(mod.defs[n]), mod.defs[n].end_lineno) for n in removed if n in mod.defs]
            spans = []
            for node in mod.tree.body:
                if any(mod.start(node) >= a and node.end_lineno <= b for a, b in drop):
                    continue
                spans += mod.rename_spans(node, mapping)
            lines = [ln.encode() for ln in mod.lines]
            for lineno, a, b, new in sorted(spans, reverse=True):
                lines[lineno - 1] = lines[lineno - 1][:a] + new.encode() + lines[lineno - 1][b:]
            for a, b in sorted(set(drop), reverse=True):
                del lines[a - 1:b]
            body = [ln.decode() for ln in lines]
            self.add_imports(t, mod, "".join(body), t.name)  # SHARED names its own tests now take from conftest
            at, noqa = self.import_point(mod, drop)
            block = self.import_block(t.new_imports, noqa=noqa) + "".join(t.new_guards)
            if block:
                body.insert(at, block)
            text = "".join(body)
            if t.future and "from __future__ import annotations" not in text and t.chunks:
                text = self.add_future(text)
        for chunk in t.chunks:
            text = text.rstrip("\n") + "\n\n\n" + chunk
        text = re.sub(r"\n{4,}", "\n\n\n", text).rstrip("\n") + "\n"
        return text

    @staticmethod
    def add_future(text: str) -> str:
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        at = tree.body[0].end_lineno if tree.body and isinstance(tree.body[0], ast.Expr) else 0
        lines.insert(at, ("\n" if at else "") + "from __future__ import annotations\n")
        return "".join(lines)

    @staticmethod
    def import_point(mod: Module, drop) -> tuple[int, bool]:
        """(line index, after the drops, where new imports go; whether a non-import statement comes before)."""
        at, noqa, other_seen = 0, False, False
        for i, node in enumerate(mod.tree.body):
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                at = node.end_lineno
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                at, noqa = node.end_lineno, other_seen
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or (
                    isinstance(node, (ast.Assign, ast.AnnAssign)) and not is_guard(node)):
                break
            else:
                other_seen = True
        return at - sum(b - a + 1 for a, b in set(drop) if b <= at), noqa

    @staticmethod
    def import_block(specs: list[ImportSpec], noqa: bool) -> str:
        if not specs:
            return ""
        plain = sorted({s.statement() for s in specs if s.attr is None})
        froms = collections.defaultdict(list)
        for s in specs:
            if s.attr is not None:
                froms[("." * s.level) + s.module].append(s.attr if s.name == s.attr else f"{s.attr} as {s.name}")
        lines = plain + [f"from {m} import {', '.join(sorted(set(n)))}" for m, n in sorted(froms.items())]
        tail = "  # noqa: E402" if noqa else ""
        return "".join(ln + tail + "\n" for ln in lines)

    def follow_imports(self, path: Path, text: str, out: dict[Path, str | None]) -> str:
        """Rewrite ``from test_x import a`` where ``a`` left test_x (its file deleted or ``a`` removed)."""
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return text
        lines = text.splitlines(keepends=True)
        edits, renames = [], {}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_")):
                continue
            src = node.module + ".py"
            if src not in self.mods:
                continue
            own = node.module == path.stem  # a test moved into the file it imported from
            gone = out.get(self.tests_dir / src, "") is None
            groups = collections.defaultdict(list)
            for a in node.names:
                if gone or a.name in self.removed.get(src, set()):
                    home = self.homes.get((src, a.name))
                    if home is None:
                        self.errors.append(f"{path.name}: imports {a.name} from {src}, which loses it")
                        continue
                    module, new = home
                    if module == path.stem:  # it now lives in this very file
                        if a.asname is None and new != a.name:
                            renames[a.name] = new
                        continue
                    groups[module].append(new if a.asname in (None, new) else f"{new} as {a.asname}")
                    if a.asname is None and new != a.name:
                        renames[a.name] = new
                elif own and a.asname in (None, a.name):
                    continue  # a name of this very module: no import needed
                else:
                    groups[node.module].append(a.name if a.asname is None else f"{a.name} as {a.asname}")
            indent = lines[node.lineno - 1][:node.col_offset]
            tail = "  # noqa: E402\n" if "noqa: E402" in "".join(lines[node.lineno - 1:node.end_lineno]) else "\n"
            new_text = "".join(f"{indent}from {m} import {', '.join(ns)}{tail}" for m, ns in groups.items())
            if not new_text.strip():
                new_text = f"{indent}pass\n" if node.col_offset else ""
            edits.append((node.lineno, node.end_lineno, new_text))
        if self.errors:
            raise PlanError("\n".join(self.errors))
        for a, b, new_text in sorted(edits, reverse=True):
            lines[a - 1:b] = [new_text]
        text = "".join(lines)
        if renames:  # the file now uses the name's new spelling, as the files it moved from do
            mod = Module(path, text)
            spans = [s for node in mod.tree.body for s in mod.rename_spans(node, renames)]
            raw = [ln.encode() for ln in mod.lines]
            for lineno, a, b, new in sorted(spans, reverse=True):
                raw[lineno - 1] = raw[lineno - 1][:a] + new.encode() + raw[lineno - 1][b:]
            text = b"".join(raw).decode()
        return text


# ----- long lines the moves made (ruff E501): wrap at a comma inside brackets, never changing the ast ----------
def _wrap_once(text: str, limit: int) -> str | None:
    """``text`` with its first wrappable too-long line wrapped once, or None when none can be."""
    lines = text.splitlines(keepends=True)
    by_line = collections.defaultdict(list)
    depth_at = {}  # line -> bracket depth at its start
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        depth_at.setdefault(tok.start[0], depth)
        if tok.type == tokenize.OP:
            depth += (tok.string in "([{") - (tok.string in ")]}")
        if tok.start[0] == tok.end[0]:
            by_line[tok.start[0]].append(tok)
    for no, line in enumerate(lines, 1):
        if len(line.rstrip("\n")) <= limit or no not in by_line:
            continue
        toks = by_line[no]
        indent = len(line) - len(line.lstrip())
        stack, best, in_for = [], None, set()  # in_for: bracket depths inside a `for a, b in` target
        for i, t in enumerate(toks):
            if t.type == tokenize.NAME and t.string in ("for", "in"):
                (in_for.add if t.string == "for" else in_for.discard)(len(stack))
            if len(stack) in in_for:
                continue
            if t.type == tokenize.OP and t.string in "([{":
                stack.append(t.start[1])
            elif t.type == tokenize.OP and t.string in ")]}":
                if not stack:
                    break  # closes a bracket opened above: stop looking
                stack.pop()
            elif (t.type == tokenize.OP and t.string == "," and t.end[1] <= limit and i + 1 < len(toks)
                  and toks[i + 1].type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT)):
                cand = ((len(stack), -t.end[1], stack[-1] + 1) if stack
                        else (0, -t.end[1], indent) if depth_at.get(no, 0) > 0 else None)
                if cand is not None and (best is None or cand < best):
                    best = cand  # the outermost bracket, then the rightmost comma in it
        if best is not None:
            _, at, col = best
            at = -at
            lines[no - 1] = line[:at].rstrip() + "\n" + " " * col + line[at:].lstrip(" ")
            return "".join(lines)
        comment = [t for t in toks if t.type == tokenize.COMMENT]
        if comment and len(line[:comment[0].start[1]].rstrip()) <= limit:
            code = line[:comment[0].start[1]].rstrip()
            lines[no - 1] = " " * indent + comment[0].string + "\n" + code + "\n"
            return "".join(lines)
    return None


def wrap_long_lines(text: str, limit: int = 120) -> str:
    """Wrap the lines over ``limit`` that can be wrapped safely (the ast is unchanged); leave the others."""
    want = ast.dump(ast.parse(text))
    for _ in range(1000):
        new = _wrap_once(text, limit)
        if new is None or new == text:
            break
        try:
            if ast.dump(ast.parse(new)) != want:
                break
        except SyntaxError:
            break
        text = new
    return text


def ruff_fix(repo: Path, paths: list[Path]) -> None:
    ruff = shutil.which("ruff")
    if ruff is None or not paths:
        print("ruff not found: run `ruff check --fix --select I,F401 tests` yourself", file=sys.stderr)
        return
    subprocess.run([ruff, "check", "--fix", "--select", "I,F401", "--quiet", *map(str, paths)], cwd=repo,
                   check=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent, help="the repository (default: this one)")
    parser.add_argument("--plan", type=Path, default=HERE / "reorg_plan.py")
    parser.add_argument("--check", action="store_true", help="report only; write nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every test moved and helper shared")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    reorg = Reorganizer(args.repo.resolve(), plan)
    try:
        changes = reorg.run()
    except PlanError as e:
        for w in reorg.warnings:
            print("warning:", w, file=sys.stderr)
        print("reorganize_tests: the plan does not fit the tree; nothing written:\n" + str(e), file=sys.stderr)
        return 1
    for w in reorg.warnings:
        print("warning:", w, file=sys.stderr)
    for (src, h), ds in sorted(reorg.copies.items()):
        kept = h not in reorg.removed.get(src, set()) and changes.get(reorg.tests_dir / src, "") is not None
        if len(ds) > 1 or kept:
            where = sorted(ds) + ([src] if kept else [])
            print(f"note: helper {src}::{h} is now defined in {where}: consider SHARED", file=sys.stderr)
    if args.verbose:
        print("\n".join(reorg.report))
    if not changes:
        print("reorganize_tests: nothing to do (the tree already follows the plan)")
        return 0
    print(f"reorganize_tests: {sum(reorg.moved.values())} tests moved, {len(changes)} files changed"
          + (" (check only)" if args.check else ""))
    for d, n in sorted(reorg.moved.items()):
        print(f"  {n:4d} -> {d}")
    if args.check:
        for p, t in sorted(changes.items()):
            print(("  delete " if t is None else "  write  ") + str(p.relative_to(reorg.repo)))
        return 0
    for p, t in changes.items():
        if t is None:
            p.unlink()
        else:
            p.write_text(wrap_long_lines(t))
    ruff_fix(reorg.repo, [p for p, t in changes.items() if t is not None])
    return 0


if __name__ == "__main__":
    sys.exit(main())
