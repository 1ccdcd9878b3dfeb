"""Applying context updates in the sandbox costs what changed (issue 17), and says the same.

The ordered queue is merged only when something reads it in order; a full snapshot's
jobs are built when first read; the counts behind the memory cap are kept as records
come and go. None of this may show: whatever the updates, a script sees the queue in
runtime-spec order with every field as sent. Random updates are checked against a
plain Python model, on LuaJIT and on Lua 5.4.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import pytest

from orchestrator._proto import context_pb2, sandbox_pb2
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.engine import platform_source
from sandbox_worker.runtime import LuaSchedulerRuntime
from tests.conftest import LANGUAGE_ENUM, LANGUAGES, InProcessRuntime

NOW = 1_700_000_000_000

# ctx.metrics.queue_depth tells the script what to read: 0 nothing, 1 ctx.queue, 2 the
# queue through filter_jobs, 3 ctx.queue, filter_jobs and ctx.queue again (the same
# array). It logs one line per job, in the order it got them; and with
# ctx.metrics.total_pools 1, one line per pool.
SCRIPT = """
local function show(ctx, job)
  ctx.log_info(string.format("job %s %s %d %s %s %s %d %d", job.id, job.priority,
    job.queued_at, tostring(job.tenant_id), tostring(job.seed), job.model_ref,
    job.wait_time_ms, job.prompt_blocks))
end
function schedule(ctx)
  local mode = ctx.metrics.queue_depth
  local jobs = {}
  if mode == 1 then jobs = ctx.queue end
  if mode == 2 then jobs = ctx.filter_jobs(function() return true end) end
  if mode == 3 then
    local _ = ctx.queue, ctx.filter_jobs({ priority = "batch" })
    jobs = ctx.queue
  end
  for _, job in ipairs(jobs) do show(ctx, job) end
  if ctx.metrics.total_pools == 1 then
    for _, pool in ipairs(ctx.pools) do
      local ids = {}
      for i, w in ipairs(pool.workers) do ids[i] = w.id .. "=" .. #w.active_job_ids end
      local gpus = {}
      for i, g in ipairs(pool.gpus) do gpus[i] = tostring(g.id) end
      ctx.log_info("pool " .. pool.id .. " " .. table.concat(ids, ",") .. " "
        .. table.concat(gpus, ","))
    end
  end
  return { action = "wait" }
end
"""

RANK = {"interactive": 0, "batch": 1}


@dataclass(frozen=True)
class Job:
    id: str
    priority: str = "batch"
    queued_at: int = NOW
    tenant_id: str = ""
    seed: int = -1
    model_ref: str = "m"
    blocks: tuple[int, ...] = ()

    def order(self) -> tuple[int, int, str]:
        return RANK.get(self.priority, 2), self.queued_at, self.id

    def line(self, now: int) -> str:
        tenant = self.tenant_id or "nil"
        seed = "nil" if self.seed < 0 else str(self.seed)
        wait = max(0, now - self.queued_at)
        return (
            f"job {self.id} {self.priority} {self.queued_at} {tenant} {seed} {self.model_ref} "
            f"{wait} {len(self.blocks)}"
        )


def fill(columns: context_pb2.JobColumns, jobs: Iterable[Job]) -> None:
    for j in jobs:
        columns.id.append(j.id)
        columns.tenant_id.append(j.tenant_id)
        columns.session_id.append("")
        columns.priority.append(j.priority)
        columns.model_ref.append(j.model_ref)
        columns.prompt_hash.append("")
        columns.max_tokens.append(100)
        columns.seed.append(j.seed)
        columns.temperature.append(0.5)
        columns.created_at.append(j.queued_at)
        columns.queued_at.append(j.queued_at)
        columns.retry_count.append(0)
        columns.estimated_vram_bytes.append(1)
        columns.estimated_duration_ms.append(1)
        columns.prompt_tokens.append(512 * len(j.blocks))
        columns.block_counts.append(len(j.blocks))
        columns.block_hashes.extend(j.blocks)
        columns.session_worker.append("")


def worker(pool_id: str, worker_id: str, running: int = 0) -> context_pb2.Worker:
    return context_pb2.Worker(
        pool_id=pool_id,
        id=worker_id,
        status="ready",
        model_ref="m",
        gpu_ids=[0],
        slots_total=4,
        slots_busy=running,
        active_job_ids=[f"r-{worker_id}-{i}" for i in range(running)],
    )


def loaded(
    language: str,
    source: str,
    *,
    name: str = "s.lua",
    limits: SandboxLimits | None = None,
    expose_platform_source: bool = False,
) -> LuaSchedulerRuntime:
    """The worker's runtime with `source` loaded."""
    runtime = LuaSchedulerRuntime(LANGUAGE_ENUM[language])
    reply = runtime.load(
        sandbox_pb2.LoadRequest(
            name=name,
            source=source,
            limits=(limits or SandboxLimits()).to_proto(),
            platform_source=platform_source(),
            expose_platform_source=expose_platform_source,
        )
    )
    assert reply.ok, reply.error.message
    return runtime


