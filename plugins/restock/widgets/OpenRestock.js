// Restock's OpenRestock widget: the tenant's open restock requests, read through the app
// shell's bridge from restock's own GET /requests. Text goes in with textContent only.
"use strict";
(function () {
  const status = document.getElementById("status");
  const table = document.getElementById("open");
  const rows = table.querySelector("tbody");

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  window.tenantfleet.call("/requests").then((data) => {
    const open = data.requests.filter((r) => r.status === "open");
    for (const r of open) {
      const tr = document.createElement("tr");
      const when = typeof r.requested_at === "string" ? r.requested_at.slice(0, 16).replace("T", " ") : "";
      tr.append(cell(r.sku), cell(String(r.qty), "num"), cell(when));
      rows.append(tr);
    }
    status.textContent = open.length === 0 ? "No open requests." : open.length + " open request(s)";
    table.hidden = open.length === 0;
  }, (error) => {
    status.textContent = "Not loaded: " + error.code + (error.message ? " (" + error.message + ")" : "");
    status.className = "status error";
  });
})();
