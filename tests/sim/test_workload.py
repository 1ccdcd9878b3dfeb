"""Workloads: trace formats detected from their content, sessions from Mooncake's block
ids, bad trace lines named by file:line, and generated multi-turn conversations."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import pytest

from orchestrator.cli.sim import add_workload_arguments, settings_from_args
from orchestrator.domain.errors import ConfigError, InvalidRequestError, UsageError
from orchestrator.domain.prefix import MAX_PROMPT_BLOCKS, MIN_BLOCK_TOKENS
from orchestrator.sim.run import default_catalog
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import (
    MAX_LINE_BYTES,
    MAX_SPAN_S,
    MAX_TOKENS,
    Arrival,
    WorkloadSpec,
    _seconds,
    detect_format,
    from_trace,
    generate,
    model_map,
)
from tests.conftest import REPO

TRACES = REPO / "tests" / "data" / "traces"
TRACE = TRACES / "azure-llm-inference-2023-code.csv"
AZURE_2024 = TRACES / "azure-llm-inference-2024-code-head.csv"
MOONCAKE = TRACES / "mooncake-fast25-synthetic-sample.jsonl"
SHARED = REPO.parent / "shared" / "traces"  # the full traces, where this checkout has them
ONE_MODEL = model_map("inf:llama-8b")


def _old_fields(arrivals: list[Arrival]) -> str:
    """A digest of the fields arrivals had before sessions existed."""
    rows = [[a.at_ms, a.job_id, a.model, a.priority, a.tenant_id, a.prompt_tokens,
             a.output_tokens, a.seed] for a in arrivals]  # fmt: skip
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- trace formats
def test_azure_trace_replays_its_arrivals_and_jsonl_gives_the_same(tmp_path: Path) -> None:
    """The real Azure CSV replays in order, sped up, prompt length picking the model;
    the same rows as JSONL replay identically."""
    mapping = model_map("2048:llama-8b,inf:qwen-14b")
    arrivals = from_trace(TRACE, models=mapping, speedup=10.0, limit=500, seed=5)
    assert len(arrivals) == 500 and arrivals[0].at_ms == 0
    assert all(a.at_ms <= b.at_ms for a, b in itertools.pairwise(arrivals))
    # The first rows: 4808 and 3180 context tokens (qwen), then 110 (llama); 52 ms apart / 10.
    assert [a.model for a in arrivals[:3]] == ["qwen-14b", "qwen-14b", "llama-8b"]
    assert (arrivals[0].prompt_tokens, arrivals[0].output_tokens) == (4808, 10)
    assert arrivals[1].at_ms == 5
    full = from_trace(TRACE, models=mapping)
    assert len(full) == 8819 and 3000_000 < full[-1].at_ms < 3700_000  # about an hour

    # Mooncake-style JSONL: numeric timestamps in milliseconds.
    lines = TRACE.read_text().splitlines()[1:501]
    jsonl = tmp_path / "trace.jsonl"
    rows = []
    for line in lines:
        stamp, context, generated = line.split(",")
        ms = round(_seconds(stamp, "s") * 1000, 3)
        rows.append(json.dumps({"timestamp": ms, "input_length": int(context),
                                "output_length": int(generated)}))  # fmt: skip
    jsonl.write_text("\n".join(rows))
    assert from_trace(jsonl, models=mapping, speedup=10.0, seed=5) == arrivals
    bad = tmp_path / "bad.csv"
    bad.write_text("when,tokens\n1,2\n")
    with pytest.raises(ConfigError, match="expected the columns ContextTokens"):
        from_trace(bad, models=mapping)


def test_each_format_is_detected_from_the_content_not_the_name(tmp_path: Path) -> None:
    """Mooncake JSONL (hash_ids), plain JSONL, Azure 2023 and Azure 2024 CSV, whatever
    the file is called."""
    plain = tmp_path / "plain.csv"  # a misleading name: the content decides
    plain.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2}\n')
    disguised = tmp_path / "trace.csv"
    disguised.write_bytes(MOONCAKE.read_bytes())
    azure = tmp_path / "azure.jsonl"
    azure.write_bytes(AZURE_2024.read_bytes())
    found = {
        p.name: detect_format(p) for p in (MOONCAKE, disguised, plain, TRACE, AZURE_2024, azure)
    }
    assert found == {
        MOONCAKE.name: "mooncake", "trace.csv": "mooncake", "plain.csv": "jsonl",
        TRACE.name: "azure-2023", AZURE_2024.name: "azure-2024", "azure.jsonl": "azure-2024",
    }  # fmt: skip
    assert from_trace(disguised, models=ONE_MODEL) == from_trace(MOONCAKE, models=ONE_MODEL)


def test_azure_2024_timestamps_keep_their_offset(tmp_path: Path) -> None:
    """2024-05-10 00:00:00.009930+00:00 and friends: microseconds, with or without a
    fraction, and an offset other than UTC moves the instant."""
    arrivals = from_trace(AZURE_2024, models=ONE_MODEL)
    # 9.930, 17.335, 22.314, 37.845, 83.890 ms after midnight.
    assert [a.at_ms for a in arrivals] == [0, 7, 12, 27, 73]
    assert [(a.prompt_tokens, a.output_tokens) for a in arrivals[:2]] == [(2162, 5), (2399, 6)]
    assert all(a.session_id is None and a.prompt_block_ids == () for a in arrivals)
    assert _seconds("2024-05-10 00:00:00.009930+00:00", "s") == pytest.approx(1715299200.00993)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-12 00:00:00+00:00,100,5\n"
        "2024-05-12 02:00:01.5+02:00,200,6\n"  # 00:00:01.5 UTC
        "2024-05-12 00:00:03.250000+00:00,300,7\n"
    )
    assert detect_format(mixed) == "azure-2024"
    assert [a.at_ms for a in from_trace(mixed, models=ONE_MODEL)] == [0, 1500, 3250]


def test_mooncake_hash_ids_become_block_ids_and_sessions() -> None:
    """hash_ids are carried as prompt_block_ids. A request continues the session of an
    earlier, shorter one whose full blocks start its ids (a next turn), and a session,
    named s<index of its first request>, keeps one tenant (the prefix cache's salt)."""
    records = [json.loads(line) for line in MOONCAKE.read_text().splitlines()]
    arrivals = from_trace(MOONCAKE, models=ONE_MODEL, tenants=(("a", 1.0), ("b", 1.0)), seed=3)
    assert len(arrivals) == len(records) == 20
    assert [a.prompt_block_ids for a in arrivals] == [tuple(r["hash_ids"]) for r in records]
    assert [a.session_id for a in arrivals] == [
        "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9",
        "s9", "s4", "s0", "s13", "s14", "s15", "s16", "s13", "s18", "s0",
    ]  # fmt: skip
    for later, a in enumerate(arrivals):
        turns = [b for b in arrivals[:later] if b.session_id == a.session_id]
        if turns:  # a next turn: longer, and the previous prompt's full blocks start it
            previous = turns[-1]
            full = previous.prompt_block_ids[: previous.prompt_tokens // 512]
            assert a.prompt_tokens > previous.prompt_tokens
            assert a.prompt_block_ids[: len(full)] == full
    # 1 and 3 share 61 leading blocks, but 3 is shorter: a sibling, not a next turn.
    assert arrivals[1].prompt_block_ids[:61] == arrivals[3].prompt_block_ids[:61]
    assert arrivals[1].session_id != arrivals[3].session_id
    for session in {a.session_id for a in arrivals}:
        assert len({a.tenant_id for a in arrivals if a.session_id == session}) == 1
    assert {a.tenant_id for a in arrivals} == {"a", "b"}
    # Milliseconds from the first request: 1016266, then 1017038.
    assert [a.at_ms for a in arrivals[:2]] == [0, 772]


def test_only_a_next_turn_joins_a_session_not_a_shared_system_prompt(tmp_path: Path) -> None:
    """Requests that share a first block (a common system prompt) are separate sessions;
    a request whose ids extend an earlier prompt's full blocks, with a longer prompt,
    is that prompt's next turn, and keeps its session's tenant."""
    rows = [
        (0, 1100, [1, 2, 3]),  # system prompt 1, then a user's message: 2 full blocks
        (1, 1200, [1, 5, 6]),  # the same system prompt, another user: a new session
        (2, 1700, [1, 2, 12, 13]),  # the first user's next turn: [1, 2] then more
        (3, 2100, [1, 5, 14, 7, 8]),  # the second user's next turn
        (4, 2600, [1, 2, 12, 13, 9, 10]),  # the first user's third turn
        (5, 300, [1]),  # only the system prompt, partial: no full block to extend
        (6, 700, [1, 11]),  # not a turn of 5 (it had no full block): a new session
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": t, "input_length": n, "output_length": 3, "hash_ids": ids})
        + "\n" for t, n, ids in rows))  # fmt: skip
    tenants = tuple((f"t{i}", 1.0) for i in range(50))
    arrivals = from_trace(trace, models=ONE_MODEL, tenants=tenants, seed=5)
    assert [a.session_id for a in arrivals] == ["s0", "s1", "s0", "s1", "s0", "s5", "s6"]
    for session in ("s0", "s1"):
        assert len({a.tenant_id for a in arrivals if a.session_id == session}) == 1
    assert arrivals[0].tenant_id != arrivals[1].tenant_id  # seed 5 draws them apart


def test_a_request_without_hash_ids_has_no_session(tmp_path: Path) -> None:
    """An empty hash_ids list (or none) gives no block ids and no session."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [7, 8, 9]}\n'
        '{"timestamp": 5, "input_length": 20, "output_length": 3, "hash_ids": []}\n'
        '{"timestamp": 9, "input_length": 20, "output_length": 3}\n'
    )
    arrivals = from_trace(trace, models=ONE_MODEL)
    assert [a.session_id for a in arrivals] == ["s0", None, None]
    assert [a.prompt_block_ids for a in arrivals] == [(7, 8, 9), (), ()]


@pytest.mark.skipif(not (SHARED / "mooncake-fast25-synthetic.jsonl").exists(), reason="no shared/")
def test_the_shared_traces_read_whole() -> None:
    """The full Mooncake trace: 3,993 requests over about 17 minutes, 3,235 sessions of
    next turns (2,211 if requests sharing a first block were one session); the full
    Azure 2023 trace as the copy in tests/data."""
    mooncake = SHARED / "mooncake-fast25-synthetic.jsonl"
    assert detect_format(mooncake) == "mooncake"
    arrivals = from_trace(mooncake, models=ONE_MODEL)
    assert len(arrivals) == 3993 and 1_000_000 < arrivals[-1].at_ms < 1_100_000
    assert len({a.session_id for a in arrivals}) == 3235
    azure = SHARED / "azure-llm-inference-2023-code.csv"
    assert detect_format(azure) == "azure-2023"
    assert from_trace(azure, models=ONE_MODEL) == from_trace(TRACE, models=ONE_MODEL)


BAD_LINES = [
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n\n{"timestamp": 1,', 3,
     "expected a JSON object"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n[1, 2]\n', 2,
     "expected a JSON object, got list"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5}\n', 1, "missing output_length"),
    ("t.jsonl", '{"timestamp": 0, "input_length": true, "output_length": 1}\n', 1,
     "input_length: expected a whole number, got True"),
    ("t.jsonl", '{"timestamp": 0, "input_length": "12", "output_length": 1}\n', 1,
     "input_length: expected a whole number"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": -4}\n', 1,
     f"output_length: expected 0 to {MAX_TOKENS} tokens, got -4"),
    ("t.jsonl", '{"timestamp": NaN, "input_length": 1, "output_length": 1}\n', 1,
     "timestamp: expected a finite number"),
    ("t.jsonl", '{"timestamp": [1], "input_length": 1, "output_length": 1}\n', 1,
     "timestamp: expected a number or a date-time"),
    ("t.jsonl", '{"timestamp": "yesterday", "input_length": 1, "output_length": 1}\n', 1,
     "timestamp: expected a number or a date-time, got 'yesterday'"),
    # 1000 tokens are two blocks of 512: at most 1000 // 512 + 2 = 3 ids.
    ("t.jsonl", '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1, 2, 3, 4]}\n',
     1, r"hash_ids: expected a list of at most input_length / 512 \+ 2 = 3 block ids"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": {"a": 1}}\n',
     1, "hash_ids: expected a list"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1, "2"]}\n',
     1, "hash_ids: expected integers from 0 to 9223372036854775807, got '2'"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [-1]}\n',
     1, "hash_ids: expected integers"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
     + "[" * 100_000 + "]" * 100_000 + "\n", 2, "expected a JSON object"),
    ("t.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", 1,
     "expected the columns ContextTokens, GeneratedTokens, TIMESTAMP"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,5,1\n"
     "2023-11-16 18:17:04.1,five,1\n", 3, "ContextTokens: expected a whole number, got 'five'"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,5\n", 2,
     "GeneratedTokens: missing"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,5,1\n"
     "16/11/2023 18:17,5,1\n", 3, "timestamp: expected a number or a date-time"),
    # Timestamps that no float holds, or too far from the first request to replay.
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
     '{"timestamp": 1' + "0" * 400 + ', "input_length": 1, "output_length": 1}\n', 2,
     "timestamp: expected a finite number"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1e308,10,5\n", 3,
     r"timestamp: 1e\+308 s after the first request \(.*t.csv:2\); a replay spans at most "
     f"{MAX_SPAN_S:.0f} simulated seconds"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n-1e308,10,5\n", 2,
     r"1e\+308 s after the first request \(.*t.csv:3\)"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
     '{"timestamp": 1e300, "input_length": 1, "output_length": 1}\n', 2,
     "1e\\+297 s after the first request"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-01-01 00:00:00,10,5\n"
     "9999-12-31 23:59:59-05:00,10,5\n", 3, "s after the first request"),
]  # fmt: skip


def test_a_replay_spans_at_most_a_day_of_simulated_time(tmp_path: Path) -> None:
    """The bound is on simulated time: a trace two days long replays at --speedup 2
    and fails at 1.99, naming its line; arrival times stay whole milliseconds within
    the span."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
        f'{{"timestamp": {2 * MAX_SPAN_S * 1000:.0f}, "input_length": 1, "output_length": 1}}\n'
    )
    assert [a.at_ms for a in from_trace(trace, models=ONE_MODEL, speedup=2.0)] == [
        0, int(MAX_SPAN_S * 1000)]  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{trace}:2: timestamp: "):
        from_trace(trace, models=ONE_MODEL, speedup=1.99)
    with pytest.raises(ConfigError, match=f"^{trace}:2: timestamp: "):
        from_trace(trace, models=ONE_MODEL, speedup=1e-300)  # overflows to inf


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD_LINES)
def test_a_bad_trace_line_is_named_by_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, message: str
) -> None:
    """Every malformed row is a ConfigError that names file:line and what was expected."""
    trace = tmp_path / name
    trace.write_text(text)
    with pytest.raises(ConfigError, match=f"^{trace}:{line}: .*{message}"):
        from_trace(trace, models=ONE_MODEL)