@dataclass
class Driven:
    """The worker's runtime, driven with snapshots and deltas, beside a model of them."""

    language: str
    jobs: dict[str, Job] = field(default_factory=dict)
    now: int = NOW
    runtime: LuaSchedulerRuntime = field(init=False)

    def __post_init__(self) -> None:
        self.runtime = loaded(
            self.language,
            SCRIPT,
            name="updates.lua",
            limits=SandboxLimits(max_log_records=1000, max_log_bytes=1 << 20),
            expose_platform_source=True,
        )

    def snapshot(self, jobs: Sequence[Job], *, mode: int = 1) -> list[str]:
        self.jobs = {}
        for j in jobs:
            self.jobs[j.id] = j
        msg = context_pb2.Context(now_ms=self.now)
        fill(msg.queue, jobs)
        msg.metrics.queue_depth = mode
        self.runtime.apply_snapshot(msg)
        return self.run()

    def delta(
        self,
        remove: Sequence[str] = (),
        upsert: Sequence[Job] = (),
        *,
        mode: int = 1,
        workers: Sequence[context_pb2.Worker] = (),
        remove_workers: Sequence[str] = (),
        remove_pools: Sequence[str] = (),
        gpus: Sequence[context_pb2.Gpu] = (),
        show_pools: bool = False,
    ) -> list[str]:
        self.now += 100
        for job_id in remove:
            self.jobs.pop(job_id, None)
        for j in upsert:
            self.jobs[j.id] = j
        msg = context_pb2.ContextDelta(now_ms=self.now, remove_jobs=list(remove))
        fill(msg.upsert_jobs, upsert)
        msg.upsert_workers.extend(workers)
        msg.remove_workers.extend(remove_workers)
        msg.remove_pools.extend(remove_pools)
        msg.upsert_gpus.extend(gpus)
        msg.metrics.queue_depth = mode
        msg.metrics.total_pools = 1 if show_pools else 0
        self.runtime.apply_delta(msg)
        return self.run()

    def run(self) -> list[str]:
        result = self.runtime.run(False, False)
        assert result.error_kind == 0, (result.error_message, result.traceback)
        return [text for _, text in result.logs]

    def expected(self) -> list[str]:
        return [j.line(self.now) for j in sorted(self.jobs.values(), key=Job.order)]

    @property
    def merges(self) -> int:
        return int(self.runtime.host.queue_merges())

    def counts(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.runtime.host.counts())


