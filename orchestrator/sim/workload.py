"""Workloads for the simulator: generated (Poisson arrivals, bursts, mixes, multi-turn
conversations) or replayed from a trace whose format is detected from its content
(TRACE_FORMATS). Pure and deterministic for a given seed, trace files aside.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.domain.errors import ConfigError
from orchestrator.domain.prefix import BLOCK_TOKENS, MAX_PROMPT_BLOCKS

MAX_TOKENS = 1 << 20  # prompt or output tokens of one simulated job
MAX_BLOCK_ID = (1 << 63) - 1  # block ids are hashed as 8-byte signed integers
MAX_LINE_BYTES = 1 << 20  # a trace line; a longer one is refused, not read whole
MAX_SPAN_S = 86_400.0  # simulated seconds of arrivals, generated or replayed

# Each format the trace reader detects, and what it looks like.
TRACE_FORMATS: dict[str, str] = {
    "mooncake": 'Mooncake JSON lines: {"timestamp": ms, "input_length": n, '
    '"output_length": n, "hash_ids": [ids of 512-token blocks]}',
    "jsonl": "JSON lines with timestamp (ms), input_length and output_length",
    "azure-2023": "the Azure LLM inference trace 2023 CSV: TIMESTAMP,ContextTokens,"
    "GeneratedTokens with times such as 2023-11-16 18:17:03.9799600 (or seconds)",
    "azure-2024": "the Azure LLM inference trace 2024 CSV: the same columns, with times "
    "such as 2024-05-10 00:00:00.009930+00:00",
}
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Arrival:
    at_ms: int
    job_id: str
    model: str  # an alias or model_ref of the catalog
    priority: str
    tenant_id: str | None
    prompt_tokens: int
    output_tokens: int
    seed: int | None = None
    session_id: str | None = None  # the conversation this request belongs to
    # Ids of the prompt's full blocks, in order: equal ids at equal positions are equal
    # content (a trace's own ids, as Mooncake's hash_ids). The simulator chains them
    # into prefix hashes.
    prompt_block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    rate: float = 2.0  # arrivals per second (Poisson)
    duration_s: float = 30.0  # arrivals stop after this much simulated time
    jobs: int = 0  # if set, stop after this many arrivals instead
    burst_every_s: float = 0.0  # every so often, `burst_size` extra jobs at once
    burst_size: int = 0
    interactive: float = 0.3  # share of interactive jobs
    tenants: tuple[tuple[str, float], ...] = ()  # (tenant, weight); none: no tenants
    models: tuple[tuple[str, float], ...] = ()  # (alias or ref, weight)
    prompt_tokens: tuple[int, int] = (100, 2000)
    output_tokens: tuple[int, int] = (20, 400)
    seeded: float = 0.2  # share of jobs that carry a seed
    queue_depth: int = 0  # jobs already queued at t = 0 (runtime-spec 10.3's --queue-depth)
    seed: int = 1
    # Never more jobs than this, whatever the rest says (0: no ceiling). SimSettings sets
    # it to its expected_jobs(), so a cap checked against that holds by construction.
    ceiling: int = 0
    conversation: float = 0.0  # share of arrivals that continue an open conversation
    block_tokens: int = BLOCK_TOKENS  # tokens of a prompt block, for prompt_block_ids


def weighted(text: str, what: str) -> tuple[tuple[str, float], ...]:
    """ "a:2,b:1" (or "a,b") as ((a, 2.0), (b, 1.0))."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not NAME or NAME:WEIGHT") from None
        if not 0 < value < math.inf:  # NaN too: random.choices needs finite weights
            raise ConfigError(f"{what}: the weight of {name!r} must be positive and finite")
        out.append((name, value))
    return tuple(out)


def token_range(text: str, what: str) -> tuple[int, int]:
    """ "100-2000" as (100, 2000)."""
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"{what}: expected MIN-MAX, got {text!r}") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"{what}: expected 0 < MIN <= MAX, got {text!r}")
    if hi > MAX_TOKENS:
        raise ConfigError(f"{what}: at most {MAX_TOKENS} tokens per job, got {text!r}")
    return lo, hi


def _pick(rng: random.Random, choices: tuple[tuple[str, float], ...]) -> str:
    names = [c[0] for c in choices]
    return rng.choices(names, weights=[c[1] for c in choices])[0]


