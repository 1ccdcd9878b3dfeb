"""The web UI in real headless Chromium (Debian's package), driven by Playwright.

Screenshots of each test are saved in tests/artifacts/ (CI artifacts)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.service_helpers import Running, running_service, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "tests" / "artifacts"
SPEC_3_2 = REPO / "schedulers" / "examples" / "programmable-3.2-determinism-first.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
    ),
]


@pytest.fixture
async def ui(tmp_path: Path) -> AsyncIterator[tuple[Running, object]]:
    """A running orchestratord and a Chromium page on its UI."""
    from playwright.async_api import async_playwright  # noqa: PLC0415

    async with running_service(write_config(tmp_path)) as svc, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1500, "height": 1700})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(svc.http + "/")
        await page.wait_for_selector("body[data-ready=true]", timeout=20_000)
        yield svc, page
        assert not errors, errors
        await browser.close()


async def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def normalized_lua(text: str) -> str:
    """The compiled Lua without its provenance: the header naming the file and its
    hash, and the source line numbers in the rule comments."""
    lines = text.splitlines()[1:]
    return "\n".join(re.sub(r", line \d+\)", ")", line) for line in lines)


async def add_rule(page: object, name: str, priority: int) -> object:
    await page.click("#add-rule")  # type: ignore[attr-defined]
    rule = page.locator(".rule").last  # type: ignore[attr-defined]
    await rule.locator(".rule-name").fill(name)
    await rule.locator(".rule-priority").fill(str(priority))
    return rule


async def test_build_the_spec_3_2_example_by_clicking(ui: tuple[Running, object]) -> None:
    """Clicking together programmable-spec 3.2 gives its YAML, and the Lua the CLI compiler
    emits for that file."""
    _, page = ui
    await page.fill("#policy-name", "determinism-first")  # type: ignore[attr-defined]
    await page.fill("#policy-version", "1.0")  # type: ignore[attr-defined]
    rule = await add_rule(page, "prioritize-seeded-jobs", 100)
    await rule.locator(".add-test").click()  # type: ignore[attr-defined]
    rule = page.locator(".rule").nth(0)  # type: ignore[attr-defined]
    await rule.locator(".test-field").select_option("job.seed")
    await rule.locator(".test-op").select_option("exists")
    await rule.locator(".action-selection").select_option("least-loaded")
    await rule.locator(".action-model-match").check()
    rule = await add_rule(page, "batch-jobs-low-priority", 50)
    await rule.locator(".add-test").click()  # type: ignore[attr-defined]
    rule = page.locator(".rule").nth(1)  # type: ignore[attr-defined]
    await rule.locator(".test-value").fill("batch")
    await rule.locator(".action-selection").select_option("most-vram-free")
    rule = await add_rule(page, "fallback", 0)
    await rule.locator(".action-type").select_option("use")  # type: ignore[attr-defined]
    await page.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#yaml').value.includes('platform-scheduler')"
        " && document.querySelector('#lua').textContent.includes('Rule \"fallback\"')"
    )
    await page.click("#tab-lua")  # type: ignore[attr-defined]
    await shot(page, "1-builder-spec-3.2")
    built = yaml.safe_load(await page.input_value("#yaml"))  # type: ignore[attr-defined]
    assert built == yaml.safe_load(SPEC_3_2.read_text())
    shown = await page.text_content("#lua")  # type: ignore[attr-defined]
    cli = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "scheduler", "compile", str(SPEC_3_2)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert normalized_lua(shown) == normalized_lua(cli.stdout)


async def test_a_broken_rule_shows_its_error_inline(ui: tuple[Running, object]) -> None:
    """A wait of -5 ms: the error appears on that rule, and validation says invalid."""
    _, page = ui
    await add_rule(page, "fine", 10)
    rule = await add_rule(page, "broken", 5)
    await rule.locator(".action-type").select_option("wait")  # type: ignore[attr-defined]
    rule = page.locator(".rule").nth(1)  # type: ignore[attr-defined]
    await rule.locator(".action-duration").fill("-5")
    error = page.locator(".rule.has-error .rule-error")  # type: ignore[attr-defined]
    await error.wait_for()
    assert "duration_ms" in (await error.text_content())
    assert await page.locator(".rule.has-error .rule-name").input_value() == "broken"  # type: ignore[attr-defined]
    await page.click("#validate")  # type: ignore[attr-defined]
    summary = page.locator("#validation-summary")  # type: ignore[attr-defined]
    await summary.wait_for()
    assert "invalid" in (await summary.text_content()).lower()
    assert await page.locator(".rule").nth(0).get_attribute("class") == "rule"  # type: ignore[attr-defined]
    await shot(page, "2-inline-error")


async def test_the_live_simulator_draws_charts(ui: tuple[Running, object]) -> None:
    """A template, simulated against the active policy: headline figures and three charts."""
    _, page = ui
    await page.locator(".template[data-name=batch-optimized] .template-load").click()  # type: ignore[attr-defined]
    await page.wait_for_function("document.querySelectorAll('.rule').length === 4")  # type: ignore[attr-defined]
    await page.fill("#sim-duration", "10")  # type: ignore[attr-defined]
    await page.click("#simulate")  # type: ignore[attr-defined]
    await page.wait_for_selector("#sim-table", timeout=60_000)  # type: ignore[attr-defined]
    headers = await page.locator("#sim-table thead th").all_text_contents()  # type: ignore[attr-defined]
    assert headers[1:] == ["batch-optimized.yaml", "active: platform"]
    assert await page.locator("svg.chart").count() == 3  # type: ignore[attr-defined]
    assert await page.locator("svg.chart path[data-series]").count() == 6  # type: ignore[attr-defined]
    completed = await page.locator("#sim-table tbody tr").first.locator("td").first.text_content()  # type: ignore[attr-defined]
    done, submitted = (int(x) for x in completed.split(" / "))
    assert submitted > 5 and done == submitted
    await shot(page, "3-simulator")


async def test_deploy_shows_on_the_live_view_and_rolls_back(ui: tuple[Running, object]) -> None:
    """Deploy after confirming the diff; the live view shows the new scheduler; roll back."""
    svc, page = ui
    await page.locator(".template[data-name=determinism-first] .template-load").click()  # type: ignore[attr-defined]
    await page.wait_for_function("document.querySelector('#yaml').value.includes('determinism')")  # type: ignore[attr-defined]
    await page.click("#deploy")  # type: ignore[attr-defined]
    dialog = page.locator("#deploy-dialog")  # type: ignore[attr-defined]
    await dialog.wait_for(state="visible", timeout=60_000)
    diff = await page.text_content("#deploy-diff")  # type: ignore[attr-defined]
    assert "+ scheduler:" in diff and "- function schedule(ctx)" in diff
    await shot(page, "4a-deploy-diff")
    await page.click("#deploy-confirm")  # type: ignore[attr-defined]
    active = page.locator("#active-scheduler")  # type: ignore[attr-defined]
    await page.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#active-scheduler').textContent === 'determinism-first.yaml'",
        timeout=15_000,
    )
    assert "version #1" in await page.text_content("#active-version")  # type: ignore[attr-defined]
    assert svc.server.orchestrator.active.name == "determinism-first.yaml"
    await shot(page, "4b-deployed")
    await page.click("#rollback")  # type: ignore[attr-defined]
    await page.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#active-scheduler').textContent === 'platform'", timeout=15_000
    )
    assert await active.text_content() == "platform"
    assert svc.server.orchestrator.active.name == "platform"
    await shot(page, "4c-rolled-back")


# Calls three built-ins; line 6 never runs on the sample (worker-1 is ready for job-1).
TRACED = """-- traced in the browser
function schedule(ctx)
  local job = ctx.get_job(ctx.queue[1].id)
  local worker = ctx.find_ready_worker(job.model_ref)
  if worker == nil then
    return {action = "wait", reason = "no ready worker"}
  end
  ctx.log_info("dispatching " .. job.id)
  return {action = "dispatch", job_id = job.id, worker_id = worker.id}