def random_job(rng: random.Random, job_id: str) -> Job:
    return Job(
        job_id,
        priority=rng.choice(["interactive", "batch", "batch", "other"]),
        queued_at=NOW + rng.randrange(-5_000, 5_000, 250),  # some after now: waited 0
        tenant_id=rng.choice(["", "", "t-1", "t-2"]),
        seed=rng.choice([-1, -1, 7]),
        model_ref=rng.choice(["m", "n"]),
        blocks=tuple(rng.randrange(1 << 40) for _ in range(rng.choice([0, 0, 2]))),
    )


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_updates_read_as_the_model_says(language: str, seed: int) -> None:
    """Snapshots (in order or not), jobs added, changed, removed and re-added, read or
    not: whenever the queue is read it is the model's, in order, with every field."""
    rng = random.Random(seed)
    driven = Driven(language)
    serial = 0

    def fresh() -> Job:
        nonlocal serial
        serial += 1
        return random_job(rng, f"j{serial}")

    jobs = sorted((fresh() for _ in range(60)), key=Job.order)
    assert driven.snapshot(jobs) == driven.expected()
    for step in range(80):
        if step % 25 == 24:  # now and then a resync, sometimes out of order
            jobs = [*driven.jobs.values(), *(fresh() for _ in range(10))]
            if rng.random() < 0.5:
                jobs.sort(key=Job.order)
            mode = rng.choice([0, 1])
            seen = driven.snapshot(jobs, mode=mode)
            assert seen == (driven.expected() if mode else [])
            continue
        queued = list(driven.jobs)
        remove = rng.sample(queued, min(len(queued), rng.randrange(6)))
        if rng.random() < 0.2:
            remove.append("never-queued")
        changed = [
            random_job(rng, job_id)
            for job_id in rng.sample(queued, min(len(queued), rng.randrange(4)))
        ]
        # A job that leaves and comes back in one delta is a new job with the same id.
        back = [random_job(rng, job_id) for job_id in remove[:1] if job_id != "never-queued"]
        added = [fresh() for _ in range(rng.randrange(6))]
        mode = rng.choice([0, 0, 1, 2, 3])
        seen = driven.delta(remove, [*changed, *back, *added], mode=mode)
        assert seen == (driven.expected() if mode else []), f"step {step}"
    assert driven.delta(mode=1) == driven.expected()


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_queue_is_merged_only_when_read(language: str) -> None:
    """Deltas nobody reads the queue after merge nothing; the first read in a call
    merges once, however often the call reads; a read with no change merges nothing."""
    driven = Driven(language)
    driven.snapshot([Job(f"j{i}", queued_at=NOW + i) for i in range(50)], mode=0)
    assert driven.merges == 0
    for i in range(5):
        driven.delta(
            [f"j{i}"], [Job(f"n{i}", "interactive"), Job(f"j{10 + i}", queued_at=0)], mode=0
        )
    assert driven.merges == 0
    assert driven.delta(mode=3) == driven.expected()
    assert driven.merges == 1
    assert driven.delta(mode=1) == driven.expected()
    assert driven.merges == 1
    driven.delta(["j20"], mode=2)
    assert driven.merges == 2


@pytest.mark.parametrize("language", LANGUAGES)
def test_places_of_jobs_that_left_are_not_kept_forever(language: str) -> None:
    """With no script reading the queue, the places of jobs that left are dropped once
    they outnumber the queued jobs; the queue is still right when finally read."""
    driven = Driven(language)
    driven.snapshot([Job(f"j{i}", queued_at=NOW + i) for i in range(30)], mode=0)
    for step in range(12):
        first = sorted(driven.jobs.values(), key=Job.order)[:3]
        added = [Job(f"s{step}-{i}", queued_at=NOW + 100 + step) for i in range(2)]
        driven.delta([j.id for j in first], added, mode=0)
    assert driven.merges >= 1
    assert driven.delta(mode=1) == driven.expected()


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_snapshots_columns_are_kept_while_a_job_reads_from_them(language: str) -> None:
    """A snapshot's job columns count towards the memory cap until each of its jobs has
    been read, changed or has left; the jobs read the same either way."""
    driven = Driven(language)
    jobs = [Job(f"j{i}", tenant_id="t" if i % 2 else "", seed=i % 3 - 1) for i in range(6)]
    driven.snapshot(jobs, mode=0)
    assert driven.counts()[0] == 6 and driven.counts()[7] == 6
    driven.delta(["j0", "j1"], [replace(jobs[2], priority="interactive")], mode=0)
    assert driven.counts()[0] == 4 and driven.counts()[7] == 6
    driven.delta(["j3"], mode=0)
    assert driven.counts()[7] == 6  # j4 and j5 still read from the snapshot's columns
    assert driven.delta(["j4"], mode=1) == driven.expected()  # j5 is read: built
    assert driven.counts()[0] == 2 and driven.counts()[7] == 0
    driven.snapshot(jobs, mode=0)
    driven.delta([j.id for j in jobs], mode=0)
    assert driven.counts()[0] == 0 and driven.counts()[7] == 0


