"""The snapshot journal keeps an unbroken chain of deltas, even past a context that
cannot be encoded."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.context import Gpu, Job, Pool
from orchestrator.domain.samples import sample_context
from orchestrator.state.journal import SnapshotJournal
from orchestrator.wire.context import diff


def test_a_context_that_does_not_encode_leaves_the_journal_as_it_was() -> None:
    """Before, `advance` counted the cycle and kept its context, then raised: the next
    delta was made against a context no worker ever received, and a worker brought up
    to date with the deltas silently missed every change of the failed cycles."""
    first = sample_context(now_ms=1_000)
    journal = SnapshotJournal()
    journal.advance(first)
    before = (journal.seq, journal.snapshot_hash, journal.context)
    job = Job("added-while-failing", "llama-8b", queued_at=1_500)
    bad_pool = Pool("bad", gpus=(Gpu(0, "x", 2**64),))  # past int64: no encoding
    bad = dataclasses.replace(first, now_ms=2_000, queue=(*first.queue, job),
                              pools=(*first.pools, bad_pool))  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        journal.advance(bad)
    assert (journal.seq, journal.snapshot_hash, journal.context) == before

    good = dataclasses.replace(first, now_ms=3_000, queue=(*first.queue, job))
    journal.advance(good)
    deltas = journal.deltas_since(journal.epoch, before[0])
    assert deltas == [diff(first, good)]
    assert job.id in {*deltas[0].upsert_jobs.id}


def test_a_first_context_that_does_not_encode_is_not_recorded() -> None:
    journal = SnapshotJournal()
    ctx = sample_context()
    bad = dataclasses.replace(ctx, pools=(Pool("bad", gpus=(Gpu(0, "x", 2**64),)),))
    with pytest.raises(ValueError, match="out of range"):
        journal.advance(bad)
    assert (journal.seq, journal.context) == (0, None)
    journal.advance(ctx)
    assert journal.seq == 1 and journal.full_snapshot().now_ms == ctx.now_ms
