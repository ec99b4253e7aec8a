// Spark Studio: the Users page (admins) and the Tokens page (everyone). Lists are server-rendered
// fragments (/ui/users, /ui/tokens); actions go to the JSON API (same origin, JSON bodies) and show
// its own {"msg"} when refused. A new token or password is shown once, in the secret panel, and
// only ever put into an input's value (never into HTML). $, api, flash, formError and toggleForm
// come from common.js, loaded before this.
"use strict";

async function refreshRows() {
  const rows = $("[data-src]");
  if (!rows) return;
  const response = await fetch(rows.dataset.src, { headers: { Accept: "text/html" } });
  if (response.ok) rows.innerHTML = await response.text();
}

// -- the secret panel: shown once --------------------------------------------------------------

const secretPanel = $("#secret-panel");
function showSecret(title, secret, hint) {
  $("[data-field=title]", secretPanel).textContent = title;
  $("[data-field=hint]", secretPanel).textContent = hint || "";
  const input = $("#secret-value");
  input.value = secret;
  secretPanel.hidden = false;
  input.focus();
  input.select();
}
if (secretPanel) {
  $("[data-copy-secret]", secretPanel).addEventListener("click", async () => {
    const input = $("#secret-value");
    input.select();
    try { await navigator.clipboard.writeText(input.value); flash("Copied.", "info"); } catch (_) { document.execCommand("copy"); }
  });
  $("[data-hide-secret]", secretPanel).addEventListener("click", () => {
    $("#secret-value").value = "";
    secretPanel.hidden = true;
  });
}

// -- Users (admins) ----------------------------------------------------------------------------

const userForm = $("#user-form");
const newUser = $("#new-user");
if (userForm && newUser) {
  newUser.addEventListener("click", () => toggleForm(newUser, userForm, userForm.hidden));
  $("[data-cancel]", userForm).addEventListener("click", () => toggleForm(newUser, userForm, false));
  userForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(userForm);
    const body = { name: data.get("name").trim(), role: data.get("role") };
    if (data.get("password")) body.password = data.get("password");
    if (data.get("email").trim()) body.email = data.get("email").trim();
    const submit = $("button[type=submit]", userForm);
    submit.disabled = true;
    formError(userForm, "");
    try {
      const made = await api("POST", "/api/users", body);
      userForm.reset();
      toggleForm(newUser, userForm, false);
      showSecret(
        `User ${made.user.name} added. Their first personal token:`,
        made.token.secret,
        `Give it to ${made.user.name}: Authorization: Bearer <token>, or HTTP Basic with the user name ${made.user.name}.`,
      );
    } catch (error) {
      formError(userForm, error.message);
    } finally {
      submit.disabled = false;
      await refreshRows();
    }
  });
}

const passwordDialog = $("#password-dialog");
let resetting = null;
if (passwordDialog) {
  $("[data-close]", passwordDialog).addEventListener("click", () => passwordDialog.close());
  $("[data-confirm-password]", passwordDialog).addEventListener("click", async (event) => {
    const button = event.currentTarget;
    const input = $("input[name=password]", passwordDialog);
    let password = input.value;
    const generated = !password;
    if (generated) {
      const bytes = crypto.getRandomValues(new Uint8Array(15));
      password = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_");
    }
    button.disabled = true;
    formError(passwordDialog, "");
    try {
      await api("PATCH", `/api/users/${encodeURIComponent(resetting)}`, { password });
      passwordDialog.close();
      if (generated) showSecret(`New password of ${resetting}:`, password, "Give it to them; they sign in with it at once.");
      else flash(`Password of ${resetting} changed.`, "info");
    } catch (error) {
      formError(passwordDialog, error.message);
    } finally {
      input.value = "";
      button.disabled = false;
      await refreshRows();
    }
  });
}

// -- Tokens ------------------------------------------------------------------------------------

const tokenForm = $("#token-form");
const newToken = $("#new-token");
if (tokenForm && newToken) {
  const owner = $("#tokens").dataset.user;
  newToken.addEventListener("click", () => toggleForm(newToken, tokenForm, tokenForm.hidden));
  $("[data-cancel]", tokenForm).addEventListener("click", () => toggleForm(newToken, tokenForm, false));
  tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(tokenForm);
    const body = { note: data.get("note").trim(), user: owner };
    if (data.get("expires_days")) body.expires_days = Number(data.get("expires_days"));
    const submit = $("button[type=submit]", tokenForm);
    submit.disabled = true;
    formError(tokenForm, "");
    try {
      const token = await api("POST", "/api/tokens", body);
      tokenForm.reset();
      toggleForm(newToken, tokenForm, false);
      showSecret(
        `Token ${token.id}${token.note ? ` (${token.note})` : ""} for ${token.user}:`,
        token.secret,
        `Authorization: Bearer <token>, or HTTP Basic with the user name ${token.user} and the token as the password.`,
      );
    } catch (error) {
      formError(tokenForm, error.message);
    } finally {
      submit.disabled = false;
      await refreshRows();
    }
  });
}

// -- row actions -------------------------------------------------------------------------------

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action } = button.dataset;
  if (action === "reset-password") {
    resetting = button.dataset.name;
    $("[data-field=name]", passwordDialog).textContent = resetting;
    formError(passwordDialog, "");
    passwordDialog.showModal();
    return;
  }
  button.disabled = true;
  try {
    if (action === "remove-user") {
      const name = button.dataset.name;
      if (!confirm(`Remove user ${name}? Their tokens stop working and their browsers are signed out at once.`)) return;
      await api("DELETE", `/api/users/${encodeURIComponent(name)}`);
      flash(`User ${name} removed.`, "info");
    } else if (action === "revoke-token") {
      const id = button.dataset.id;
      if (!confirm(`Revoke token ${id}? Whatever uses it gets 401 from now on.`)) return;
      await api("DELETE", `/api/tokens/${encodeURIComponent(id)}`);
      flash(`Token ${id} revoked.`, "info");
    }
  } catch (error) {
    flash(error.message);
  } finally {
    button.disabled = false;
    await refreshRows();
  }
});

document.addEventListener("change", async (event) => {
  const select = event.target.closest("select[data-action=role]");
  if (!select) return;
  const name = select.dataset.name;
  select.disabled = true;
  try {
    await api("PATCH", `/api/users/${encodeURIComponent(name)}`, { role: select.value });
    flash(`${name} is now ${select.value === "admin" ? "an admin" : "a user"}.`, "info");
  } catch (error) {
    flash(error.message);
  } finally {
    await refreshRows();
  }
});
