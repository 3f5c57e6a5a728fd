// Tessera admin UI: the little the pages need beyond htmx. No inline script anywhere (the CSP
// allows scripts from this server's files only).
(function () {
  "use strict";

  // Playground: clear the message box once a turn is sent.
  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.target;
    if (form && form.id === "chat-form" && event.detail.successful) {
      var box = document.getElementById("message");
      if (box) box.value = "";
      var system = document.getElementById("system");
      if (system) system.closest("label").remove();  // the system message starts a conversation only
    }
  });

  // Health: the snapshot feed moves the figures and the charts.
  function percent(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }

  function makeChart(id, labels, colors) {
    var canvas = document.getElementById(id);
    if (!canvas || !window.Chart) return null;
    return new window.Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: labels.map(function (label, i) {
        return { label: label, data: [], borderColor: colors[i], backgroundColor: colors[i], pointRadius: 0, tension: 0.2 };
      }) },
      options: { animation: false, responsive: true, maintainAspectRatio: false,
                 scales: { y: { beginAtZero: true } }, plugins: { legend: { position: "bottom" } } }
    });
  }

  function push(chart, label, values) {
    if (!chart) return;
    chart.data.labels.push(label);
    values.forEach(function (v, i) { chart.data.datasets[i].data.push(v); });
    if (chart.data.labels.length > 120) {
      chart.data.labels.shift();
      chart.data.datasets.forEach(function (d) { d.data.shift(); });
    }
    chart.update("none");
  }

  function startHealth(root) {
    var queue = makeChart("chart-queue", ["running", "waiting"], ["#2b6cb0", "#dd6b20"]);
    var kv = makeChart("chart-kv", ["used", "fragmented"], ["#2f855a", "#9b2c2c"]);
    var tokens = makeChart("chart-tokens", ["tokens/s"], ["#553c9a"]);
    var previous = null;
    var source = new EventSource(root.getAttribute("data-feed"));
    source.addEventListener("health", function (event) {
      var s = JSON.parse(event.data);
      root.querySelectorAll("[data-field]").forEach(function (el) {
        var name = el.getAttribute("data-field");
        if (name === "engine_state") { el.textContent = s.engine_running ? "running" : "stopped"; return; }
        if (!(name in s)) return;
        el.textContent = el.getAttribute("data-format") === "percent" ? percent(s[name]) : (s[name] === null ? "–" : String(s[name]));
      });
      var label = new Date(s.time * 1000).toLocaleTimeString();
      push(queue, label, [s.num_requests_running, s.num_requests_waiting]);
      push(kv, label, [100 * s.kv_cache_usage_perc, 100 * s.kv_cache_fragmentation_ratio]);
      var rate = previous ? Math.max(0, (s.generation_tokens - previous.generation_tokens) / (s.time - previous.time)) : 0;
      push(tokens, label, [rate]);
      previous = s;
      root.setAttribute("data-updates", String(Number(root.getAttribute("data-updates") || 0) + 1));
    });
    // The browser reconnects by itself; nothing to report while it does.
    source.onerror = function () {};
    window.addEventListener("pagehide", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var health = document.getElementById("health");
    if (health) startHealth(health);
  });
})();
