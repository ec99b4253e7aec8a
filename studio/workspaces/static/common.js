// Spark Studio: what every page's script uses. Loaded before studio.js (the main page) and users.js
// (the Users and Tokens pages); these globals are theirs to share. Errors shown are the API's own {"msg": ...}.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);

async function api(method, url, body) {
  const options = { method, headers: { Accept: "application/json" } };
  // The server takes changes only as JSON (a cross-site form cannot send that); an action without data sends {}.
  if (body === undefined && method !== "GET" && method !== "DELETE") body = {};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((data && data.msg) || `${response.status} ${response.statusText}`);
  }
  return data;
}

// -- messages ---------------------------------------------------------------------------------

const flashBox = $("#flash");
let flashTimer = null;

function flash(message, kind = "error") {
  flashBox.classList.toggle("info", kind === "info");
  $(".flash-text", flashBox).textContent = message;
  flashBox.hidden = false;
  clearTimeout(flashTimer);
  if (kind === "info") flashTimer = setTimeout(() => { flashBox.hidden = true; }, 6000);
}
$(".flash-close", flashBox).addEventListener("click", () => { flashBox.hidden = true; });

function formError(form, message) {
  const box = $(".form-error", form);
  box.textContent = message || "";
  box.hidden = !message;
}

// -- forms ------------------------------------------------------------------------------------

function toggleForm(button, form, show) {
  form.hidden = !show;
  button.setAttribute("aria-expanded", String(show));
  if (show) { formError(form, ""); $("input", form).focus(); }
}
