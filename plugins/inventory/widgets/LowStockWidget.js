// Inventory's LowStockWidget: the items below the low-stock mark, read through the app
// shell's bridge from inventory's own GET /items (as the signed-in user, for their tenant).
// Text goes in with textContent only: item names are the tenant's data, never markup.
"use strict";
(function () {
  const BELOW = 5;  // restock's default threshold (a tenant's config may set another)
  const status = document.getElementById("status");
  const table = document.getElementById("low");
  const rows = table.querySelector("tbody");

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  window.tenantfleet.call("/items?limit=500").then((data) => {
    const low = data.items.filter((item) => item.qty < BELOW);
    for (const item of low) {
      const tr = document.createElement("tr");
      tr.append(cell(item.sku), cell(item.name === null ? "" : item.name), cell(String(item.qty), "num"));
      rows.append(tr);
    }
    status.textContent = low.length === 0 ? "Nothing is low." : low.length + " item(s) below " + BELOW;
    table.hidden = low.length === 0;
  }, (error) => {
    status.textContent = "Not loaded: " + error.code + (error.message ? " (" + error.message + ")" : "");
    status.className = "status error";
  });
})();