def generate(spec: WorkloadSpec, models: tuple[str, ...]) -> list[Arrival]:
    """Arrivals for a spec; `models` are used uniformly when the spec names none. With
    `spec.conversation` > 0, arrivals form multi-turn sessions (see _Conversations);
    at 0 they carry no session and no block ids, exactly as before sessions existed."""
    rng = random.Random(spec.seed)
    mix = spec.models or tuple((m, 1.0) for m in models)
    if not mix:
        raise ConfigError("the workload needs at least one model")
    # Its own random stream: every draw of `rng` stays what it was without sessions.
    sessions = _Conversations(spec) if spec.conversation > 0 else None

    def job(index: int, at_ms: int) -> Arrival:
        arrival = Arrival(
            at_ms=at_ms,
            job_id=f"sim-{index:06d}",
            model=_pick(rng, mix),
            priority="interactive" if rng.random() < spec.interactive else "batch",
            tenant_id=_pick(rng, spec.tenants) if spec.tenants else None,
            prompt_tokens=rng.randint(*spec.prompt_tokens),
            output_tokens=rng.randint(*spec.output_tokens),
            seed=rng.randrange(1 << 31) if rng.random() < spec.seeded else None,
        )
        return sessions.turn(arrival) if sessions else arrival

    counted = spec.jobs > 0  # arrivals stop after `jobs` of them, else after `duration_s`
    limit = min(  # `jobs` after the queue, and the ceiling; 0 is no limit
        (n for n in (spec.jobs + spec.queue_depth if counted else 0, spec.ceiling) if n),
        default=sys.maxsize,
    )
    out = [job(i, 0) for i in range(min(spec.queue_depth, limit))]
    end_ms = spec.duration_s * 1000
    t = 0.0
    # A burst of no jobs would only spin this loop: with a tiny `burst_every_s`, for long.
    bursts = spec.burst_every_s > 0 and spec.burst_size > 0
    next_burst = spec.burst_every_s * 1000 if bursts else math.inf
    while (spec.rate > 0 or next_burst < end_ms) and len(out) < limit:
        gap = rng.expovariate(spec.rate) * 1000 if spec.rate > 0 else math.inf
        if next_burst <= t + gap:
            t = next_burst
            # Stop at the limit inside a burst too: building jobs to drop them cost
            # seconds of the event loop (burst_size=300000 with jobs=1).
            for _ in range(min(spec.burst_size, limit - len(out))):
                out.append(job(len(out), int(t)))
            next_burst += spec.burst_every_s * 1000
        else:
            t += gap
            if not counted and t > end_ms:
                break
            out.append(job(len(out), int(t)))
        if not counted and t > end_ms:
            break
    return out