def test_unreadable_traces_are_errors_not_crashes(tmp_path: Path) -> None:
    """A line over 1 MiB is refused once that much is read; empty, binary, missing and
    directory paths are ConfigErrors."""
    long = tmp_path / "long.jsonl"
    long.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"pad": "'
                    + "x" * MAX_LINE_BYTES + '"}\n')  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{long}:2: a line longer than {MAX_LINE_BYTES} bytes"):
        from_trace(long, models=ONE_MODEL)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="the trace holds no requests"):
        detect_format(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(ConfigError, match="the trace holds no requests"):
        from_trace(header_only, models=ONE_MODEL)
    binary = tmp_path / "trace.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ConfigError, match=f"^{binary}:1: not UTF-8 text"):
        detect_format(binary)
    with pytest.raises(ConfigError, match="No such file or directory"):
        detect_format(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="Is a directory"):
        from_trace(tmp_path, models=ONE_MODEL)


def test_limit_reads_only_the_first_requests(tmp_path: Path) -> None:
    """--trace-limit stops reading: a bad line after the first N is never reached."""
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE.read_text().splitlines()[0] + "\n"
                     + "\n".join(TRACE.read_text().splitlines()[1:4]) + "\nnot,a,row\n")  # fmt: skip
    assert len(from_trace(trace, models=ONE_MODEL, limit=3)) == 3
    with pytest.raises(ConfigError, match=f"^{trace}:5: "):
        from_trace(trace, models=ONE_MODEL)


