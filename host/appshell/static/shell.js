// The app shell's side of the widget bridge (protocol version 1). No framework, no build step.
//
// Each widget runs in an <iframe sandbox="allow-scripts"> (an opaque origin: it can't read
// this page's DOM or cookies). This script loads each frame itself, after it has started
// listening, and keeps the frame's window -> plugin id: a message's plugin is the plugin of
// the frame that sent it (event.source), never anything the message says.
//
// Messages: {v: 1, id, method: "call", path: "/items?limit=50", httpMethod: "GET"|"POST", body?}
// Replies:  {v: 1, id, status, result} or {v: 1, id, status?, error: {code, message}}
// A call runs the widget's own plugin's route for the signed-in tenant at
// /app/call/{plugin}{path} (session cookie + X-CSRF-Token); the server runs it as the
// signed-in principal (RBAC, enablement, the tenant fence) and serves nothing else there.
//
// Replies go to event.source, the frame's own window, with targetOrigin "*": a sandboxed
// frame's origin is opaque ("null"), which no other targetOrigin matches. That is safe
// because a reply only ever carries what that frame's own plugin route answered to that
// frame's own request; the window it goes to is the one that asked (even if the frame has
// navigated itself elsewhere since, it could have read the same data before).
"use strict";
(function () {
  const VERSION = 1;
  const body = document.body;
  const csrf = body.dataset.csrf;
  const callBase = body.dataset.call;
  const signIn = body.dataset.signin;
  const frames = new Map();  // the frame's window -> its plugin id
  const SEGMENTS = /^(\/[A-Za-z0-9_~-]+)+\/?$/;  // no dots, no escapes: nothing climbs out of the plugin
  const QUERY = /^[A-Za-z0-9_.~=&%+,:-]*$/;
  const MAX_PATH = 2000;

  function reply(target, message) {
    target.postMessage(message, "*");  // see above: the asking frame's own data, to that frame only
  }

  async function call(plugin, m) {
    if (typeof m.path !== "string" || m.path.length > MAX_PATH) {
      return {error: {code: "BAD_REQUEST", message: "path must be a string"}};
    }
    const cut = m.path.indexOf("?");
    const path = cut < 0 ? m.path : m.path.slice(0, cut);
    const query = cut < 0 ? "" : m.path.slice(cut + 1);
    if (!SEGMENTS.test(path) || !QUERY.test(query)) {
      return {error: {code: "FORBIDDEN", message: "a widget may call its own plugin's routes only (a path like /items)"}};
    }
    const method = m.httpMethod === undefined ? "GET" : m.httpMethod;
    if (method !== "GET" && method !== "POST") {
      return {error: {code: "BAD_REQUEST", message: "httpMethod must be GET or POST"}};
    }
    const headers = {"X-CSRF-Token": csrf, "Accept": "application/json"};
    const init = {method: method, headers: headers, credentials: "same-origin", redirect: "error", cache: "no-store"};
    if (method === "POST") {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(m.body === undefined ? {} : m.body);
    }
    let resp;
    try {
      resp = await fetch(callBase + encodeURIComponent(plugin) + path + (query ? "?" + query : ""), init);
    } catch (e) {
      return {error: {code: "UNREACHABLE", message: "the host could not be reached"}};
    }
    if (resp.status === 401) {  // the session ended (expired, signed out, key revoked): sign in again
      window.location.assign(signIn);
    }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) {
      const error = data && data.error ? {code: data.error.code, message: data.error.message}
                                       : {code: "HTTP_" + resp.status, message: resp.statusText};
      return {status: resp.status, error: error};
    }
    return {status: resp.status, result: data};
  }

  window.addEventListener("message", async (event) => {
    const plugin = frames.get(event.source);
    if (plugin === undefined) return;  // not a frame this page created
    const m = event.data;
    const id = m !== null && typeof m === "object" && (typeof m.id === "string" || typeof m.id === "number") ? m.id : null;
    let answer;
    if (m === null || typeof m !== "object") {
      answer = {error: {code: "BAD_MESSAGE", message: "a message is an object {v, id, method, ...}"}};
    } else if (m.v !== VERSION) {
      answer = {error: {code: "UNSUPPORTED_VERSION", message: "this shell speaks bridge version " + VERSION}};
    } else if (m.method !== "call") {
      answer = {error: {code: "UNKNOWN_METHOD", message: "unknown method; this version has: call"}};
    } else {
      answer = await call(plugin, m);
    }
    reply(event.source, Object.assign({v: VERSION, id: id}, answer));
  });

  for (const frame of document.querySelectorAll("iframe[data-plugin][data-src]")) {
    frames.set(frame.contentWindow, frame.dataset.plugin);
    frame.src = frame.dataset.src;
  }
})();
