// The widget's side of the app shell's bridge (protocol version 1), for widget documents
// (served sandboxed, on an opaque origin): tenantfleet.call(path, {method, body}) returns a
// promise of the plugin route's JSON answer, or rejects with {code, message, status}.
// The shell decides which plugin's routes a widget may call (its own), not the widget.
"use strict";
window.tenantfleet = (function () {
  const VERSION = 1;
  let next = 0;
  const pending = new Map();
  window.addEventListener("message", (event) => {
    if (event.source !== window.parent) return;
    const m = event.data;
    if (m === null || typeof m !== "object" || !pending.has(m.id)) return;
    const waiting = pending.get(m.id);
    pending.delete(m.id);
    if (m.error) {
      waiting.reject(Object.assign({status: m.status}, m.error));
    } else {
      waiting.resolve(m.result);
    }
  });
  function send(message) {
    const id = "w" + (++next);
    return new Promise((resolve, reject) => {
      pending.set(id, {resolve: resolve, reject: reject});
      window.parent.postMessage(Object.assign({v: VERSION}, message, {id: id}), "*");
    });
  }
  return {
    call: (path, options) => send({method: "call", path: path, httpMethod: (options && options.method) || "GET",
                                   body: options && options.body}),
    send: send,  // a raw message (another version or method gets an error reply)
  };
})();