class _Conversations:
    """Multi-turn sessions for generate(). Each arrival continues an open session with
    probability `spec.conversation` (a session picked uniformly), else opens a new one.

    - A new session's prompt is the drawn one, its full blocks fresh ids.
    - A later turn's prompt is the previous turn's prompt, its output and a new message
      of the drawn prompt length (capped at MAX_TOKENS), so its block ids start with the
      previous turn's and go on with fresh ones. It keeps the session's model, tenant
      (the prefix cache's salt) and priority.
    - A session closes once its prompt reaches MAX_TOKENS or MAX_PROMPT_BLOCKS blocks:
      it could not grow, and an arrival's ids stay bounded.
    Arrival times come from the caller: a turn may arrive before the previous one ends.
    """

    def __init__(self, spec: WorkloadSpec) -> None:
        self.share = spec.conversation
        self.block_tokens = spec.block_tokens
        self.rng = random.Random(f"conversation-{spec.seed}")
        self.open: list[Arrival] = []  # the latest turn of each open session
        self.opened = 0
        self.next_block = 0

    def turn(self, arrival: Arrival) -> Arrival:
        """`arrival` as a turn of a session: its first, or the next of an open one."""
        if self.open and self.rng.random() < self.share:
            index = self.rng.randrange(len(self.open))
            last = self.open[index]
            prompt = min(
                MAX_TOKENS, last.prompt_tokens + last.output_tokens + arrival.prompt_tokens
            )
            arrival = dataclasses.replace(
                arrival,
                model=last.model,
                priority=last.priority,
                tenant_id=last.tenant_id,
                session_id=last.session_id,
                prompt_tokens=prompt,
                prompt_block_ids=self._blocks(last.prompt_block_ids, prompt),
            )
        else:
            self.opened += 1
            arrival = dataclasses.replace(
                arrival,
                session_id=f"sess-{self.opened:06d}",
                prompt_block_ids=self._blocks((), arrival.prompt_tokens),
            )
            index = len(self.open)
            self.open.append(arrival)
        grown = arrival.prompt_tokens >= MAX_TOKENS
        if grown or len(arrival.prompt_block_ids) >= MAX_PROMPT_BLOCKS:
            self.open[index] = self.open[-1]  # order does not matter: picks are uniform
            self.open.pop()
        else:
            self.open[index] = arrival
        return arrival

    def _blocks(self, prefix: tuple[int, ...], prompt_tokens: int) -> tuple[int, ...]:
        """`prefix`, then fresh ids up to the prompt's full blocks."""
        count = min(prompt_tokens // self.block_tokens, MAX_PROMPT_BLOCKS)
        fresh = range(self.next_block, self.next_block + max(0, count - len(prefix)))
        self.next_block = fresh.stop
        return prefix + tuple(fresh)


def model_map(text: str) -> tuple[tuple[float, str], ...]:
    """ "2048:llama-8b,8192:mistral-7b,inf:qwen-14b": prompt-length ceilings to models."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        ceiling, _, model = part.partition(":")
        try:
            limit = math.inf if ceiling in ("inf", "*") else float(ceiling)
        except ValueError:
            raise ConfigError(f"--trace-models: {part!r} is not CEILING:MODEL") from None
        out.append((limit, model))
    if not out:
        raise ConfigError("--trace-models: expected CEILING:MODEL[,CEILING:MODEL...]")
    return tuple(sorted(out))


def detect_format(path: Path) -> str:
    """Which of TRACE_FORMATS the trace at `path` is, from its content, not its name.
    JSON lines are "mooncake" when the first record has hash_ids, else "jsonl"; a CSV
    with the Azure columns is "azure-2024" when its first TIMESTAMP carries a UTC
    offset, else "azure-2023". ConfigError (with file:line) when it is neither, or
    holds no request."""
    return _open_trace(path).format


def from_trace(
    path: Path,
    *,
    models: tuple[tuple[float, str], ...],
    tenants: tuple[tuple[str, float], ...] = (),
    speedup: float = 1.0,
    limit: int = 0,
    interactive: float = 0.3,
    seed: int = 1,
    time_unit: str = "auto",
) -> list[Arrival]:
    """Replay a trace of any of TRACE_FORMATS (detect_format): its first `limit`
    requests (0: all) in time order, times from the first one divided by `speedup`;
    prompt length picks the model. Only the first `limit` lines are read, so a
    week-long trace replays its first hour without being read whole.

    A request with block ids (Mooncake's hash_ids) carries them as prompt_block_ids,
    and a session (_Sessions): it continues the session of an earlier, shorter request
    whose prompt starts this one (a next turn), and opens its own otherwise, even
    when it shares leading blocks (a common system prompt) with others. A session
    keeps the tenant of its first request for its next turns, as the prefix cache is
    salted by tenant."""
    if speedup <= 0:
        raise ConfigError("--speedup must be positive")
    if time_unit not in ("auto", "s", "ms"):
        raise ConfigError(f"--trace-time-unit: expected auto, s or ms, got {time_unit!r}")
    rows = _read_trace(path, time_unit, limit)
    if not rows:
        raise ConfigError(f"{path}: the trace holds no requests")
    rng = random.Random(seed)
    start = rows[0].seconds
    sessions = _Sessions()
    session_tenants: dict[str, str | None] = {}
    out = []
    for index, row in enumerate(rows):
        # Simulated seconds from the first request: bounded, so at_ms is a small int
        # (a far-off or overflowing timestamp would otherwise crash the run later).
        offset = (row.seconds - start) / speedup
        if not offset <= MAX_SPAN_S:
            raise ConfigError(
                f"{row.where}: timestamp: {row.seconds - start:.6g} s after the first "
                f"request ({rows[0].where}); a replay spans at most {MAX_SPAN_S:.0f} "
                f"simulated seconds (after --speedup {speedup:g})"
            )
        model = next((m for ceiling, m in models if row.prompt <= ceiling), models[-1][1])
        priority = "interactive" if rng.random() < interactive else "batch"
        tenant = _pick(rng, tenants) if tenants else None
        session = sessions.of(index, row.block_ids, row.prompt)
        if session is not None:
            tenant = session_tenants.setdefault(session, tenant)
        out.append(
            Arrival(
                at_ms=int(offset * 1000),
                job_id=f"trace-{index:06d}",
                model=model,
                priority=priority,
                tenant_id=tenant,
                prompt_tokens=max(1, row.prompt),
                output_tokens=max(1, row.output),
                session_id=session,
                prompt_block_ids=row.block_ids,
            )
        )
    return out


class _Sessions:
    """Conversations in a trace that names none, from its block ids (Mooncake's
    hash_ids: one id per 512-token block of the prompt, equal ids equal content, the
    last block maybe partial).

    A next turn's prompt is the previous turn's prompt, its answer and a new message:
    it is longer, and its ids start with the previous prompt's full blocks. Not with
    the previous prompt's partial last block, whose id the answer's tokens change: in
    the Mooncake FAST'25 trace no request's ids extend another's whole list. So a
    request continues the session of the latest earlier request that has at least one
    full block, all of them a prefix of this request's ids, fewer ids and a shorter
    prompt than this request; the longest such prefix wins. Requests that share only
    leading blocks, such as a common system prompt, are separate sessions. A session
    is named after its first request's index in the replay: f"s{index}".
    """

    def __init__(self) -> None:
        # A trie of full-block ids. Under _END, a node keeps the session and the prompt
        # length of the latest request whose full blocks end there.
        self.root: dict[object, Any] = {}

    def of(self, index: int, ids: tuple[int, ...], prompt: int) -> str | None:
        """The session of request `index` (None without ids), recorded for later ones."""
        if not ids:
            return None
        session = None
        node = self.root
        for block in ids[:-1]:  # a proper prefix: the earlier request had fewer ids
            child = node.get(block)
            if child is None:
                break
            node = child
            earlier = node.get(_END)
            if earlier is not None and earlier[1] < prompt:
                session = earlier[0]
        session = session or f"s{index}"
        full = ids[: prompt // BLOCK_TOKENS]
        if full:
            path = self.root
            for block in full:
                path = path.setdefault(block, {})
            path[_END] = (session, prompt)
        return session


_END = object()  # the trie key under which a node keeps (session, prompt tokens)


class _Row(NamedTuple):
    seconds: float
    prompt: int
    output: int
    block_ids: tuple[int, ...]
    where: str  # file:line


@dataclass(frozen=True)
class _Opened:
    """A trace being read: its format, and its records from the first request on."""

    format: str
    records: Iterator[tuple[int, str]]  # (line number, text)
    columns: dict[str, int]  # a CSV's column indexes by name; {} for JSON lines


def _read_trace(path: Path, time_unit: str, limit: int) -> list[_Row]:
    """The first `limit` requests (0: all), in time order. Numeric timestamps are in
    `time_unit`; "auto" means milliseconds in JSON lines (the Mooncake traces' unit)
    and seconds in CSV. Date-time strings are read as such in both."""
    trace = _open_trace(path)
    json_lines = not trace.columns
    unit = time_unit if time_unit != "auto" else "ms" if json_lines else "s"
    records = itertools.islice(trace.records, limit or None)
    if json_lines:
        rows = [_json_row(f"{path}:{n}", text, unit) for n, text in records]
    else:
        rows = [_csv_row(f"{path}:{n}", text, trace.columns, unit) for n, text in records]
    rows.sort(key=lambda r: r.seconds)
    return rows


def _open_trace(path: Path) -> _Opened:
    """Detect the trace's format from its first record (a CSV's, past its header)."""
    records = _lines(path)
    first = next(records, None)
    if first is None:
        raise ConfigError(f"{path}: the trace holds no requests")
    line_no, text = first
    if text.lstrip().startswith("{"):
        record = _json_object(f"{path}:{line_no}", text)
        kind = "mooncake" if "hash_ids" in record else "jsonl"
        return _Opened(kind, itertools.chain([first], records), {})
    try:
        names = [name.strip() for name in next(csv.reader([text]))]
    except csv.Error:  # not CSV either: the message below says what would do
        names = []
    if not set(AZURE_COLUMNS) <= set(names):
        raise ConfigError(
            f"{path}:{line_no}: expected the columns {', '.join(sorted(AZURE_COLUMNS))} "
            f"(an Azure LLM inference trace), or JSON lines ({', '.join(TRACE_FORMATS)})"
        )
    columns = {name: names.index(name) for name in AZURE_COLUMNS}
    data = next(records, None)
    if data is None:
        raise ConfigError(f"{path}: the trace holds no requests")
    where = f"{path}:{data[0]}"
    stamp = _field(where, _csv_fields(where, data[1]), columns, "TIMESTAMP")
    kind = "azure-2024" if _has_offset(stamp) else "azure-2023"
    return _Opened(kind, itertools.chain([data], records), columns)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the file's non-blank lines, none longer than
    MAX_LINE_BYTES: a longer one is refused once that much of it is read."""
    try:
        with path.open("rb") as file:
            for line_no in itertools.count(1):
                raw = file.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                if len(raw) > MAX_LINE_BYTES:
                    raise ConfigError(
                        f"{path}:{line_no}: a line longer than {MAX_LINE_BYTES} bytes"
                    )
                try:  # a byte-order mark may open the file (spreadsheet exports)
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise ConfigError(f"{path}:{line_no}: not UTF-8 text") from None
                if text.strip():
                    yield line_no, text.rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


def _json_object(where: str, text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
        raise ConfigError(f"{where}: expected a JSON object ({exc})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _json_row(where: str, text: str, unit: str) -> _Row:
    record = _json_object(where, text)
    missing = [k for k in ("timestamp", "input_length", "output_length") if k not in record]
    if missing:
        raise ConfigError(
            f"{where}: expected timestamp, input_length, output_length; "
            f"missing {', '.join(missing)}"
        )
    stamp = record["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, int | float | str):
        raise ConfigError(f"{where}: timestamp: expected a number or a date-time")
    prompt = _tokens(where, "input_length", record["input_length"])
    ids = record.get("hash_ids", [])
    # The ids cover the prompt's blocks, the last maybe partial: a few more is an error.
    most = prompt // BLOCK_TOKENS + 2
    if not isinstance(ids, list) or len(ids) > most:
        raise ConfigError(
            f"{where}: hash_ids: expected a list of at most input_length / "
            f"{BLOCK_TOKENS} + 2 = {most} block ids"
        )
    for block in ids:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block <= MAX_BLOCK_ID:
            raise ConfigError(
                f"{where}: hash_ids: expected integers from 0 to {MAX_BLOCK_ID}, got {block!r}"
            )
    return _Row(
        _timestamp(where, stamp, unit),
        prompt,
        _tokens(where, "output_length", record["output_length"]),
        tuple(ids),
        where,
    )


def _csv_fields(where: str, text: str) -> list[str]:
    try:
        return next(csv.reader([text]))
    except csv.Error as exc:
        raise ConfigError(f"{where}: not a CSV row ({exc})") from None


def _field(where: str, fields: list[str], columns: dict[str, int], name: str) -> str:
    index = columns[name]
    if index >= len(fields):
        raise ConfigError(f"{where}: {name}: missing (the row has {len(fields)} fields)")
    return fields[index].strip()


def _csv_row(where: str, text: str, columns: dict[str, int], unit: str) -> _Row:
    fields = _csv_fields(where, text)

    def tokens(name: str) -> int:
        value = _field(where, fields, columns, name)
        try:
            count = int(value)
        except ValueError:
            raise ConfigError(f"{where}: {name}: expected a whole number, got {value!r}") from None
        return _tokens(where, name, count)

    stamp = _field(where, fields, columns, "TIMESTAMP")
    return _Row(
        _timestamp(where, stamp, unit),
        tokens("ContextTokens"),
        tokens("GeneratedTokens"),
        (),
        where,
    )


def _tokens(where: str, name: str, value: object) -> int:
    """A token count of a trace: a whole number from 0 to MAX_TOKENS."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 12.0: some writers print every number as a float
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {name}: expected a whole number, got {value!r}")
    if not 0 <= value <= MAX_TOKENS:
        raise ConfigError(f"{where}: {name}: expected 0 to {MAX_TOKENS} tokens, got {value}")
    return value


def _timestamp(where: str, stamp: str | float, unit: str) -> float:
    try:
        return _seconds(stamp, unit)
    except ValueError as exc:
        raise ConfigError(f"{where}: timestamp: {exc}") from None
    except OverflowError:  # a number too large for a float: a 400-digit integer
        raise ConfigError(f"{where}: timestamp: expected a finite number") from None


def _seconds(stamp: str | float, unit: str) -> float:
    """Seconds since the epoch of a timestamp: a number in `unit` ("s" or "ms"), or an
    ISO date-time. One without an offset is UTC, so a trace that crosses a daylight
    saving change replays the same on every machine. ValueError when it is neither."""
    try:
        value = float(stamp)
    except ValueError:
        assert isinstance(stamp, str)
        return _date_time(stamp).timestamp()
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {stamp!r}")
    return value / (1000 if unit == "ms" else 1)


def _date_time(stamp: str) -> datetime:
    """ "2023-11-16 18:17:03.9799600" (seven digits of fraction: datetime keeps six) or
    "2024-05-10 00:00:00.009930+00:00"; naive ones as UTC."""
    try:
        moment = datetime.fromisoformat(stamp.strip())
    except ValueError:
        raise ValueError(f"expected a number or a date-time, got {stamp[:64]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _has_offset(stamp: str) -> bool:
    """Whether a timestamp is a date-time with a UTC offset (the Azure 2024 form)."""
    try:
        return datetime.fromisoformat(stamp).tzinfo is not None
    except ValueError:
        return False  # a number, or an error that reading the row names
