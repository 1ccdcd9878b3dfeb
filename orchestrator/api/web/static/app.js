// The scheduler builder: vanilla ES module, no build step. It talks to the admin
// HTTP/JSON mirror (/v2/admin/scheduler/*, the trace view's /trace among them) and the
// live event stream (/v2/admin/events).

const API = "/v2/admin/scheduler";
const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child));
  return node;
};

const state = {
  vocab: null,
  policy: { name: "my-policy", version: "", description: "", rules: [] },
  mode: "builder", // builder | yaml (YAML the builder cannot show) | lua (an imported Lua policy)
  yaml: "",
  lua: "",
  luaSource: "",
  fileName: "",
  errors: {}, // rule index -> message
  active: null,
};

// ------------------------------------------------------------------ API
function token() { return sessionStorage.getItem("orchestratord-token") || ""; }

async function api(path, body) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    $("#token-form").hidden = false;
    throw new Error("the admin API wants an operator API key: enter it above");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.data = data;
    throw error;
  }
  return data;
}

// ------------------------------------------------------------------ the builder
const FIELD_DEFAULT = "job.priority";

function fieldKind(field) {
  const [scope, name] = field.split(".");
  return state.vocab?.fields?.[scope]?.[name] || "string";
}

function fieldOptions(selected) {
  const options = [];
  for (const [scope, names] of Object.entries(state.vocab.fields)) {
    const group = el("optgroup", { label: scope });
    for (const name of Object.keys(names)) {
      const value = `${scope}.${name}`;
      group.append(el("option", { value, selected: value === selected }, value));
    }
    options.push(group);
  }
  return options;
}

function valueText(value) {
  if (Array.isArray(value)) return value.join(", ");
  if (value === null || value === undefined) return "";
  return String(value);
}

function parseValue(text, op, kind) {
  const one = (t) => {
    const s = t.trim();
    if (kind === "boolean" || s === "true" || s === "false") return s === "true";
    if (kind === "number" && s !== "" && !Number.isNaN(Number(s))) return Number(s);
    return s;
  };
  if (op === "exists") return text.trim() !== "false";
  if (op === "in" || op === "not_in") return text.split(",").map(one).filter((v) => v !== "");
  return one(text);
}

function testRow(rule, test, index) {
  const kind = fieldKind(test.field);
  const ops = state.vocab.operators[kind] || state.vocab.operators.string;
  const enumValues = state.vocab.enums[test.field];
  const value = el("input", {
    class: "test-value", value: valueText(test.value), "aria-label": "value",
    list: enumValues ? `enum-${test.field}` : null,
    placeholder: test.op === "exists" ? "true or false" : kind === "number" ? "number, 16GiB, 5s" : "value",
    oninput: (event) => { test.value = parseValue(event.target.value, test.op, kind); changed(); },
  });
  return el("div", { class: "test" },
    el("select", {
      class: "test-field", "aria-label": "field",
      onchange: (event) => { test.field = event.target.value; renderRules(); changed(); },
    }, fieldOptions(test.field)),
    el("select", {
      class: "test-op", "aria-label": "operator",
      onchange: (event) => {
        test.op = event.target.value;
        if (test.op === "exists") test.value = true;
        renderRules(); changed();
      },
    }, ops.map((op) => el("option", { value: op, selected: op === test.op }, op === "eq" ? "equals" : op))),
    value,
    enumValues ? el("datalist", { id: `enum-${test.field}` }, enumValues.map((v) => el("option", { value: v }))) : "",
    el("button", {
      type: "button", class: "test-remove", title: "remove this condition",
      onclick: () => { rule.tests.splice(index, 1); renderRules(); changed(); },
    }, "✕"),
  );
}

