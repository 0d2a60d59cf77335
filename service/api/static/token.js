// The API token the operator pastes: kept in sessionStorage (this tab only) and sent by fetch()
// as "Authorization: Bearer ...". A session cookie carries it too, for reads only (so that pages
// load for an operator who is not on the machine itself); the server never honours the cookie
// for a change.
(function () {
  "use strict";
  var KEY = "provisioner_token";
  var COOKIE = window.PROVISIONER_TOKEN_COOKIE || "provisioner_token";

  function get() {
    try { return window.sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }
  function setCookie(value) {
    var expires = value ? "" : "; max-age=0";
    document.cookie = COOKIE + "=" + encodeURIComponent(value) + "; path=/; SameSite=Strict" + expires;
  }
  function set(value) {
    try {
      if (value) { window.sessionStorage.setItem(KEY, value); } else { window.sessionStorage.removeItem(KEY); }
    } catch (e) { /* storage disabled: the token lasts until the page is left */ }
    setCookie(value);
  }
  function headers(extra) {
    var result = Object.assign({ "Accept": "application/json" }, extra || {});
    var token = get();
    if (token) { result["Authorization"] = "Bearer " + token; }
    return result;
  }
  function showStatus() {
    var status = document.getElementById("token-status");
    if (status) { status.textContent = get() ? "token set (this tab)" : "no token: changes are refused"; }
  }

  window.provisionerToken = { get: get, set: set, headers: headers };

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("token-form");
    var input = document.getElementById("token-input");
    var forget = document.getElementById("token-forget");
    if (!form || !input) { return; }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      set(input.value.trim());
      input.value = "";
      showStatus();
      form.dispatchEvent(new CustomEvent("token-saved"));
    });
    if (forget) {
      forget.addEventListener("click", function () { set(""); showStatus(); });
    }
    showStatus();
  });
})();