@pytest.mark.parametrize("language", LANGUAGES)
def test_unread_snapshot_jobs_iterate_and_are_found_by_id(language: str) -> None:
    """pairs() and get_job() on a job nothing has read yet see every field."""
    source = """
    function schedule(ctx)
      local job = ctx.get_job("b")
      local keys = {}
      for k in pairs(job) do keys[#keys + 1] = k end
      table.sort(keys)
      ctx.log_info(table.concat(keys, " "))
      ctx.log_info(ctx.get_job("a").model_ref .. " " .. tostring(ctx.get_job("zz")))
      return { action = "wait" }
    end
    """
    runtime = loaded(language, source)
    msg = context_pb2.Context(now_ms=NOW)
    fill(msg.queue, [Job("a", model_ref="alpha"), Job("b")])
    runtime.apply_snapshot(msg)
    logs = [text for _, text in runtime.run(False, False).logs]
    assert logs[0].split() == [
        "created_at", "estimated_duration_ms", "estimated_vram_bytes", "id", "max_tokens",
        "model_ref", "priority", "prompt_blocks", "prompt_hash", "prompt_tokens", "queued_at",
        "retry_count", "temperature", "wait_time_ms",
    ]  # fmt: skip
    assert logs[1] == "alpha nil"


@pytest.mark.parametrize("language", LANGUAGES)
def test_one_id_twice_in_a_snapshot_keeps_the_later(language: str) -> None:
    """The core never sends it; the runtime still keeps one job, in its right place."""
    driven = Driven(language)
    seen = driven.snapshot([Job("a", queued_at=NOW), Job("b", queued_at=NOW + 1)], mode=0)
    assert seen == []
    msg = context_pb2.Context(now_ms=NOW)
    fill(msg.queue, [Job("a", queued_at=NOW), Job("b"), Job("a", queued_at=NOW + 5)])
    msg.metrics.queue_depth = 1
    driven.runtime.apply_snapshot(msg)
    driven.jobs = {"b": Job("b"), "a": Job("a", queued_at=NOW + 5)}
    assert driven.run() == driven.expected()
    assert driven.counts()[0] == 2