function actionEditor(rule) {
  const action = rule.action;
  const set = (key, value) => { action[key] = value; changed(); };
  const parts = [
    el("select", {
      class: "action-type", "aria-label": "action",
      onchange: (event) => { rule.action = { type: event.target.value }; renderRules(); changed(); },
    }, state.vocab.actions.map((a) => el("option", { value: a, selected: a === action.type },
      a === "use" ? "use platform scheduler" : a.replace("_", " ")))),
  ];
  if (action.type === "dispatch") {
    parts.push(
      el("select", { class: "action-selection", "aria-label": "worker selection",
        onchange: (event) => set("worker_selection", event.target.value || null) },
      el("option", { value: "" }, "any worker"),
      state.vocab.selections.map((s) => el("option", { value: s, selected: s === action.worker_selection,
        title: state.vocab.selection_help[s] }, s))),
      el("label", {}, el("input", { type: "checkbox", class: "action-model-match", checked: !!action.model_match,
        onchange: (event) => set("model_match", event.target.checked) }), " model must match"),
    );
  } else if (action.type === "wait") {
    parts.push(el("label", {}, "for ", el("input", { type: "number", class: "action-duration", min: 0,
      value: action.duration_ms ?? "", placeholder: "ms",
      oninput: (event) => set("duration_ms", event.target.value === "" ? null : Number(event.target.value)) }), " ms"));
  } else if (action.type === "evict") {
    parts.push(el("select", { class: "action-evict-policy", "aria-label": "eviction policy",
      onchange: (event) => set("policy", event.target.value) },
    state.vocab.evict_policies.map((p) => el("option", { value: p, selected: p === (action.policy || "lru") }, p))));
    if (!action.policy) action.policy = "lru";
  } else if (action.type === "start_worker") {
    parts.push(el("input", { class: "action-model", list: "models", placeholder: "the job's model",
      value: action.model || "", oninput: (event) => set("model", event.target.value || null) }));
  }
  return el("div", { class: "action" }, "→ ", parts);
}

let dragFrom = null;

function ruleCard(rule, index) {
  const error = state.errors[index];
  const card = el("li", {
    class: `rule${error ? " has-error" : ""}`, draggable: "true", "data-index": index,
    ondragstart: (event) => { dragFrom = index; card.classList.add("dragging"); event.dataTransfer.setData("text/plain", String(index)); },
    ondragend: () => card.classList.remove("dragging"),
    ondragover: (event) => { event.preventDefault(); card.classList.add("drop-target"); },
    ondragleave: () => card.classList.remove("drop-target"),
    ondrop: (event) => {
      event.preventDefault();
      card.classList.remove("drop-target");
      const from = dragFrom ?? Number(event.dataTransfer.getData("text/plain"));
      moveRule(from, index);
    },
  },
  el("div", { class: "rule-head" },
    el("span", { class: "handle", title: "drag to reorder" }, "⋮⋮"),
    el("input", { class: "rule-name", value: rule.name, "aria-label": "rule name",
      oninput: (event) => { rule.name = event.target.value; changed(); } }),
    el("label", {}, "priority ", el("input", { class: "rule-priority", type: "number", value: rule.priority ?? "",
      oninput: (event) => { rule.priority = event.target.value === "" ? null : Number(event.target.value); changed(); } })),
    el("button", { type: "button", class: "rule-up", title: "move up", onclick: () => moveRule(index, index - 1) }, "↑"),
    el("button", { type: "button", class: "rule-down", title: "move down", onclick: () => moveRule(index, index + 1) }, "↓"),
    el("button", { type: "button", class: "rule-remove", title: "remove rule",
      onclick: () => { state.policy.rules.splice(index, 1); state.errors = {}; renderRules(); changed(); } }, "✕"),
  ),
  el("div", { class: "tests" },
    rule.tests.length ? rule.tests.map((t, i) => testRow(rule, t, i)) : el("div", { class: "always" }, "always"),
    el("button", { type: "button", class: "add-test",
      onclick: () => { rule.tests.push({ field: FIELD_DEFAULT, op: "eq", value: "" }); renderRules(); changed(); } },
    "+ condition"),
  ),
  actionEditor(rule),
  error ? el("div", { class: "rule-error", role: "alert" }, error) : "",
  );
  return card;
}

function moveRule(from, to) {
  const rules = state.policy.rules;
  if (from === to || to < 0 || to >= rules.length || from < 0 || from >= rules.length) return;
  const [rule] = rules.splice(from, 1);
  rules.splice(to, 0, rule);
  state.errors = {};
  renderRules();
  changed();
}

function renderRules() {
  const list = $("#rules");
  list.replaceChildren(...state.policy.rules.map(ruleCard));
  $("#policy-name").value = state.policy.name || "";
  $("#policy-version").value = state.policy.version || "";
  const locked = state.mode !== "builder";
  for (const control of document.querySelectorAll("#builder-panel input, #builder-panel select, #builder-panel button:not(#new-policy):not(#export-yaml):not(#export-lua)")) {
    if (control.id !== "import-file") control.disabled = locked;
  }
  $("#builder-note").hidden = !locked;
  $("#builder-note").textContent = state.mode === "lua"
    ? "A Lua policy: the builder cannot show it. Edit it as code, or start a new policy."
    : state.builderReason || "";
}

