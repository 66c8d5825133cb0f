"""The HTTP side channel's per-request shortcuts give what the long way gives."""

from __future__ import annotations

import httpx2

from mcpopt.upstream.http_fast import HttpFastChannel


def test_cookie_check_follows_the_sdk_clients_jar() -> None:
    client = httpx2.AsyncClient()
    channel = HttpFastChannel("http://127.0.0.1:9/mcp", {"user-agent": "t"}, client)
    assert channel._cookies() is False  # noqa: SLF001
    client.cookies.set("sid", "1", domain="127.0.0.1")
    assert channel._cookies() is True  # noqa: SLF001 - from now on requests go the SDK's way
    client.cookies.clear()
    assert channel._cookies() is False  # noqa: SLF001


def test_request_head_is_the_one_built_in_full() -> None:
    channel = HttpFastChannel("http://127.0.0.1:9/mcp", {"user-agent": "t", "x-team": "a"}, httpx2.AsyncClient())
    stamped = {"mcp-protocol-version": "2025-06-18"}
    for sid, length in ((None, 10), ("s1", 10), ("s1", 12345), ("s2", 7)):
        channel.session_id = sid
        got = channel._head("POST", "/mcp", stamped, length)  # noqa: SLF001
        assert got == channel._build_head("POST", "/mcp", stamped, length)  # noqa: SLF001
        assert got.endswith(b"content-length: %d\r\n\r\n" % length)
        assert (b"mcp-session-id: " + sid.encode() in got) if sid else b"mcp-session-id" not in got
    other = {"mcp-protocol-version": "2025-11-25"}
    assert channel._head("POST", "/mcp", other, 3) == channel._build_head("POST", "/mcp", other, 3)  # noqa: SLF001
    assert channel._head("GET", "/mcp", stamped, None, **{"last-event-id": "4"}) == channel._build_head(  # noqa: SLF001
        "GET", "/mcp", stamped, None, **{"last-event-id": "4"}
    )


def test_response_headers_are_read_as_a_line_parser_reads_them() -> None:
    from mcpopt.upstream.http_wire import response_headers

    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Content-Length: 9\r\ncache-control: no-cache\r\n"
        b"Transfer-Encoding:  chunked \r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nLocation: /x\r\nmcp-session-id: s"
    )
    expected: dict[str, str] = {}
    wanted = {
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "location",
        "set-cookie",
    }
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() in wanted:
            key = name.lower()
            expected[key] = f"{expected[key]}, {value.strip()}" if key in expected else value.strip()
    assert response_headers(head) == expected
    assert expected["set-cookie"] == "a=1, b=2" and "content-length" not in expected
    assert response_headers(b"HTTP/1.1 204 No Content") == {}
