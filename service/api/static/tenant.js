// The tenant page: send the actions (with the pasted token) and, while a run is going on, poll
// GET /api/tenants/{slug} every second and redraw the timeline; once the tenant settles, reload
// the page so that the server renders its actions, failure and console link afresh.
(function () {
  "use strict";
  var POLL_MS = 1000;
  var data = JSON.parse(document.getElementById("tenant-data").textContent);
  var slugPath = encodeURIComponent(data.slug);
  var timer = null;
  var ANSWER_KEY = "provisioner.answer." + data.slug;

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function stepStatus(attempt, run) {
    if (run) {
      return run.status + (run.reused_from_attempt ? " (reused from #" + run.reused_from_attempt + ")" : "");
    }
    return attempt.state === "running" ? "pending" : "not run";
  }

  function renderAttempt(attempt) {
    var byStep = {};
    attempt.steps.forEach(function (run) { byStep[run.step] = run; });
    var box = el("div", { "class": "attempt", "data-attempt": attempt.attempt_number, "data-state": attempt.state });
    var title = el("h3", {}, "Attempt " + attempt.attempt_number + " ");
    title.appendChild(el("span", { "class": "badge attempt-" + attempt.state }, attempt.state));
    title.appendChild(el("span", { "class": "muted" },
      " " + attempt.trigger + " by " + attempt.requested_by + ", resumed from " + attempt.resumed_from));
    box.appendChild(title);
    var table = el("table", { "class": "grid steps" });
    var head = el("tr");
    ["step", "status", "tries", "ms", "error"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
    table.appendChild(el("thead")).appendChild(head);
    var body = table.appendChild(el("tbody"));
    data.steps.forEach(function (name) {
      var run = byStep[name];
      var row = el("tr", { "data-step": name, "class": "step-" + (run ? run.status : "none") });
      row.appendChild(el("td", { "class": "mono" }, name));
      row.appendChild(el("td", { "class": "status" }, stepStatus(attempt, run)));
      row.appendChild(el("td", {}, run ? run.tries : ""));
      row.appendChild(el("td", {}, run && run.duration_ms !== null ? run.duration_ms : ""));
      row.appendChild(el("td", { "class": "mono" },
        run && run.error_type ? run.error_type + ": " + run.error_message : ""));
      body.appendChild(row);
    });
    box.appendChild(table);
    return box;
  }

  function renderLock(lock) {
    var body = document.getElementById("lock-body");
    body.textContent = "";
    if (!lock.held) { body.appendChild(el("p", { "class": "muted" }, "free")); return; }
    var holder = (lock.holder_attempt_number ? "attempt " + lock.holder_attempt_number : "run") +
      " " + lock.holder_run_id;
    body.appendChild(el("p", {}, "held by " + holder + ", epoch " + lock.epoch + ", age " +
      lock.age_s + " s, TTL " + lock.ttl_s + " s"));
  }

  function render(detail) {
    var badge = document.getElementById("state-badge");
    badge.textContent = detail.state;
    badge.className = "badge state-" + detail.state;
    var box = document.getElementById("attempts");
    box.textContent = "";
    detail.attempts.slice().reverse().forEach(function (a) { box.appendChild(renderAttempt(a)); });
    renderLock(detail.lock);
  }

  function poll() {
    fetch("/api/tenants/" + slugPath, { headers: window.provisionerToken.headers(), cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (detail) {
        render(detail);
        if (detail.state !== data.state && ["active", "failed", "decommissioned"].indexOf(detail.state) >= 0) {
          stopPolling();
          window.location.reload();
        }
      })
      .catch(function (error) {
        document.getElementById("polling").textContent = "(polling failed: " + error.message + ")";
      });
  }

  function startPolling() {
    if (timer === null) {
      document.getElementById("polling").textContent = "(live)";
      timer = window.setInterval(poll, POLL_MS);
    }
  }
  function stopPolling() {
    if (timer !== null) { window.clearInterval(timer); timer = null; }
    document.getElementById("polling").textContent = "";
  }

  function send(action) {
    var path = action === "retry_force" ? "retry" : action;
    var body = action === "retry_force" ? { force: true } : {};
    body.requested_by = "tenant-page";
    var result = document.getElementById("action-result");
    result.className = "";
    result.textContent = "sending " + path + "...";
    return fetch("/api/tenants/" + slugPath + "/" + path, {
      method: "POST",
      headers: window.provisionerToken.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().then(function (answer) {
        if (response.status === 202) {
          result.className = "ok";
          result.textContent = "accepted: " + answer.message;
          data.state = "changing";
          // The reload renders the new state; the answer stays on the reloaded page (a loaded
          // machine may reload before anybody has read it).
          try {
            window.sessionStorage.setItem(ANSWER_KEY, JSON.stringify(
              { className: result.className, text: result.textContent }));
          } catch (ignored) { /* storage refused: the answer shows until the reload only */ }
          window.setTimeout(function () { window.location.reload(); }, 300);
        } else {
          result.className = "error";
          result.textContent = "refused (" + answer.reason + "): " + answer.message;
        }
      });
    }).catch(function (error) {
      result.className = "error";
      result.textContent = "failed: " + error.message;
    });
  }

  document.querySelectorAll("button[data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      var question = button.getAttribute("data-confirm");
      if (question && !window.confirm(question)) { return; }
      send(button.getAttribute("data-action"));
    });
  });

  function showKeptAnswer() {
    var kept = null;
    try {
      kept = window.sessionStorage.getItem(ANSWER_KEY);
      window.sessionStorage.removeItem(ANSWER_KEY);
    } catch (ignored) { return; }
    if (!kept) { return; }
    var answer = JSON.parse(kept);
    var result = document.getElementById("action-result");
    result.className = answer.className;
    result.textContent = answer.text;
  }

  showKeptAnswer();
  if (data.polling) { startPolling(); }
})();