function newRule() {
  const n = state.policy.rules.length + 1;
  return { name: `rule-${n}`, priority: null, tests: [], action: { type: "dispatch" } };
}

// ------------------------------------------------------------------ the code view
let compileTimer = null;
let editingYaml = false;

function changed() {
  clearTimeout(compileTimer);
  compileTimer = setTimeout(compileNow, 120);
}

async function compileNow() {
  if (state.mode === "lua") return;
  try {
    const reply = await api(`${API}/compile`, { policy: state.policy, name: fileName() });
    state.yaml = reply.yaml;
    state.lua = reply.lua;
    if (!editingYaml) $("#yaml").value = reply.yaml;
    showCodeError(reply.error);
    $("#lua").textContent = reply.lua || "(fix the error to see the Lua)";
  } catch (error) {
    showCodeError({ message: error.message });
  }
}

function showCodeError(error) {
  const note = $("#code-note");
  state.errors = {};
  if (error) {
    note.hidden = false;
    note.className = "note bad";
    note.textContent = error.message;
    if (error.rule !== null && error.rule !== undefined) state.errors[error.rule] = error.detail || error.message;
  } else if (state.mode === "yaml") {
    note.hidden = false;
    note.className = "note";
    note.textContent = `The builder cannot show this policy (${state.builderReason}); it is kept as YAML.`;
  } else {
    note.hidden = true;
  }
  for (const card of document.querySelectorAll(".rule")) {
    const index = Number(card.dataset.index);
    card.classList.toggle("has-error", index in state.errors);
    card.querySelector(".rule-error")?.remove();
    if (index in state.errors) card.append(el("div", { class: "rule-error", role: "alert" }, state.errors[index]));
  }
}

let parseTimer = null;

function yamlEdited() {
  editingYaml = true;
  clearTimeout(parseTimer);
  parseTimer = setTimeout(async () => {
    const source = $("#yaml").value;
    state.yaml = source;
    const reply = await api(`${API}/parse`, { source, name: fileName() });
    if (reply.error) {
      state.lua = "";
      $("#lua").textContent = "(fix the error to see the Lua)";
    } else {
      state.lua = reply.lua;
      $("#lua").textContent = reply.lua;
      if (reply.policy && !reply.unsupported) {
        state.mode = "builder";
        state.policy = reply.policy;
      } else {
        state.mode = "yaml";
        state.builderReason = reply.unsupported;
      }
      renderRules();
    }
    showCodeError(reply.error);
    editingYaml = false;
  }, 300);
}

function fileName() {
  return state.fileName || `${state.policy.name || "policy"}.yaml`;
}

function currentSource() {
  if (state.mode === "lua") return { source: state.luaSource, language: "lua", name: state.fileName || "policy.lua" };
  return { source: $("#yaml").value, language: "yaml", name: fileName() };
}

function showTab(which) {
  $("#yaml").hidden = which !== "yaml";
  $("#lua").hidden = which !== "lua";
  $("#tab-yaml").classList.toggle("selected", which === "yaml");
  $("#tab-lua").classList.toggle("selected", which === "lua");
}

async function loadYaml(text, name) {
  state.fileName = name || "";
  $("#yaml").value = text;
  editingYaml = false;
  const reply = await api(`${API}/parse`, { source: text, name: fileName() });
  state.yaml = text;
  if (reply.policy && !reply.unsupported) {
    state.mode = "builder";
    state.policy = reply.policy;
    renderRules();
    await compileNow();
  } else {
    state.mode = reply.error ? "builder" : "yaml";
    state.builderReason = reply.unsupported;
    state.lua = reply.lua || "";
    $("#lua").textContent = state.lua;
    renderRules();
    showCodeError(reply.error);
  }
}

function loadLua(text, name) {
  state.mode = "lua";
  state.luaSource = text;
  state.fileName = name;
  state.lua = text;
  $("#yaml").value = "";
  $("#lua").textContent = text;
  showTab("lua");
  renderRules();
}

