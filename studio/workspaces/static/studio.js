// Spark Studio UI: polls server-rendered fragments for live state and sends actions to the JSON API.
// $, api, flash, formError and toggleForm come from common.js, loaded before this.
"use strict";

// -- live parts -------------------------------------------------------------------------------

const live = [...document.querySelectorAll("[data-src]")];

async function refresh(element, force = false) {
  // Leave a part alone while the user works in it (an open select would close under them).
  if (!force && element.contains(document.activeElement) && document.activeElement !== document.body) return;
  try {
    const response = await fetch(element.dataset.src, { headers: { Accept: "text/html" } });
    if (!response.ok) return;
    const html = await response.text();
    if (html !== element.dataset.last) {
      element.innerHTML = html;
      element.dataset.last = html;
    }
  } catch (_) { /* the server is restarting; try again on the next tick */ }
}

function refreshAll(force = true) { return Promise.all(live.map((element) => refresh(element, force))); }

for (const element of live) {
  setInterval(() => { if (!document.hidden) refresh(element); }, Number(element.dataset.interval || 3000));
}

// -- forms ------------------------------------------------------------------------------------

const createForm = $("#create-form");
const newWorkspace = $("#new-workspace");
newWorkspace.addEventListener("click", async () => {
  toggleForm(newWorkspace, createForm, createForm.hidden);
  if (!createForm.hidden) await fillComputeOptions($("select[name=compute]", createForm));
});
$("[data-cancel]", createForm).addEventListener("click", () => toggleForm(newWorkspace, createForm, false));

async function fillComputeOptions(select) {
  try {
    const { computes } = await api("GET", "/api/computes?check=false");
    const current = select.value;
    select.replaceChildren(
      ...computes.map((c) => new Option(c.name, c.name)),
      new Option("none (attach later)", ""),
    );
    const names = computes.map((c) => c.name);
    select.value = names.includes(current) ? current : (names.includes("local") ? "local" : (names[0] || ""));
  } catch (_) { /* keep the options the page came with */ }
}

createForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(createForm);
  const body = {
    name: data.get("name").trim(),
    description: data.get("description").trim(),
    start: data.get("start") === "on",
  };
  if (data.get("repository_url").trim()) body.repository_url = data.get("repository_url").trim();
  if (data.get("compute")) body.compute = data.get("compute");
  const submit = $("button[type=submit]", createForm);
  submit.disabled = true;
  formError(createForm, "");
  try {
    const workspace = await api("POST", "/api/workspaces", body);
    createForm.reset();
    toggleForm(newWorkspace, createForm, false);
    if (workspace.state === "Failed") flash(`Workspace ${workspace.name} was created but failed: ${workspace.reason}`);
    else flash(`Workspace ${workspace.name} created${body.start ? " and starting" : ""}; notebooks in ${workspace.folder}.`, "info");
  } catch (error) {
    formError(createForm, error.message);
  } finally {
    submit.disabled = false;
    await refreshAll();
  }
});

// "ana, bo" -> ["ana", "bo"]
function userNames(text) {
  return (text || "").split(/[\s,]+/).map((name) => name.trim()).filter(Boolean);
}

// Only admins register computes: the form is on the page for them only.
const computeForm = $("#compute-form");
const newCompute = $("#new-compute");
if (computeForm && newCompute) {
  newCompute.addEventListener("click", () => toggleForm(newCompute, computeForm, computeForm.hidden));
  $("[data-cancel]", computeForm).addEventListener("click", () => toggleForm(newCompute, computeForm, false));
  computeForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(computeForm);
    const submit = $("button[type=submit]", computeForm);
    submit.disabled = true;
    formError(computeForm, "");
    try {
      const body = { name: data.get("name").trim(), url: data.get("url").trim() };
      if (data.get("token")) body.token = data.get("token");
      if (data.get("username").trim()) body.username = data.get("username").trim();
      const allowed = userNames(data.get("allowed_users"));
      if (allowed.length) body.allowed_users = allowed;
      const compute = await api("POST", "/api/computes", body);
      computeForm.reset();
      toggleForm(newCompute, computeForm, false);
      flash(`Compute ${compute.name} registered.`, "info");
    } catch (error) {
      formError(computeForm, error.message);
    } finally {
      submit.disabled = false;
      await refreshAll();
    }
  });
}

const executionForm = $("#execution-form");
const newExecution = $("#new-execution");
newExecution.addEventListener("click", async () => {
  toggleForm(newExecution, executionForm, executionForm.hidden);
  if (executionForm.hidden) return;
  const select = $("select[name=workspace]", executionForm);
  try {  // workspaces created since the page loaded
    const { workspaces } = await api("GET", "/api/workspaces");
    const current = select.value;
    select.replaceChildren(...workspaces.map((w) => new Option(w.name, w.name)));
    if (workspaces.some((w) => w.name === current)) select.value = current;
  } catch (_) { /* keep the options the page came with */ }
});
$("[data-cancel]", executionForm).addEventListener("click", () => toggleForm(newExecution, executionForm, false));
executionForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(executionForm);
  const body = { workspace: data.get("workspace"), notebook: data.get("notebook").trim() };
  if (data.get("compute")) body.compute = data.get("compute");
  const submit = $("button[type=submit]", executionForm);
  formError(executionForm, "");
  const text = data.get("parameters").trim();
  if (text) {
    try { body.parameters = JSON.parse(text); } catch (error) {
      formError(executionForm, `Parameters are not JSON: ${error.message}`);
      return;
    }
  }
  submit.disabled = true;
  try {
    const execution = await api("POST", "/api/executions", body);
    toggleForm(newExecution, executionForm, false);
    flash(`Execution ${execution.id} of ${execution.notebook} queued on ${execution.compute}.`, "info");
  } catch (error) {
    formError(executionForm, error.message);
  } finally {
    submit.disabled = false;
    await refreshAll();
  }
});

