"""Session records (mcpopt.gateway.session_store): what comes back from a shared store is checked."""

from __future__ import annotations

import orjson

from mcpopt.gateway.session_store import SessionRecord, session_key


def test_a_record_round_trips() -> None:
    record = SessionRecord(
        "2025-06-18",
        {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}},
        {"client_id": "k", "issuer": None, "subject": None},
        "error",
        ["time://now"],
        "",
    )
    assert SessionRecord.decode(record.encode()) == record
    assert session_key("abc") == "session:abc"


def test_anything_else_is_not_a_record() -> None:
    good = {"protocol_version": "2025-06-18", "client": {}, "owner": None, "log_level": None, "subscriptions": []}
    assert SessionRecord.decode(orjson.dumps(good)) is not None
    bad = [
        b"not json",
        b"[]",
        orjson.dumps({**good, "protocol_version": "2026-07-28"}),  # a modern era has no session
        orjson.dumps({**good, "protocol_version": "1999-01-01"}),
        orjson.dumps({**good, "client": "x"}),
        orjson.dumps({**good, "owner": {"client_id": "k"}}),
        orjson.dumps({**good, "log_level": "loud"}),
        orjson.dumps({**good, "subscriptions": [1]}),
        orjson.dumps({**good, "sub_owner": 3}),
    ]
    for raw in bad:
        assert SessionRecord.decode(raw) is None, raw
