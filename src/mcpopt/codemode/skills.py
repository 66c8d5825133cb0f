"""Skills: functions code saves with `save_skill` and imports in later calls, kept per principal.

Inside the sandbox:
```python
def top_errors(lines, n=5):
    "The n most frequent ERROR lines."
    ...
save_skill(top_errors)                           # source found in this session's code
save_skill("shout", "def shout(s):\\n    return s.upper()", "Upper-case a string.")
# later, in any session of the same principal:
from skills import top_errors                    # or: import skills; skills.top_errors(...)
```
A skill is Python source defining one top-level function of the skill's name (sync or async,
no decorators); its docstring (or the one given) describes it. `save_skill(fn)` looks the
function's source up in the cells of the current code session (this call's code included):
the sandbox never hands the gateway code objects, only names and text. Skills run inside the
sandbox like any other code: a skill is defined by the prelude of the executions that use it.

`from skills import a, b` / `import skills` are rewritten on the gateway before the code
runs (`rewrite_imports`: the statement becomes assignments on the same line, so tracebacks keep
their line numbers); the backends need no import machinery for it.

Storage: SQLite (`<data dir>/skills.db`, one row per principal and name, WAL), the same file for
every gateway process of one data dir. `search_lines` ranks a principal's skills for
`search_tools` (BM25 over name and docstring, bm25s), so they are listed beside tools.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import keyword
import re
import sqlite3
import textwrap
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_STOP = frozenset("a an and are as at be by for from in is it of on or the to with".split())
SKILLS_MODULE = "skills"


class SkillError(ValueError):
    """A skill cannot be saved or found (the message is what the sandboxed code sees)."""


@dataclass(slots=True)
class Skill:
    """One saved skill.

    Attributes:
        principal: whose it is.
        name: its name (a Python identifier; the function's name).
        code: Python source defining the function.
        doc: what it does (the docstring).
        signature: `name(params)` as written.
        created, updated: UNIX times (s).
    """

    principal: str
    name: str
    code: str
    doc: str
    signature: str
    created: float
    updated: float

    def line(self) -> str:
        """One compact line for listings and `search_tools`."""
        first = (self.doc.strip().splitlines() or [""])[0]
        return f"skills.{self.signature} - {first} (skill: from skills import {self.name})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "name": self.name,
            "signature": self.signature,
            "doc": self.doc,
            "code": self.code,
            "created": self.created,
            "updated": self.updated,
        }


# ---- source handling --------------------------------------------------------------------------
def check_source(name: str, code: str, max_bytes: int = 20_000) -> tuple[str, str]:
    """Validate a skill's source; returns `(signature, docstring)`.

    Raises:
        SkillError: a bad name, oversized or unparsable code, or code that does not define
            exactly the function `name` at top level (no decorators).
    """
    if not isinstance(name, str) or not NAME.match(name) or keyword.iskeyword(name):
        raise SkillError(f"skill name {name!r} must be a Python identifier (letters, digits, _; at most 64)")
    if name == SKILLS_MODULE:
        raise SkillError("a skill cannot be called 'skills'")
    if not isinstance(code, str) or not code.strip():
        raise SkillError("a skill's code must be Python source defining the function")
    if len(code.encode()) > max_bytes:
        raise SkillError(f"a skill's code may be at most {max_bytes:,} bytes")
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise SkillError(f"the skill's code does not parse: {exc.msg} (line {exc.lineno})") from None
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name]
    if not funcs:
        raise SkillError(f"the skill's code must define a top-level function {name!r}")
    fn = funcs[-1]
    if fn.decorator_list:
        raise SkillError("a skill function cannot have decorators")
    return _signature(fn), ast.get_docstring(fn) or ""


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(fn.args)
    prefix = "async " if isinstance(fn, ast.AsyncFunctionDef) else ""
    return f"{prefix}{fn.name}({args})" if prefix else f"{fn.name}({args})"


def find_source(name: str, cells: Iterable[str]) -> str:
    """The source of the last top-level `def name` in `cells` (oldest first).

    Raises:
        SkillError: no such function in the session's code.
    """
    found: str | None = None
    for cell in cells:
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
                found = ast.get_source_segment(cell, node) or found
    if found is None:
        raise SkillError(
            f"no top-level function {name!r} in this code session's code: define it at top level, "
            "or pass its source: save_skill(name, code, docstring)"
        )
    return textwrap.dedent(found)


def skill_name_of(value: Any) -> str:
    """The function name behind what the sandbox passed: a name, or a function's text
    (monty hands `<function 'f' at 0x0>`; the wasm bootstrap passes `__name__`)."""
    if isinstance(value, str):
        m = re.fullmatch(r"<function '?([A-Za-z_]\w*)'? at 0x[0-9a-fA-F]+>", value.strip())
        return m.group(1) if m else value
    raise SkillError("save_skill takes a function or its name first")


def used_skills(code: str) -> tuple[set[str], bool]:
    """`(names, all)`: the skills `code` refers to (`from skills import x`, `skills.x`), and
    whether it needs them all (`import skills` with other uses, or `skills` passed around)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set(), False
    names: set[str] = set()
    attrs = 0
    bare = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == SKILLS_MODULE and node.level == 0:
            for alias in node.names:
                if alias.name == "*":
                    return names, True
                names.add(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == SKILLS_MODULE:
            names.add(node.attr)
            attrs += 1
        elif isinstance(node, ast.Name) and node.id == SKILLS_MODULE:
            bare += 1
    return names, bare > attrs


def rewrite_imports(code: str) -> str:
    """`code` with `from skills import a as b` -> `b = skills.a` and `import skills` -> `pass`,
    in place (same lines), so no backend needs an importable `skills` module."""
    if SKILLS_MODULE not in code:
        return code
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    edits: list[tuple[int, int, int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        text: str | None = None
        if isinstance(node, ast.ImportFrom) and node.module == SKILLS_MODULE and node.level == 0:
            if any(a.name == "*" for a in node.names):
                continue
            text = "; ".join(f"{a.asname or a.name} = {SKILLS_MODULE}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import) and any(a.name == SKILLS_MODULE for a in node.names):
            rest = [a for a in node.names if a.name != SKILLS_MODULE]
            parts = ["pass"] + [
                f"{a.asname} = {SKILLS_MODULE}" for a in node.names if a.name == SKILLS_MODULE and a.asname
            ]
            if rest:
                parts.append("import " + ", ".join(f"{a.name} as {a.asname}" if a.asname else a.name for a in rest))
            text = "; ".join(parts)
        if text is not None and node.end_lineno is not None and node.end_col_offset is not None:
            edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, text))
    if not edits:
        return code
    lines = code.splitlines(keepends=True)
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        first, last = lines[lineno - 1], lines[end_lineno - 1]
        head = first.encode()[:col].decode()
        tail = last.encode()[end_col:].decode()
        padding = "\n" * (end_lineno - lineno)  # keep the line count of a multi-line import
        lines[lineno - 1 : end_lineno] = [
            head + text + tail.rstrip("\n") + padding + ("\n" if tail.endswith("\n") else "")
        ]
    return "".join(lines)


def prelude(skills: Iterable[Skill]) -> str:
    """Python source that defines `skills` (kept across a session's calls) with these skills on it."""
    out = [
        "class _McpoptSkills:\n    pass\n",
        "try:\n    skills\nexcept NameError:\n    skills = _McpoptSkills()\n",
    ]
    for skill in skills:
        body = textwrap.indent(skill.code.rstrip() + f"\nreturn {skill.name}\n", "    ")
        maker = f"__mcpopt_skill_{skill.name}"
        out.append(f"def {maker}():\n{body}skills.{skill.name} = {maker}()\n")
    return "".join(out)


# ---- storage ----------------------------------------------------------------------------------
class SkillStore:
    """Skills in SQLite, per principal.

    Args:
        path: the database file (created with its folder; WAL journal).
        max_per_principal: a principal's skill count limit (saving a new one past it fails).

    Methods are synchronous and quick (a few small statements); call them from a worker
    thread on a busy event loop. One connection per thread.
    """

    def __init__(self, path: str | Path, max_per_principal: int = 200) -> None:
        self.path = Path(path)
        self.max_per_principal = max_per_principal
        self._local = threading.local()
        self._ready = False

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS skills (principal TEXT NOT NULL, name TEXT NOT NULL, code TEXT NOT NULL, "
                "doc TEXT NOT NULL, signature TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, "
                "PRIMARY KEY (principal, name))"
            )
            self._local.conn = conn
        return conn

    def save(self, principal: str, name: str, code: str, doc: str | None = None, max_bytes: int = 20_000) -> Skill:
        """Save (or replace) a skill; `doc` defaults to the function's docstring.

        Raises:
            SkillError: invalid source (see `check_source`) or the principal's limit reached.
        """
        signature, docstring = check_source(name, code, max_bytes)
        doc = (doc if isinstance(doc, str) and doc.strip() else docstring).strip()
        now = time.time()
        db = self._db()
        with db:
            exists = db.execute("SELECT created FROM skills WHERE principal=? AND name=?", (principal, name)).fetchone()
            if exists is None:
                (count,) = db.execute("SELECT COUNT(*) FROM skills WHERE principal=?", (principal,)).fetchone()
                if count >= self.max_per_principal:
                    raise SkillError(
                        f"this principal has {count} skills, the most allowed "
                        "(gateway.code_mode.skills.max_per_principal): remove some with `mcpopt skills rm`"
                    )
            created = exists[0] if exists else now
            db.execute(
                "INSERT OR REPLACE INTO skills VALUES (?, ?, ?, ?, ?, ?, ?)",
                (principal, name, code, doc, signature, created, now),
            )
        return Skill(principal, name, code, doc, signature, created, now)

    def get(self, principal: str, name: str) -> Skill | None:
        row = self._db().execute("SELECT * FROM skills WHERE principal=? AND name=?", (principal, name)).fetchone()
        return Skill(*row) if row else None

    def list(self, principal: str | None = None) -> builtins.list[Skill]:
        """A principal's skills (all principals' when None), by principal and name."""
        db = self._db()
        if principal is None:
            rows = db.execute("SELECT * FROM skills ORDER BY principal, name").fetchall()
        else:
            rows = db.execute("SELECT * FROM skills WHERE principal=? ORDER BY name", (principal,)).fetchall()
        return [Skill(*r) for r in rows]

    def many(self, principal: str, names: Iterable[str]) -> builtins.list[Skill]:
        wanted = sorted(set(names))
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = (
            self._db()
            .execute(
                f"SELECT * FROM skills WHERE principal=? AND name IN ({marks}) ORDER BY name", (principal, *wanted)
            )
            .fetchall()
        )
        return [Skill(*r) for r in rows]

    def remove(self, principal: str, name: str) -> bool:
        """Delete a skill; False when there was none."""
        db = self._db()
        with db:
            cur = db.execute("DELETE FROM skills WHERE principal=? AND name=?", (principal, name))
        return cur.rowcount > 0

    def search(self, principal: str, query: str, k: int = 5) -> builtins.list[Skill]:
        """A principal's skills ranked for `query` (BM25 over name, signature and docstring; only
        skills that share a term with the query)."""
        skills = self.list(principal)
        if not skills or not query.strip():
            return []
        import bm25s

        def words(text: str) -> builtins.list[str]:
            split = re.split(r"[^a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower())
            return [w for w in split if w and w not in _STOP]

        corpus = [words(f"{s.name.replace('_', ' ')} {s.signature} {s.doc}") for s in skills]
        q = words(query)
        vocab = {w for doc in corpus for w in doc}
        if not any(w in vocab for w in q):
            return []
        retriever = bm25s.BM25()
        retriever.index(corpus, show_progress=False)
        docs, scores = retriever.retrieve([[w for w in q if w in vocab]], k=min(k, len(skills)), show_progress=False)
        return [skills[int(i)] for i, score in zip(docs[0], scores[0], strict=True) if score > 0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._local.conn = None