end
"""


async def test_trace_shows_lines_run_and_what_built_ins_returned(
    ui: tuple[Running, object],
) -> None:
    """A Lua policy traced on the sample: the lines that ran are highlighted with their
    counts, one that did not is plain; a built-in's chip shows what it returned; the
    decision is shown."""
    _, page = ui
    await page.set_input_files(  # type: ignore[attr-defined]
        "#import-file",
        files=[{"name": "traced.lua", "mimeType": "text/plain", "buffer": TRACED.encode()}],
    )
    await page.wait_for_function("document.querySelector('#lua').textContent.includes('traced in')")  # type: ignore[attr-defined]
    assert await page.input_value("#trace-context") == "sample"  # type: ignore[attr-defined]
    await page.click("#trace")  # type: ignore[attr-defined]
    await page.locator(".trace-line.ran").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    ran = page.locator(".trace-line.ran")  # type: ignore[attr-defined]
    assert [int(n) for n in await ran.locator(".trace-no").all_text_contents()] == [3, 4, 5, 8, 9]
    counts = await ran.locator(".trace-count").all_text_contents()
    assert all(re.fullmatch("\N{MULTIPLICATION SIGN}[1-9][0-9]*", c) for c in counts), counts
    skipped = page.locator('.trace-line[data-line="6"]')  # type: ignore[attr-defined]
    assert await skipped.get_attribute("class") == "trace-line"
    assert await skipped.locator(".trace-count").text_content() == ""
    assert "no ready worker" in await skipped.locator(".trace-text").text_content()
    chips = page.locator(".trace-chip")  # type: ignore[attr-defined]
    assert await chips.all_text_contents() == [
        "ctx.get_job",
        "ctx.find_ready_worker",
        "ctx.log_info",
    ]
    await page.locator('.trace-line[data-line="4"] .trace-chip').click()  # type: ignore[attr-defined]
    detail = page.locator("#trace-call")  # type: ignore[attr-defined]
    await detail.wait_for()
    assert "ctx.find_ready_worker" in await detail.locator("h3").text_content()
    assert "worker-1" in await detail.locator(".trace-returned").text_content()
    assert await detail.locator(".trace-args").text_content() != "(none)"
    decision = await page.text_content("#trace-decision")  # type: ignore[attr-defined]
    assert decision == "Decision: dispatch job-1 -> worker-1 (valid)"
    assert await page.get_attribute("#trace-decision", "class") == "ok"  # type: ignore[attr-defined]
    assert await page.locator("#trace-error").is_hidden()  # type: ignore[attr-defined]
    assert "dispatching job-1" in await page.text_content("#trace-logs")  # type: ignore[attr-defined]
    await shot(page, "5-trace")
