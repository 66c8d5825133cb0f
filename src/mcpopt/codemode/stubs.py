"""Python stubs for MCP tools: `tools.<server>.<tool>(...)` with typed signatures and docstrings.

From each tool's JSON Schema (`inputSchema`, and `outputSchema` when given):
- names become identifiers: the server namespace and the tool name are sanitized (`get-sum` ->
  `get_sum`, `2fa` -> `_2fa`, keywords get a trailing `_`, clashes get `_2`, `_3`...), and so are
  parameter names; `ToolNamespaces` keeps the mapping back to gateway names and argument keys;
- types map to annotations: string -> str, integer -> int, number -> float, boolean -> bool,
  null -> None, array -> list[...], object -> dict[str, ...], enum/const -> Literal[...],
  anyOf/oneOf/type lists -> unions, anything else -> Any;
- required parameters come first (positional or keyword); optional ones are keyword-only with
  default None, which means "not sent" (the tool's own default applies, shown in the docstring);
- the docstring holds the tool's description, each parameter's description (with the shape of
  nested objects, e.g. `list[{name: str, observations: list[str]}]`) and what comes back.

`stub_for(gateway_name)` renders one tool for `get_tool_schema`; `prelude(code)` renders the
executable Python that defines `tools` inside a sandbox (signatures only, no annotations or
docstrings: cheaper to parse, and nothing there depends on typing support).
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types

CALL_FUNCTION = "__mcp_call__"
"""The bridge function every generated tool function awaits: `(gateway_name, arguments) -> value`."""

_SIMPLE = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}
_RESERVED_PARAMS = {"self", CALL_FUNCTION}


def identifier(name: str, taken: Iterable[str] = ()) -> str:
    """A Python identifier for `name`: other characters -> `_`, a leading digit gets `_`,
    keywords and builtins-like clashes get a trailing `_`, names in `taken` get `_2`, `_3`..."""
    ident = re.sub(r"\W", "_", name, flags=re.ASCII) or "_"
    if ident[0].isdigit():
        ident = "_" + ident
    if keyword.iskeyword(ident) or keyword.issoftkeyword(ident) or ident in _RESERVED_PARAMS:
        ident += "_"
    taken = set(taken)
    if ident in taken:
        n = 2
        while f"{ident}_{n}" in taken:
            n += 1
        ident = f"{ident}_{n}"
    return ident


def annotation(schema: Any, depth: int = 0) -> str:
    """A Python type annotation (source text) for a JSON Schema."""
    if not isinstance(schema, Mapping) or depth > 6:
        return "Any"
    if "const" in schema:
        return _literal([schema["const"]])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return _literal(schema["enum"])
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _union(annotation(o, depth + 1) for o in options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _union(annotation({**schema, "type": k}, depth + 1) for k in kind)
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if kind == "array":
        items = schema.get("items")
        return f"list[{annotation(items, depth + 1)}]" if isinstance(items, Mapping) else "list[Any]"
    if kind == "object" or "properties" in schema:
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and not schema.get("properties"):
            return f"dict[str, {annotation(extra, depth + 1)}]"
        return "dict[str, Any]"
    return "Any"


def shape(schema: Any, depth: int = 0) -> str:
    """A compact shape of a JSON Schema for docstrings: objects spell out their fields,
    e.g. `list[{name: str, tags?: list[str]}]` (`?` marks an optional field)."""
    if not isinstance(schema, Mapping) or depth > 3:
        return "Any"
    props = schema.get("properties")
    if isinstance(props, Mapping) and props:
        required = set(schema.get("required") or ())
        fields = [f"{k}{'' if k in required else '?'}: {shape(v, depth + 1)}" for k, v in list(props.items())[:12]]
        if len(props) > 12:
            fields.append("...")
        return "{" + ", ".join(fields) + "}"
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        return f"list[{shape(schema['items'], depth + 1)}]"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _union(shape(o, depth + 1) for o in options)
    return annotation(schema, depth)


def _literal(values: list[Any]) -> str:
    usable = [v for v in values if v is None or isinstance(v, str | int | float | bool)]
    if not usable:
        return "Any"
    return "Literal[" + ", ".join(repr(v) for v in usable) + "]"


def _union(parts: Iterable[str]) -> str:
    seen: list[str] = []
    for p in parts:
        for piece in p.split(" | "):
            if piece not in seen:
                seen.append(piece)
    if "Any" in seen:
        return "Any"
    if "None" in seen:
        seen.remove("None")
        seen.append("None")
    return " | ".join(seen)


@dataclass(slots=True)
class Param:
    """One tool argument as a Python parameter."""

    key: str
    """The argument's name in the tool's inputSchema."""
    ident: str
    """Its Python name."""
    required: bool
    schema: Mapping[str, Any]


@dataclass(slots=True)
class ToolStub:
    """One tool as `tools.<namespace>.<attr>`."""

    gateway_name: str
    namespace: str
    attr: str
    tool: types.Tool
    params: list[Param] = field(default_factory=list)
    extra_kwargs: bool = False
    """The schema declares no properties and allows any: the function takes `**arguments`."""

    @property
    def path(self) -> str:
        return f"tools.{self.namespace}.{self.attr}"

    def optional_keys(self) -> set[str]:
        return {p.key for p in self.params if not p.required}

    def signature(self, *, typed: bool = True) -> str:
        """`(path: str, *, head: int | None = None) -> Any` (typed) or `(path, *, head=None)`."""
        parts: list[str] = []
        required = [p for p in self.params if p.required]
        optional = [p for p in self.params if not p.required]
        for p in required:
            parts.append(f"{p.ident}: {annotation(p.schema)}" if typed else p.ident)
        if optional:
            parts.append("*")
            for p in optional:
                ann = annotation(p.schema)
                if ann != "Any" and not ann.endswith("| None") and ann != "None":
                    ann += " | None"
                parts.append(f"{p.ident}: {ann} = None" if typed else f"{p.ident}=None")
        if self.extra_kwargs:
            parts.append("**arguments: Any" if typed else "**arguments")
        returns = ""
        if typed:
            out = self.tool.output_schema
            returns = " -> dict[str, Any]" if out else " -> Any"
        return f"({', '.join(parts)}){returns}"

    def render(self) -> str:
        """The stub as Python source: the call path, a typed `async def` and a docstring."""
        lines = [f"# await {self.path}(...)   (MCP tool {self.gateway_name})"]
        lines.append(f"async def {self.attr}{self.signature()}:")
        doc: list[str] = []
        desc = (self.tool.description or "").strip()
        if desc:
            doc.extend(desc.splitlines())
        if self.params or self.extra_kwargs:
            doc.extend(["", "Args:"])
            for p in self.params:
                doc.append(f"    {p.ident}: {_param_doc(p)}")
            if self.extra_kwargs:
                doc.append("    **arguments: sent as the tool's arguments as they are.")
        doc.append("")
        out = self.tool.output_schema
        if out:
            doc.append(f"Returns: {shape(out)}")
        else:
            doc.append("Returns: the tool's structured result, else its text (JSON-parsed when it parses).")
        doc.append("Raises: RuntimeError when the tool fails.")
        body = "\n".join(("    " + line).rstrip() for line in doc)
        lines.append('    """' + body.lstrip() + '\n    """')
        return "\n".join(lines)

    def executable(self) -> str:
        """The method that goes into the sandbox's namespace class (no annotations, no docstring)."""
        pairs = [f"{p.key!r}: {p.ident}" for p in self.params]
        args = "{" + ", ".join(pairs) + "}"
        sig = self.signature(typed=False)
        sig = "(self, " + sig[1:] if sig != "()" else "(self)"
        if self.extra_kwargs:
            return (
                f"    async def {self.attr}{sig}:\n"
                f"        args = {args}\n"
                f"        args.update(arguments)\n"
                f"        return await {CALL_FUNCTION}({self.gateway_name!r}, args)\n"
            )
        return f"    async def {self.attr}{sig}:\n        return await {CALL_FUNCTION}({self.gateway_name!r}, {args})\n"


