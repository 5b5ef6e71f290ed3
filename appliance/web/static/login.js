"use strict";
// Sign-in page: first-boot setup (setup code + new password) or login. No framework.

const $ = (id) => document.getElementById(id);

async function post(path, body) {
  const res = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await res.json(); } catch (e) { /* empty body */ }
  return { ok: res.ok, status: res.status, data };
}

function say(text) { $("login-message").textContent = text; }

function explain(r) {
  if (r.status === 429) return `Too many failed attempts: wait ${r.data.retry_after} s.`;
  return r.data.error || `Failed (${r.status}).`;
}

async function init() {
  const res = await fetch("/api/session", { credentials: "same-origin" });
  const s = await res.json();
  if (s.authenticated) { location.replace("/"); return; }
  const form = s.setup_required ? $("setup-form") : $("login-form");
  form.hidden = false;
  form.querySelector("input").focus();
}

$("setup-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await post("/api/setup", { code: $("setup-code").value, password: $("setup-password").value });
  if (r.ok) location.replace("/"); else say(explain(r));
});

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await post("/api/login", { password: $("login-password").value });
  if (r.ok) location.replace("/"); else say(explain(r));
});

init();
