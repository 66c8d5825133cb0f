"""What templates see of a finished step: one call's `StepView`, a `for_each` step's items, a fan-out's
labelled answers, a skipped step.

Every view is a read-only mapping with the scenario views (`text`, `lines`, `json`,
`structured`, `content`, `is_error`, `error`, `ms`, `arguments`), so `{{steps.<id>.json...}}`
works the same whatever kind of step `<id>` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mcpopt.templating import StepView

_KEYS = ("text", "lines", "json", "structured", "content", "is_error", "error", "ms", "arguments")


class SkippedView(Mapping[str, Any]):
    """A step whose `when` was false: empty views, `skipped` true."""

    def __init__(self, reason: str) -> None:
        self._data: dict[str, Any] = {
            "text": "",
            "lines": [],
            "json": None,
            "structured": None,
            "content": [],
            "is_error": False,
            "error": None,
            "ms": 0.0,
            "arguments": {},
            "skipped": True,
            "reason": reason,
        }

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class ItemsView(Mapping[str, Any]):
    """A `for_each` step: `items` (one `StepView` per item, in item order), `count`, and the item
    views combined: `json` and `structured` are lists, `text` the texts joined by newlines,
    `is_error` true if any item failed, `ms` the step's wall time, `arguments` the list of each
    item's arguments."""

    def __init__(self, items: Sequence[Mapping[str, Any]], ms: float) -> None:
        self._items = list(items)
        self._ms = ms
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._cache:
            return self._cache[key]
        items = self._items
        if key == "items":
            value: Any = items
        elif key == "count":
            value = len(items)
        elif key == "text":
            value = "\n".join(str(v["text"]) for v in items)
        elif key == "lines":
            value = self["text"].splitlines()
        elif key in ("json", "structured", "arguments", "error"):
            value = [v[key] for v in items]
        elif key == "content":
            value = [block for v in items for block in v["content"]]
        elif key == "is_error":
            value = any(v["is_error"] for v in items)
        elif key == "ms":
            value = self._ms
        else:
            raise KeyError(key)
        self._cache[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter((*_KEYS, "items", "count"))

    def __len__(self) -> int:
        return len(_KEYS) + 2


class FanoutView(Mapping[str, Any]):
    """A fan-out step: `results`, one per target in target order, each
    `{source, ok, json, text, error, ms}` (`source`: the server, or `server#k` for replica k);
    `sources` the labels that answered; with `gather: first` the other views are the winner's,
    otherwise `json` / `text` / `structured` are lists (`text` joined) of the successful answers."""

    def __init__(self, results: Sequence[tuple[str, StepView | None]], winner: str | None, ms: float) -> None:
        self._results = list(results)
        self._winner = winner
        self._ms = ms
        self._cache: dict[str, Any] = {}

    def _ok(self) -> list[tuple[str, StepView]]:
        return [(src, v) for src, v in self._results if v is not None and not v["is_error"]]

    def __getitem__(self, key: str) -> Any:
        if key in self._cache:
            return self._cache[key]
        value: Any
        if key == "results":
            value = [
                {
                    "source": src,
                    "ok": v is not None and not v["is_error"],
                    "json": v["json"] if v is not None else None,
                    "text": v["text"] if v is not None else "",
                    "error": v["error"] if v is not None else "not called",
                    "ms": round(v["ms"], 3) if v is not None else 0.0,
                }
                for src, v in self._results
            ]
        elif key == "sources":
            value = [src for src, _ in self._ok()]
        elif key == "source":
            value = self._winner
        elif key == "ms":
            value = self._ms
        elif key == "is_error":
            value = not self._ok()
        elif self._winner is not None:
            view = dict(self._results)[self._winner]
            assert view is not None
            value = view[key]
        elif key in ("json", "structured", "arguments", "error"):
            value = [v[key] for _, v in self._ok()] if key != "error" else [v["error"] for _, v in self._results if v]
        elif key == "text":
            value = "\n".join(str(v["text"]) for _, v in self._ok())
        elif key == "lines":
            value = self["text"].splitlines()
        elif key == "content":
            value = [block for _, v in self._ok() for block in v["content"]]
        else:
            raise KeyError(key)
        self._cache[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter((*_KEYS, "results", "sources", "source"))

    def __len__(self) -> int:
        return len(_KEYS) + 3