def _param_doc(p: Param) -> str:
    s = p.schema
    bits: list[str] = []
    desc = str(s.get("description") or "").strip().replace("\n", " ")
    if desc:
        bits.append(desc if desc[-1] in ".!?:" else desc + ".")
    sh = shape(s)
    if sh != annotation(s):
        bits.append(f"Shape: {sh}.")
    if not p.required:
        if "default" in s:
            bits.append(f"Default: {s['default']!r}.")
        else:
            bits.append("Optional.")
    if p.ident != p.key:
        bits.append(f"(argument {p.key!r})")
    return " ".join(bits) or annotation(s)


def make_stub(gateway_name: str, namespace: str, attr: str, tool: types.Tool) -> ToolStub:
    """Build the stub of one tool (namespace and attr already sanitized)."""
    schema = tool.input_schema if isinstance(tool.input_schema, Mapping) else {}
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = set(schema.get("required") or ())
    stub = ToolStub(gateway_name, namespace, attr, tool)
    taken: set[str] = set()
    ordered = [k for k in props if k in required] + [k for k in props if k not in required]
    for key in ordered:
        ident = identifier(str(key), taken)
        taken.add(ident)
        sub = props[key] if isinstance(props[key], Mapping) else {}
        stub.params.append(Param(str(key), ident, key in required, sub))
    stub.extra_kwargs = not props and schema.get("additionalProperties", True) is not False
    return stub