def test_trace_time_unit_reaches_the_trace_through_the_settings(tmp_path: Path) -> None:
    """--trace-time-unit s reads JSONL numbers as seconds; auto as milliseconds."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 10, "input_length": 5, "output_length": 1}\n'
                     '{"timestamp": 12, "input_length": 5, "output_length": 1}\n')  # fmt: skip
    auto = SimSettings(trace=str(trace)).arrivals(default_catalog())
    seconds = SimSettings(trace=str(trace), trace_time_unit="s").arrivals(default_catalog())
    assert [a.at_ms for a in auto] == [0, 2] and [a.at_ms for a in seconds] == [0, 2000]


def test_settings_report_the_trace_format_and_refuse_other_block_sizes(tmp_path: Path) -> None:
    """The report's workload names the detected format; a Mooncake trace's ids are
    512-token blocks, so another block_tokens is refused by name."""
    assert SimSettings(trace=str(AZURE_2024)).workload()["trace_format"] == "azure-2024"
    assert SimSettings(trace=str(MOONCAKE)).workload()["trace_format"] == "mooncake"
    arrivals = SimSettings(trace=str(MOONCAKE)).arrivals(default_catalog())
    assert len(arrivals) == 20 and arrivals[0].session_id == "s0"
    refused = "block_tokens: a trace's hash_ids are blocks of 512 tokens"
    with pytest.raises(ConfigError, match=refused):
        SimSettings(trace=str(MOONCAKE), block_tokens=256).arrivals(default_catalog())
    assert len(SimSettings(trace=str(TRACE), block_tokens=256, trace_limit=5).arrivals(
        default_catalog())) == 5  # fmt: skip
    # Any row with hash_ids, not only the first (which makes the format "jsonl").
    later = tmp_path / "later.jsonl"
    later.write_text('{"timestamp": 0, "input_length": 600, "output_length": 1}\n'
                     '{"timestamp": 1, "input_length": 600, "output_length": 1, '
                     '"hash_ids": [4, 5]}\n')  # fmt: skip
    assert detect_format(later) == "jsonl"
    with pytest.raises(ConfigError, match=refused):
        SimSettings(trace=str(later), block_tokens=256).arrivals(default_catalog())
    assert len(SimSettings(trace=str(later)).arrivals(default_catalog())) == 2
    generated = SimSettings(conversation=0.5, block_tokens=256).workload()
    assert generated["conversation"] == 0.5 and generated["block_tokens"] == 256
    assert "trace_format" not in generated


# ---------------------------------------------------------------- conversations
def test_without_conversations_the_workload_is_unchanged() -> None:
    """conversation=0: the arrivals generated before sessions existed, field for field
    (digests taken from the code before this change), with no session or block ids."""
    models = ("llama-8b", "qwen-14b")
    default = generate(WorkloadSpec(), models)
    assert len(default) == 68 and _old_fields(default) == "edc38e08899ae1b4"
    assert default[:2] == [
        Arrival(72, "sim-000000", "qwen-14b", "batch", None, 622, 80, None),
        Arrival(370, "sim-000001", "qwen-14b", "batch", None, 292, 269, 1674216077),
    ]
    busy = generate(WorkloadSpec(rate=5.0, duration_s=200.0, seed=3), models)
    assert len(busy) == 1017 and _old_fields(busy) == "bcb6dda1a23a68e5"
    burst = WorkloadSpec(
        rate=0.0, duration_s=10.0, burst_every_s=2.0, burst_size=7, queue_depth=4,
        tenants=(("a", 3.0), ("b", 1.0)), models=(("llama-8b", 1.0),), interactive=0.5, seed=1,
    )  # fmt: skip
    assert _old_fields(generate(burst, models)) == "5f36d20c33b8ccff"
    assert all(a.session_id is None and a.prompt_block_ids == () for a in default + busy)


def test_conversation_turns_extend_the_previous_turn() -> None:
    """Every arrival has a session; a later turn's prompt is the previous prompt, its
    output and a new message, and its block ids start with the previous turn's. Each
    arrival's ids are its prompt's full blocks, fresh ids unique across sessions."""
    spec = WorkloadSpec(rate=5.0, duration_s=60.0, conversation=0.7, block_tokens=128,
                        tenants=(("a", 1.0), ("b", 1.0)), seed=9)  # fmt: skip
    arrivals = generate(spec, ("llama-8b", "qwen-14b"))
    assert all(a.session_id for a in arrivals)
    by_session: dict[str, list[Arrival]] = {}
    for a in arrivals:
        by_session.setdefault(a.session_id or "", []).append(a)
        assert len(a.prompt_block_ids) == min(a.prompt_tokens // 128, MAX_PROMPT_BLOCKS)
    turns = [len(t) for t in by_session.values()]
    assert max(turns) >= 5 and 0.2 < len(by_session) / len(arrivals) < 0.45  # about 1 - 0.7
    first_ids: dict[int, str] = {}
    for session, turn in by_session.items():
        for before, after in itertools.pairwise(turn):
            assert after.prompt_block_ids[: len(before.prompt_block_ids)] == before.prompt_block_ids
            assert after.prompt_tokens > before.prompt_tokens + before.output_tokens
            assert (after.model, after.tenant_id, after.priority) == (
                before.model, before.tenant_id, before.priority)  # fmt: skip
        for block in turn[-1].prompt_block_ids:  # a block belongs to one session
            assert first_ids.setdefault(block, session) == session
    # Same times as without conversations: sessions draw from their own random stream.
    plain = generate(dataclasses.replace(spec, conversation=0.0), ("llama-8b", "qwen-14b"))
    assert [a.at_ms for a in arrivals] == [a.at_ms for a in plain]


def test_conversations_are_deterministic_for_a_seed() -> None:
    """The same seed gives the same sessions; another seed other ones."""
    spec = WorkloadSpec(jobs=300, rate=10.0, conversation=0.5, seed=4)
    first = generate(spec, ("m",))
    assert generate(spec, ("m",)) == first
    assert generate(dataclasses.replace(spec, seed=5), ("m",)) != first
    via_settings = SimSettings(jobs=40, rate=4.0, conversation=0.5, models="llama-8b", seed=2)
    assert via_settings.arrivals(default_catalog()) == via_settings.arrivals(default_catalog())


def test_a_conversation_ends_when_its_prompt_cannot_grow() -> None:
    """Prompts stay within MAX_TOKENS and MAX_PROMPT_BLOCKS: a session that reaches
    either closes, so even conversation=1 opens new sessions."""
    spec = WorkloadSpec(jobs=60, rate=10.0, conversation=1.0, block_tokens=16,
                        prompt_tokens=(20_000, 30_000), seed=1)  # fmt: skip
    arrivals = generate(spec, ("m",))
    assert all(a.prompt_tokens <= MAX_TOKENS for a in arrivals)
    assert all(len(a.prompt_block_ids) <= MAX_PROMPT_BLOCKS for a in arrivals)
    assert max(len(a.prompt_block_ids) for a in arrivals) == MAX_PROMPT_BLOCKS
    assert len({a.session_id for a in arrivals}) > 1
    huge = generate(WorkloadSpec(jobs=10, rate=1.0, conversation=1.0, block_tokens=65_536,
                                 prompt_tokens=(900_000, MAX_TOKENS), seed=2), ("m",))  # fmt: skip
    assert max(a.prompt_tokens for a in huge) == MAX_TOKENS


def test_conversation_and_block_tokens_are_bounded_by_name() -> None:
    """Out of range: an InvalidRequestError naming the field, and the flag on the CLI."""
    with pytest.raises(InvalidRequestError, match="conversation: must be at most 1"):
        SimSettings(conversation=1.5)
    with pytest.raises(InvalidRequestError, match="conversation: must not be negative"):
        SimSettings(conversation=-0.1)
    with pytest.raises(
        InvalidRequestError, match=f"block_tokens: must be at least {MIN_BLOCK_TOKENS}"
    ):
        SimSettings(block_tokens=8)
    with pytest.raises(InvalidRequestError, match=r"workload\.block_tokens: must be at most 65536"):
        SimSettings.from_mapping({"block_tokens": 100_000})
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    args = parser.parse_args(["--conversation", "0.25", "--block-tokens", "256"])
    settings = settings_from_args(args)
    assert (settings.conversation, settings.block_tokens) == (0.25, 256)
    with pytest.raises(UsageError, match="--conversation: must be at most 1"):
        settings_from_args(parser.parse_args(["--conversation", "2"]))
    with pytest.raises(UsageError, match=f"--block-tokens: must be at least {MIN_BLOCK_TOKENS}"):
        settings_from_args(parser.parse_args(["--block-tokens", "1"]))
