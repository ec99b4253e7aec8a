// Spark Studio: the Applications page. Polls GET /api/applications and builds the rows with
// textContent only (application and job run names come from users: data is never parsed as HTML).
// Admins get Start/Stop, which go to POST /api/applications/{name}/start|stop and show the
// service's own {"msg"} when refused. $, api and flash come from common.js, loaded before this.
"use strict";

const rows = $("#application-rows");
const isAdmin = $("#applications").dataset.admin === "true";
const loadError = $("[data-role=load-error]");
const BUSY = new Set(["CREATING", "STARTING", "STOPPING"]);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);  // strings become text nodes
  }
  return node;
}

// Only lowercase letters in a class name: a state is the service's word, never markup.
function stateClass(prefix, state) {
  return `${prefix}-${String(state || "").toLowerCase().replace(/[^a-z]/g, "")}`;
}

function when(value) {
  if (value === null || value === undefined || value === "") return "";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function figure(value) { return value === null || value === undefined ? "–" : String(value); }

function capacityCell(app) {
  const c = app.capacitySummary || {};
  return el("td", { className: "capacity", dataset: { role: "capacity" } },
    el("div", { text: `warm ${figure(c.warm)}` }),
    el("div", { text: `used ${figure(c.drivers)} of ${c.maxDrivers === null || c.maxDrivers === undefined ? "no limit" : c.maxDrivers}` }),
    el("div", { className: "muted small", text: `${figure(c.sessions)} sessions, ${figure(c.jobRuns)} job runs` }),
  );
}

function runsCell(app) {
  const runs = app.recentJobRuns || [];
  if (!runs.length) return el("td", { className: "muted small", text: "none" });
  const list = el("ul", { className: "runs" });
  for (const run of runs) {
    list.append(el("li", {},
      el("span", { className: `badge ${stateClass("run", run.state)}`, text: run.state || "?" }), " ",
      el("span", { text: run.name || `#${run.id || run.jobRunId || "?"}` }), " ",
      el("span", { className: "muted small", text: `${when(run.createdAt)}${run.updatedAt ? ` → ${when(run.updatedAt)}` : ""}` }),
    ));
  }
  return el("td", {}, list);
}

function actionsCell(app) {
  const cell = el("td", { className: "actions" });
  if (!isAdmin) return cell;
  const state = app.state;
  if (["CREATED", "STOPPED"].includes(state)) {
    cell.append(el("button", { type: "button", className: "btn small", dataset: { action: "start", name: app.name } }, "Start"));
  }
  if (["STARTED", "STARTING"].includes(state)) {
    cell.append(el("button", { type: "button", className: "btn small danger-outline", dataset: { action: "stop", name: app.name } }, "Stop"));
  }
  return cell;
}

function row(app) {
  const name = el("td", { className: "app-name" },
    el("strong", { text: app.name || "?" }),
    el("div", { className: "muted small", text: app.applicationId || "" }),
    app.compute ? el("div", { className: "muted small", text: `compute ${app.compute}` }) : null,
  );
  const state = el("td", {},
    el("span", {
      className: `badge ${stateClass("app", app.state)}${BUSY.has(app.state) ? " busy" : ""}`,
      dataset: { role: "state" },
      text: app.state || "?",
    }),
    el("div", { className: "muted small", dataset: { role: "details" }, text: app.stateDetails || "" }),
  );
  const endpoint = el("td", {},
    el("code", { className: "small", text: app.livyEndpoint || "" }),
    // Shared-driver applications: how a Spark Connect client reaches the user's own driver.
    app.sparkConnect ? el("div", { className: "small", dataset: { role: "spark-connect" } },
      el("span", { className: "muted", text: "Spark Connect: " }), el("code", { text: app.sparkConnect })) : null,
  );
  return el("tr", { className: "app-row", dataset: { name: app.name || "" } },
    name, state, capacityCell(app), endpoint, runsCell(app), actionsCell(app));
}

async function load() {
  try {
    const data = await api("GET", "/api/applications");
    const apps = data.applications || [];
    if (!apps.length) rows.replaceChildren(el("tr", {}, el("td", { colspan: "6", className: "muted", text: "No applications." })));
    else rows.replaceChildren(...apps.map(row));
    loadError.hidden = true;
  } catch (error) {
    loadError.textContent = error.message;
    loadError.hidden = false;
  }
}

rows.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, name } = button.dataset;
  button.disabled = true;
  try {
    await api("POST", `/api/applications/${encodeURIComponent(name)}/${action}`);
    flash(`Application ${name}: ${action === "start" ? "starting" : "stopping"}.`, "info");
  } catch (error) {
    flash(error.message);
  } finally {
    await load();
  }
});

load();
setInterval(() => { if (!document.hidden) load(); }, Number(rows.dataset.interval || 3000));