class ToolNamespaces:
    """Every upstream tool of a catalog as `tools.<server>.<tool>`.

    Args:
        tools: `(gateway_name, server, upstream_name, definition)` for each tool.
    """

    def __init__(self, tools: Iterable[tuple[str, str, str, types.Tool]]) -> None:
        self.by_name: dict[str, ToolStub] = {}
        self.namespaces: dict[str, list[ToolStub]] = {}
        ns_of: dict[str, str] = {}
        for gname, server, upstream_name, tool in tools:
            ns = ns_of.get(server)
            if ns is None:
                ns = identifier(server, set(ns_of.values()) | {"tools"})
                ns_of[server] = ns
            members = self.namespaces.setdefault(ns, [])
            attr = identifier(upstream_name, {s.attr for s in members})
            stub = make_stub(gname, ns, attr, tool)
            members.append(stub)
            self.by_name[gname] = stub
        self._chunks: dict[str, str] = {}

    @classmethod
    def from_catalog(cls, catalog: Any) -> ToolNamespaces:
        """From a `GatewayCatalog`: its upstream tools (not the gateway's own), under gateway names."""
        rows = []
        for tool in catalog.tools:
            route = catalog.tool_routes.get(tool.name)
            if route is not None:
                rows.append((tool.name, route.server, route.name, catalog.tool_defs.get(tool.name, tool)))
        return cls(rows)

    def stub_for(self, gateway_name: str) -> str | None:
        """The Python stub of one tool (for `get_tool_schema`), or None if it is not a tool here."""
        stub = self.by_name.get(gateway_name)
        return None if stub is None else stub.render()

    def signature_of(self, gateway_name: str) -> str | None:
        """`tools.<namespace>.<attr>(typed parameters) -> return` in one line, or None."""
        stub = self.by_name.get(gateway_name)
        return None if stub is None else stub.path + stub.signature()

    def path_of(self, gateway_name: str) -> str | None:
        """`tools.<namespace>.<attr>` of a tool, or None."""
        stub = self.by_name.get(gateway_name)
        return None if stub is None else stub.path

    def prelude(self, code: str | None = None, *, keep: bool = False) -> str:
        """Python source defining `tools` with one async method per tool.

        Args:
            code: when given and it only uses `tools.<name>` attribute access, only those
                namespaces are defined (a smaller prelude for large catalogs); otherwise all.
            keep: a code session: keep the session's `tools` object (and the namespaces earlier
                calls defined, which helpers from those calls may use) and (re)define these.
        """
        names = list(self.namespaces)
        if code is not None:
            used = set(re.findall(r"\btools\s*\.\s*([A-Za-z_]\w*)", code))
            other_uses = len(re.findall(r"\btools\b", code)) - len(re.findall(r"\btools\s*\.", code))
            if other_uses == 0:
                names = [n for n in names if n in used]
        out = ["class _McpoptTools:\n    pass\n"]
        if keep:
            out.append("try:\n    tools\nexcept NameError:\n    tools = _McpoptTools()\n")
        else:
            out.append("tools = _McpoptTools()\n")
        for ns in names:
            chunk = self._chunks.get(ns)
            if chunk is None:
                cls_name = f"_McpoptNs_{ns}"
                body = "".join(s.executable() for s in self.namespaces[ns]) or "    pass\n"
                chunk = f"class {cls_name}:\n{body}tools.{ns} = {cls_name}()\n"
                self._chunks[ns] = chunk
            out.append(chunk)
        return "".join(out)

    def summary(self) -> dict[str, list[str]]:
        """namespace -> its tool attributes (for listings and errors)."""
        return {ns: [s.attr for s in stubs] for ns, stubs in self.namespaces.items()}