// ------------------------------------------------------------------ templates, import, export
async function loadTemplates() {
  const { templates } = await api(`${API}/templates`);
  $("#templates").replaceChildren(...templates.map((t) => el("li", { class: "template", "data-name": t.name },
    el("strong", {}, t.name),
    el("button", { type: "button", class: "template-load", onclick: () => loadYaml(t.yaml, `${t.name}.yaml`) }, "Load YAML"),
    " ",
    el("button", { type: "button", class: "template-load-lua", onclick: () => loadLua(t.lua, `${t.name}.lua`) }, "Load Lua"),
    el("p", {}, t.description.replace(/`/g, "")))));
}

function download(name, text) {
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/plain" })), download: name });
  document.body.append(link);
  link.click();
  link.remove();
}

// ------------------------------------------------------------------ validate and deploy
function renderValidation(report) {
  const box = $("#validation");
  const rows = (report.semantics?.cases || []).map((c) => el("tr", {},
    el("td", { class: c.ok ? "ok" : "bad" }, c.ok ? "ok" : "FAIL"), el("td", {}, c.context),
    el("td", {}, c.ok ? describe(c.decision) : c.error), el("td", {}, `${c.latency_ms} ms`)));
  box.replaceChildren(
    el("p", { class: report.ok ? "ok" : "bad", id: "validation-summary" }, report.summary || (report.ok ? "valid" : "invalid")),
    rows.length ? el("table", { id: "bank" }, el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "context"),
      el("th", {}, "decision"), el("th", {}, "latency"))), el("tbody", {}, rows)) : "",
  );
  if (report.syntax && !report.syntax.ok) {
    const rule = report.syntax.rule;
    showCodeError({ message: report.syntax.error, detail: report.syntax.error, rule });
  }
}

function describe(decision) {
  if (!decision) return "";
  if (decision.action === "dispatch") return `dispatch ${decision.job_id} → ${decision.worker_id}`;
  if (decision.action === "batch") return `batch of ${decision.actions.length}`;
  if (decision.action === "start_worker") return `start ${decision.model_ref.split("/").pop()} on ${decision.pool_id}`;
  return decision.action + (decision.reason ? ` (${decision.reason})` : "");
}

async function validate() {
  const report = await api(`${API}/validate`, currentSource());
  renderValidation(report);
  return report;
}

function diffLines(before, after) {
  const a = before.split("\n"), b = after.split("\n");
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Int32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { out.push(["  ", a[i]]); i++; j++; }
    else if (j < m && (i >= n || lcs[i][j + 1] >= lcs[i + 1][j])) { out.push(["+ ", b[j]]); j++; }
    else { out.push(["- ", a[i]]); i++; }
  }
  return out;
}

async function deploy() {
  $("#deploy-status").textContent = "validating…";
  const report = await validate();
  if (!report.ok) { $("#deploy-status").textContent = "not deployed: the policy does not validate"; return; }
  const active = await api(`${API}/active`);
  const next = currentSource();
  $("#deploy-name").textContent = next.name;
  $("#deploy-summary").textContent = `${report.summary}. Active now: ${active.name}${active.version_id ? ` (#${active.version_id})` : ""}.`;
  $("#deploy-diff").replaceChildren(...diffLines(active.source, next.source).map(([mark, line]) =>
    el("div", { class: mark === "+ " ? "diff-add" : mark === "- " ? "diff-del" : "" }, mark + line)));
  $("#deploy-status").textContent = "";
  $("#deploy-dialog").showModal();
}

async function confirmDeploy() {
  $("#deploy-dialog").close();
  try {
    const reply = await api(`${API}/deploy`, { ...currentSource(), deployer: "web" });
    $("#deploy-status").textContent = `deployed as version #${reply.version.id}`;
  } catch (error) {
    $("#deploy-status").textContent = `not deployed: ${error.message}`;
  }
  await loadVersions();
}

async function rollback(version) {
  const reply = await api(`${API}/rollback`, version ? { version } : {});
  $("#deploy-status").textContent = reply.version ? `rolled back to #${reply.version.id}` : "rolled back to the platform scheduler";
  await loadVersions();
}

async function loadVersions() {
  const { versions } = await api(`${API}/versions`);
  $("#versions tbody").replaceChildren(...versions.map((v) => el("tr", { class: v.active ? "active-version" : "" },
    el("td", {}, `#${v.id}`, v.active ? " ✓" : ""), el("td", {}, v.name), el("td", {}, v.version || "-"),
    el("td", {}, v.deployer), el("td", {}, new Date(v.deployed_at_ms).toLocaleString()), el("td", {}, v.reason),
    el("td", {}, v.active ? "active" : el("button", { type: "button", class: "rollback", "data-version": v.id,
      disabled: !!state.vocab.deploy_disabled, onclick: () => rollback(v.id) }, "Roll back to this")))));
}

// ------------------------------------------------------------------ the trace view
// The policy in the editor run once on a bank context in a diagnostics sandbox
// (POST /trace): its Lua with the lines that ran highlighted and counted, a chip for
// each built-in a line called, and what a clicked call was given and returned.
// Every text here comes from the script: it is set as text, never as HTML.
const ms = (value) => Number(value ?? 0).toFixed(3);

async function loadTraceOptions() {
  const { contexts, default_context: chosen } = await api(`${API}/trace`);
  $("#trace-context").replaceChildren(...contexts.map((c) => el("option", { value: c, selected: c === chosen }, c)));
}

async function runTrace() {
  const status = $("#trace-status");
  $("#trace").disabled = true;
  status.className = "muted";
  status.textContent = "tracing…";
  const context = $("#trace-context").value;
  try {
    const reply = await api(`${API}/trace`, { ...currentSource(), context, mode: $("#trace-mode").value });
    renderTrace(reply, context);
    status.textContent = "";
  } catch (error) {
    $("#trace-result").hidden = true;
    status.className = "bad";
    status.textContent = `not traced: ${error.message}`;
  } finally {
    $("#trace").disabled = false;
  }
}

function renderTrace(t, context) {
  $("#trace-result").hidden = false;
  const decision = $("#trace-decision");
  decision.className = t.decision && t.valid ? "ok" : "bad";
  decision.textContent = !t.decision ? "No decision: the script failed."
    : `Decision: ${t.decision_text}${t.valid ? " (valid)" : ` (invalid: ${t.invalid_reason})`}`;
  const instrumented = t.instrumented_ms ? `; ${ms(t.instrumented_ms)} ms ${t.mode === "profile" ? "profiled" : "traced"}` : "";
  $("#trace-timing").textContent = !t.plain_ms ? `On ${context}.`
    : `On ${context}: ${ms(t.plain_ms)} ms uninstrumented, ${t.met_deadline ? "within" : "over"} the ${t.deadline_ms} ms deadline`
      + `${instrumented}${t.overhead ? ` (${t.overhead}× slower)` : ""}.`;
  $("#trace-error").hidden = !t.error;
  $("#trace-error-message").textContent = t.error ? `${t.error.kind}: ${t.error.message}` : "";
  $("#trace-traceback").textContent = (t.error?.traceback || "").replace(t.error?.message ?? "", "").trim();
  const dropped = [
    t.steps_dropped ? `the order of the last ${t.steps_dropped} steps was not kept (their lines are still counted)` : "",
    t.calls_dropped ? `${t.calls_dropped} more built-in calls were not recorded` : "",
  ].filter(Boolean);
  $("#trace-dropped").hidden = !dropped.length;
  $("#trace-dropped").textContent = `The trace is bounded: ${dropped.join("; ")}.`;
  const code = $("#trace-code");
  code.replaceChildren(...traceLines(t));
  code.scrollTop = Math.max(0, ($(".trace-line.ran", code)?.offsetTop ?? 0) - 40); // the first line that ran
  $("#trace-call").hidden = true;
  $("#trace-logs").replaceChildren(...(t.logs.length ? t.logs : [{ level: "", message: "none" }]).map((entry) =>
    el("li", { class: entry.level === "error" ? "bad" : "" }, entry.level ? `${entry.level}: ${entry.message}` : entry.message)));
}

// One row per line of the Lua: its number, how often it ran (blank: never), in profile
// mode the time spent in it, its text, and a chip per built-in it called.
function traceLines(t) {
  const ran = new Map(t.lines.map((line) => [line.line, line]));
  const calls = new Map();
  for (const call of t.calls) {
    if (!calls.has(call.line)) calls.set(call.line, new Map());
    const byName = calls.get(call.line);
    if (!byName.has(call.name)) byName.set(call.name, []);
    byName.get(call.name).push(call);
  }
  const texts = (t.lua || "").replace(/\n$/, "").split("\n");
  return texts.map((text, i) => {
    const number = i + 1;
    const hit = ran.get(number);
    return el("div", { class: hit ? "trace-line ran" : "trace-line", role: "row", "data-line": number },
      el("span", { class: "trace-no", role: "cell" }, number),
      el("span", { class: "trace-count", role: "cell", title: hit ? `ran ${hit.count} times` : "never ran" }, hit ? `×${hit.count}` : ""),
      t.mode === "profile" ? el("span", { class: "trace-ms", role: "cell" }, hit ? `${ms(hit.self_ms)} ms` : "") : "",
      el("span", { class: "trace-text", role: "cell" }, text),
      el("span", { class: "trace-calls", role: "cell" }, [...(calls.get(number)?.values() || [])].map(callChip)));
  });
}

// The calls of one built-in on one line (a loop's are many): one chip, stepped through.
function callChip(group) {
  const chip = el("button", {
    type: "button", class: `trace-chip${group.some((c) => c.raised) ? " raised" : ""}`, "data-call": group[0].name,
    title: "show what it was given and returned", onclick: () => showCall(chip, group, 0),
  }, `ctx.${group[0].name}`, group.length > 1 ? ` ×${group.length}` : "");
  return chip;
}

function showCall(chip, group, index) {
  const call = group[index];
  for (const selected of document.querySelectorAll(".trace-chip.selected")) selected.classList.remove("selected");
  chip.classList.add("selected");
  const box = $("#trace-call");
  box.hidden = false;
  box.replaceChildren(
    el("h3", {}, `ctx.${call.name}`, el("span", { class: "muted" }, ` line ${call.line}, step ${call.step}, ${ms(call.ms)} ms`)),
    group.length > 1 ? el("div", { class: "tools" },
      el("button", { type: "button", class: "trace-previous", disabled: index === 0,
        onclick: () => showCall(chip, group, index - 1) }, "‹"),
      el("span", {}, `call ${index + 1} of ${group.length} on this line`),
      el("button", { type: "button", class: "trace-next", disabled: index === group.length - 1,
        onclick: () => showCall(chip, group, index + 1) }, "›")) : "",
    el("div", { class: "muted" }, "arguments"),
    el("pre", { class: "trace-args" }, call.args || "(none)"),
    el("div", { class: call.raised ? "bad" : "muted" }, call.raised ? "raised" : "returned"),
    el("pre", { class: "trace-returned" }, call.result),
  );
}

// ------------------------------------------------------------------ the simulator
function chart(title, series, { xlabel = "", ylabel = "", xlog = false } = {}) {
  const W = 360, H = 200, L = 42, R = 8, T = 18, B = 28;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("data-title", title);
  const all = series.flatMap((s) => s.points);
  const fx = (x) => (xlog ? Math.log10(Math.max(x, 1)) : x);
  const xs = all.map((p) => fx(p[0])), ys = all.map((p) => p[1]);
  const x0 = Math.min(0, ...xs), x1 = Math.max(1e-9, ...xs), y1 = Math.max(1e-9, ...ys);
  const px = (x) => L + ((fx(x) - x0) / (x1 - x0 || 1)) * (W - L - R);
  const py = (y) => H - B - (y / y1) * (H - T - B);
  const svgEl = (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  svgEl("text", { x: L, y: 12, class: "title" }, title);
  svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" });
  svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" });
  svgEl("text", { x: 2, y: T + 8 }, y1 >= 100 ? y1.toFixed(0) : y1.toFixed(2));
  svgEl("text", { x: W - R - 60, y: H - 6 }, xlabel);
  svgEl("text", { x: 2, y: H - B }, ylabel);
  const colors = ["#2457c5", "#e07b00", "#067647"];
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, k) => `${k ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    svgEl("path", { d, fill: "none", stroke: colors[i % 3], "stroke-width": 1.6, "data-series": s.label });
    svgEl("text", { x: W - R - 120, y: T + 12 + i * 12, fill: colors[i % 3] }, s.label);
  });
  return svg;
}

async function simulate() {
  const workload = {
    rate: Number($("#sim-rate").value), duration_s: Number($("#sim-duration").value),
    pools: Number($("#sim-pools").value), workers_per_pool: Number($("#sim-workers").value),
    interactive: Number($("#sim-interactive").value), seed: Number($("#sim-seed").value),
  };
  const draft = currentSource();
  $("#sim-progress").textContent = "simulating…";
  $("#simulate").disabled = true;
  try {
    const { reports } = await api(`${API}/simulate`, {
      ...draft, source: state.mode === "builder" && !state.lua ? "" : draft.source,
      workload, compare_active: $("#sim-compare").checked,
    });
    renderSimulation(reports);
    $("#sim-progress").textContent = `done: ${reports.map((r) => `${r.policy} in ${r.wall_s}s`).join(", ")}`;
  } catch (error) {
    $("#sim-progress").textContent = `simulation failed: ${error.message}`;
  } finally {
    $("#simulate").disabled = false;
  }
}

// How a simulation ended and what it left, by reason (sim/report.py, `unfinished`).
const UNFINISHED = {
  not_arrived: "not arrived", queued_no_worker: "queued, no worker for its model",
  queued_no_slot: "queued, no free slot", queued_policy_waited: "queued, the policy waited",
  queued_scheduler_failed: "queued, the scheduler failed",
  queued_not_decided: "queued, the cycle budget ran out", running: "running",
};
function unfinishedText(u) {
  if (!u || !u.count) return "none";
  const reasons = Object.entries(u.by_reason).map(([k, n]) => `${UNFINISHED[k] || k} ${n}`).join(", ");
  return `${u.count} (${u.stopped === "drain_limit" ? "drain limit" : u.stopped}): ${reasons}`;
}

function renderSimulation(reports) {
  const rows = [
    ["jobs completed / submitted", (r) => `${r.jobs_completed} / ${r.jobs_submitted}`],
    ["throughput (jobs/s)", (r) => r.throughput_jobs_per_s.toFixed(3)],
    ["wait p50 / p95 / p99 (ms)", (r) => ["p50", "p95", "p99"].map((q) => r.wait_ms.all[q].toFixed(0)).join(" / ")],
    ["end-to-end p99 (ms)", (r) => r.end_to_end_ms.all.p99.toFixed(0)],
    ["TTFT p50 / p90 / p99 (ms)", (r) => (r.ttft_ms?.all?.count
      ? ["p50", "p90", "p99"].map((q) => r.ttft_ms.all[q].toFixed(0)).join(" / ") : "-")],
    ["TPOT p50 / p99 (ms)", (r) => (r.tpot_ms?.all?.count
      ? ["p50", "p99"].map((q) => r.tpot_ms.all[q].toFixed(1)).join(" / ") : "-")],
    ["prefix-cache hit rate", (r) => `${((r.prefix_cache?.hit_rate || 0) * 100).toFixed(1)}%`],
    ["output tokens/s per GPU", (r) => (r.output_tokens_per_s_per_gpu?.mean ?? 0).toFixed(1)],
    ["unfinished", (r) => unfinishedText(r.unfinished)],
    ["worker starts / evictions", (r) => `${r.worker_starts} / ${r.worker_evictions}`],
    ["fallbacks (timeouts)", (r) => `${r.fallbacks} (${r.timeouts})`],
    ["decision latency p50 / p99 (ms)", (r) => `${r.decision_latency_ms.p50} / ${r.decision_latency_ms.p99}`],
  ];
  const table = el("table", { id: "sim-table" },
    el("thead", {}, el("tr", {}, el("th", {}, ""), reports.map((r) => el("th", {}, r.policy)))),
    el("tbody", {}, rows.map(([label, fn]) => el("tr", {}, el("th", {}, label), reports.map((r) => el("td", {}, fn(r)))))));
  const charts = el("div", { class: "charts" },
    chart("Queue depth", reports.map((r) => ({ label: r.policy, points: r.series.queue_depth.map(([t, v]) => [t / 1000, v]) })),
      { xlabel: "simulated s" }),
    chart("Wait CDF", reports.map((r) => ({ label: r.policy, points: r.cdf_ms.wait.map((v, i) => [v / 1000, (i + 1) / 100]) })),
      { xlabel: "wait s" }),
    chart("VRAM allocated", reports.map((r) => ({ label: r.policy, points: r.series.vram_utilization.map(([t, v]) => [t / 1000, v * 100]) })),
      { xlabel: "simulated s", ylabel: "%" }));
  $("#sim-results").replaceChildren(table, charts);
}

// ------------------------------------------------------------------ the live view
function liveView() {
  const url = `/v2/admin/events${token() ? `?token=${encodeURIComponent(token())}` : ""}`;
  const source = new EventSource(url);
  source.addEventListener("state", (event) => renderLive(JSON.parse(event.data)));
  source.onopen = () => $("#live-dot").classList.add("on");
  source.onerror = () => $("#live-dot").classList.remove("on");
}

// One worker: its slots in use ("3/8 slots": a batched server runs several jobs at
// once) and the first few jobs it runs.
const JOBS_SHOWN = 3;
function workerLine(w) {
  const model = w.model.split("/").pop().split("@")[0];
  const jobs = w.active_job_ids.slice(0, JOBS_SHOWN).map((id) => id.slice(0, 12)).join(", ");
  const more = w.active_job_ids.length > JOBS_SHOWN ? ` +${w.active_job_ids.length - JOBS_SHOWN}` : "";
  return `${w.id} ${w.status} ${model} ${w.slots_busy}/${w.slots_total} slots${jobs ? ` running ${jobs}${more}` : ""}`;
}

function renderLive(live) {
  const s = live.status;
  state.active = s.scheduler;
  $("#active-scheduler").textContent = s.scheduler.name;
  $("#active-version").textContent = s.scheduler.version_id ? `version #${s.scheduler.version_id}${s.scheduler.version ? ` (${s.scheduler.version})` : ""}` : "built in";
  $("#deployment-mode").textContent = `${s.deployment_mode} mode, ${s.cycles} cycles, ${s.fallbacks} fallbacks`;
  $("#live-depth").textContent = `(${live.queue_depth})`;
  $("#live-queue tbody").replaceChildren(...live.queue.slice(0, 20).map((j) => el("tr", {},
    el("td", {}, j.id.slice(0, 16)), el("td", {}, j.priority), el("td", {}, j.model.split("/").pop().split("@")[0]),
    el("td", {}, j.tenant || "-"), el("td", {}, `${(j.wait_ms / 1000).toFixed(1)} s`))));
  $("#live-pools").replaceChildren(...live.pools.map((p) => el("div", { class: "pool" },
    el("strong", {}, p.id), ` ${p.status}`,
    p.gpus.map((g) => el("div", {}, `GPU ${g.id} ${g.name}${g.measured ? "" : " (declared)"}: ${(g.vram_used / 2 ** 30).toFixed(1)} / ${(g.vram_total / 2 ** 30).toFixed(0)} GiB, ${g.util.toFixed(0)}%`,
      el("div", { class: "bar" }, el("span", { style: `width:${(100 * g.vram_used / Math.max(1, g.vram_total)).toFixed(1)}%` })))),
    p.workers.map((w) => el("div", { class: "muted" }, workerLine(w))))));
  $("#live-decisions tbody").replaceChildren(...live.decisions.map((d) => el("tr", {},
    el("td", {}, d.seq), el("td", { class: d.error ? "bad" : "" }, d.source + (d.error ? ` (${d.error})` : "")),
    el("td", {}, d.decision), el("td", {}, `${d.latency_ms} ms`))));
}

// ------------------------------------------------------------------ start
async function start() {
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("orchestratord-token", $("#token").value);
    location.reload();
  });
  try {
    state.vocab = await api(`${API}/vocabulary`);
  } catch (error) {
    $("#builder-note").hidden = false;
    $("#builder-note").textContent = error.message;
    return;
  }
  document.body.append(el("datalist", { id: "models" }, state.vocab.models.map((m) => el("option", { value: m }))));
  if (state.vocab.deploy_disabled) {
    for (const id of ["#deploy", "#rollback"]) $(id).disabled = true;
    $("#deploy-disabled").hidden = false;
    $("#deploy-disabled").textContent = `Deploy is unavailable: ${state.vocab.deploy_disabled}.`;
  }
  $("#add-rule").addEventListener("click", () => { state.policy.rules.push(newRule()); renderRules(); changed(); });
  $("#new-policy").addEventListener("click", () => {
    state.mode = "builder"; state.fileName = ""; state.policy = { name: "my-policy", version: "", description: "", rules: [] };
    renderRules(); changed(); showTab("yaml");
  });
  $("#policy-name").addEventListener("input", (event) => { state.policy.name = event.target.value; changed(); });
  $("#policy-version").addEventListener("input", (event) => { state.policy.version = event.target.value; changed(); });
  $("#yaml").addEventListener("input", yamlEdited);
  $("#tab-yaml").addEventListener("click", () => showTab("yaml"));
  $("#tab-lua").addEventListener("click", () => showTab("lua"));
  $("#validate").addEventListener("click", () => validate().catch((e) => { $("#validation").textContent = e.message; }));
  $("#deploy").addEventListener("click", () => deploy().catch((e) => { $("#deploy-status").textContent = e.message; }));
  $("#deploy-confirm").addEventListener("click", confirmDeploy);
  $("#deploy-cancel").addEventListener("click", () => $("#deploy-dialog").close());
  $("#rollback").addEventListener("click", () => rollback(0));
  $("#simulate").addEventListener("click", simulate);
  $("#trace").addEventListener("click", runTrace);
  $("#export-yaml").addEventListener("click", () => download(fileName(), $("#yaml").value));
  $("#export-lua").addEventListener("click", () => download(fileName().replace(/\.ya?ml$/, ".lua"), state.mode === "lua" ? state.luaSource : state.lua));
  $("#import-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    const text = await file.text();
    if (file.name.endsWith(".lua")) loadLua(text, file.name); else await loadYaml(text, file.name);
    event.target.value = "";
  });
  renderRules();
  await compileNow();
  await Promise.all([loadTemplates(), loadVersions(), loadTraceOptions()]);
  liveView();
  document.body.dataset.ready = "true";
}

start();
