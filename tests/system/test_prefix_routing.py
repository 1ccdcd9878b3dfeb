"""Prefix-aware routing, end to end: the real service, two real development workers of
one model, and a user scheduler that asks the core's prefix index where to go.

Without a cached prefix the scheduler sends a job to the worker that has completed the
fewest jobs. After a long prompt and two short ones, a follow-up sharing the long
prompt would go to the other worker; it lands on the long prompt's worker only because
the index says that worker holds its prefix. /metrics counts the prompt tokens the index expected to be reused.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from tests.service_helpers import running_service, write_config

GPU = {"device_name": "Test GPU", "vram_total_bytes": 8 * 1024**3, "compute_capability": "8.9"}
SCHEDULER = """
function schedule(ctx)
  local pool = ctx.pools[1]
  local workers = ctx.find_workers_by_model("llama-8b")
  if #workers < 2 then  -- one worker per GPU, on the GPU that has none
    for _, g in ipairs(pool.gpus) do
      local taken = false
      for _, w in ipairs(pool.workers) do taken = taken or w.gpu_ids[1] == g.id end
      if not taken then
        return { action = "start_worker", pool_id = pool.id, gpu_id = g.id,
                 model_ref = ctx.resolve_model("llama-8b") }
      end
    end
    return { action = "wait" }
  end
  local job = ctx.queue[1]
  if job == nil then return { action = "wait" } end
  local best = ctx.find_workers_by_prefix(job)[1]
  if best == nil or ctx.prefix_match(job, best) == 0 then
    table.sort(workers, function(a, b)
      if a.jobs_completed ~= b.jobs_completed then return a.jobs_completed < b.jobs_completed end
      return a.id < b.id
    end)
    best = workers[1]
  end
  if best.status ~= "ready" then return { action = "wait" } end
  return { action = "dispatch", job_id = job.id, worker_id = best.id }
end
"""
SHARED = "You are a careful assistant. " * 300  # about 2,100 tokens: 4 full blocks


@pytest.mark.slow
async def test_a_follow_up_goes_where_its_prefix_is_cached(tmp_path: Path) -> None:
    script = tmp_path / "prefix.lua"
    script.write_text(SCHEDULER)
    config = write_config(
        tmp_path,
        scheduler={"file": str(script)},
        local_pool={"gpus": [{"id": 0, **GPU}, {"id": 1, **GPU}]},
    )
    async with running_service(config) as svc:
        first = await svc.submit(prompt=SHARED + "First question?", max_tokens=4)
        first = await svc.wait_finished(first.id, timeout_s=60)
        assert first.state == pb.JOB_STATE_COMPLETED
        others = []
        for n in range(2):  # no prefix: the worker with fewer completed jobs, then by id
            other = await svc.submit(prompt=f"an unrelated short prompt {n}", max_tokens=4)
            others.append(await svc.wait_finished(other.id, timeout_s=60))
        assert others[0].worker_id != first.worker_id
        assert others[1].worker_id == first.worker_id  # 1 and 1 completed: by id
        # Now the first job's worker has completed two jobs and the other one: without
        # its cached prefix, the follow-up would go to the other worker.
        follow_up = await svc.submit(prompt=SHARED + "Second question?", max_tokens=4)
        follow_up = await svc.wait_finished(follow_up.id, timeout_s=60)
        assert follow_up.state == pb.JOB_STATE_COMPLETED
        assert follow_up.worker_id == first.worker_id
        async with aiohttp.ClientSession() as http, http.get(f"{svc.http}/metrics") as reply:
            text = await reply.text()
        matched = _sample(text, 'orchestrator_prefix_tokens_total{kind="matched"}')
        assert matched == 4 * 512  # the shared blocks, once: the follow-up's


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