// -- delete dialog ----------------------------------------------------------------------------

const dialog = $("#delete-dialog");
let deleting = null;

function describeFiles() {
  const remove = $("input[name=remove_files]", dialog).checked;
  const note = $(".files-note", dialog);
  note.classList.toggle("remove", remove);
  note.textContent = remove
    ? `Its folder ${deleting.folder} and every notebook in it will be deleted for good.`
    : `Its notebook files are kept in ${deleting.folder}; a new workspace with the same name picks them up again.`;
}

function openDeleteDialog(row) {
  deleting = { id: row.dataset.id, name: row.dataset.name, state: row.dataset.state, folder: row.dataset.folder };
  const running = !["Idle", "Failed"].includes(deleting.state);
  $("[data-field=name]", dialog).textContent = deleting.name;
  $("[data-field=state]", dialog).textContent = deleting.state;
  $(".running-note", dialog).hidden = !running;
  $("input[name=force]", dialog).checked = false;
  $("input[name=remove_files]", dialog).checked = false;
  formError(dialog, "");
  describeFiles();
  dialog.showModal();
}

$("input[name=remove_files]", dialog).addEventListener("change", describeFiles);
$("[data-close]", dialog).addEventListener("click", () => dialog.close());
$("[data-confirm-delete]", dialog).addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const params = new URLSearchParams({
    remove_files: String($("input[name=remove_files]", dialog).checked),
    force: String($("input[name=force]", dialog).checked),
  });
  button.disabled = true;
  formError(dialog, "");
  try {
    const result = await api("DELETE", `/api/workspaces/${deleting.id}?${params}`);
    dialog.close();
    flash(result.files === "removed"
      ? `Workspace ${result.name} deleted with its files.`
      : `Workspace ${result.name} deleted; its files are kept in ${result.folder}.`, "info");
  } catch (error) {
    formError(dialog, error.message);
  } finally {
    button.disabled = false;
    await refreshAll();
  }
});

// -- share dialog -----------------------------------------------------------------------------

const shareDialog = $("#share-dialog");
let sharing = null;

function openShareDialog(row) {
  sharing = { id: row.dataset.id, name: row.dataset.name };
  $("[data-field=name]", shareDialog).textContent = row.dataset.name;
  $("[data-field=owner]", shareDialog).textContent = row.dataset.owner || "nobody";
  $("input[name=collaborators]", shareDialog).value = userNames(row.dataset.collaborators).join(", ");
  formError(shareDialog, "");
  shareDialog.showModal();
}

$("[data-close]", shareDialog).addEventListener("click", () => shareDialog.close());
$("[data-confirm-share]", shareDialog).addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const collaborators = userNames($("input[name=collaborators]", shareDialog).value);
  button.disabled = true;
  formError(shareDialog, "");
  try {
    const workspace = await api("PUT", `/api/workspaces/${sharing.id}/collaborators`, { collaborators });
    shareDialog.close();
    flash(workspace.collaborators.length
      ? `Workspace ${workspace.name} is shared with ${workspace.collaborators.join(", ")}.`
      : `Workspace ${workspace.name} is shared with nobody.`, "info");
  } catch (error) {
    formError(shareDialog, error.message);
  } finally {
    button.disabled = false;
    await refreshAll();
  }
});

// -- row actions ------------------------------------------------------------------------------

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, id } = button.dataset;
  if (action === "delete") { openDeleteDialog(button.closest("tr")); return; }
  if (action === "share") { openShareDialog(button.closest("tr")); return; }
  button.disabled = true;
  try {
    if (action === "start") await api("POST", `/api/workspaces/${id}/start`);
    else if (action === "stop") await api("POST", `/api/workspaces/${id}/stop`);
    else if (action === "stop-execution") await api("POST", `/api/executions/${id}/stop`);
    else if (action === "remove-compute") {
      const name = button.dataset.name;
      if (!confirm(`Remove compute ${name}? Workspaces attached to it must be detached first.`)) return;
      await api("DELETE", `/api/computes/${encodeURIComponent(name)}`);
      flash(`Compute ${name} removed.`, "info");
    }
  } catch (error) {
    flash(error.message);
  } finally {
    button.disabled = false;
    await refreshAll();
  }
});

document.addEventListener("change", async (event) => {
  const select = event.target.closest("select[data-action=attach]");
  if (!select) return;
  const id = select.dataset.id;
  select.disabled = true;
  try {
    if (select.value) await api("POST", `/api/workspaces/${id}/attach`, { compute: select.value });
    else await api("POST", `/api/workspaces/${id}/detach`);
  } catch (error) {
    flash(error.message);
  } finally {
    select.blur();
    await refreshAll();
  }
});