@pytest.mark.parametrize("language", LANGUAGES)
def test_worker_updates_keep_pools_in_order_and_counts_right(language: str) -> None:
    """Workers and GPUs added, changed, moved between pools and removed: each pool lists
    them by id, and the counts behind the memory cap follow without a walk."""
    rng = random.Random(7)
    driven = Driven(language)
    driven.snapshot([], mode=0)
    model: dict[str, dict[str, int]] = {}  # pool -> worker -> running jobs
    gpus: dict[str, set[int]] = {}
    for step in range(40):
        # In a delta's order: workers and pools removed, then GPUs and workers put.
        gone = [f"w{rng.randrange(30)}" for _ in range(rng.randrange(3))]
        for worker_id in gone:
            for workers in model.values():
                workers.pop(worker_id, None)
        dropped = ["q"] if step == 30 else []
        for pool_id in dropped:
            model.pop(pool_id, None)
            gpus.pop(pool_id, None)
        new_gpus = [context_pb2.Gpu(pool_id=rng.choice("pq"), id=rng.randrange(8))]
        for g in new_gpus:
            gpus.setdefault(g.pool_id, set()).add(g.id)
            model.setdefault(g.pool_id, {})
        ups = []
        for _ in range(rng.randrange(1, 12)):
            pool_id, worker_id = rng.choice("pq"), f"w{rng.randrange(30)}"
            running = rng.randrange(3)
            for workers in model.values():
                workers.pop(worker_id, None)
            model.setdefault(pool_id, {})[worker_id] = running
            ups.append(worker(pool_id, worker_id, running))
        seen = driven.delta(
            workers=ups,
            remove_workers=gone,
            gpus=new_gpus,
            remove_pools=dropped,
            mode=0,
            show_pools=True,
        )
        expected = [
            "pool "
            + pool_id
            + " "
            + ",".join(f"{w}={n}" for w, n in sorted(model[pool_id].items()))
            + " "
            + ",".join(str(g) for g in sorted(gpus.get(pool_id, ())))
            for pool_id in sorted(model)
        ]
        assert seen == expected, f"step {step}"
        _, n_workers, n_gpus, *_, n_running, _, _ = driven.counts()
        assert n_workers == sum(len(w) for w in model.values())
        assert n_gpus == sum(len(g) for g in gpus.values())
        assert n_running == sum(n for w in model.values() for n in w.values())
    # A snapshot's pools arrive in any order and are sorted once.
    msg = context_pb2.Context(now_ms=NOW)
    pool = msg.pools.add()
    pool.info.id = "big"
    pool.workers.extend(worker("big", f"w{i}") for i in rng.sample(range(40), 40))
    msg.metrics.total_pools = 1
    driven.runtime.apply_snapshot(msg)
    listed = driven.run()[0].split()[2]
    assert listed == ",".join(f"w{i}=0" for i in sorted(range(40), key=str))


def test_ctx_queue_is_made_on_first_read(lua: InProcessRuntime) -> None:
    """ctx.queue is a lazy field like ctx.pools: pairs(ctx) and rawget see it, and a
    script that drops it and reads it again gets a new array, its first one untouched."""
    seen = lua.eval(
        """(function()
          local keys = {}
          for k in pairs(ctx) do if k == "queue" or k == "pools" then keys[#keys + 1] = k end end
          table.sort(keys)
          local first = rawget(ctx, "queue")
          table.sort(first, function(a, b) return a.id > b.id end)
          ctx.queue = nil
          local again = ctx.queue
          return { table.concat(keys, " "), first[1].id, again[1].id, first ~= again, #again }
        end)()""",
        sample_context(),
    )
    assert seen == ["pools queue", "job-5", "job-1", True, 5]


@pytest.mark.parametrize("language", LANGUAGES)
def test_prompt_blocks_and_sessions_follow_the_jobs(language: str) -> None:
    """A job's block hashes and session worker, from a snapshot or a delta, are replaced
    when the job changes and forgotten when it leaves."""
    source = """
    function schedule(ctx)
      local tokens, blocks = ctx.prefix_match("a", "w")
      local session = ctx.session_worker("a")
      ctx.log_info(blocks .. " " .. tokens .. " " .. (session and session.id or "-"))
      return { action = "wait" }
    end
    """
    runtime = loaded(language, source)

    def seen() -> str:
        return str(runtime.run(False, False).logs[0][1])

    msg = context_pb2.Context(now_ms=NOW)
    fill(msg.queue, [Job("b"), Job("a", blocks=(1, 2, 3))])
    msg.queue.session_worker[1] = "w"
    pool = msg.pools.add()
    pool.info.id = "p"
    pool.workers.append(worker("p", "w"))
    msg.prefix.block_tokens = 16
    msg.prefix.held.add(worker_id="w", hashes=[1, 2])
    runtime.apply_snapshot(msg)
    assert seen() == "2 32 w"
    assert runtime.host.counts()[6] == 3 + 2
    delta = context_pb2.ContextDelta(now_ms=NOW)
    fill(delta.upsert_jobs, [Job("a", blocks=(1, 9))])
    runtime.apply_delta(delta)
    assert seen() == "1 16 -"
    delta = context_pb2.ContextDelta(now_ms=NOW, remove_jobs=["a"])
    runtime.apply_delta(delta)
    assert seen() == "0 0 -"
    assert runtime.host.counts()[6] == 2
