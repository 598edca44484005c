// The queue dashboard's only script: refresh the live part of the main page every few seconds, in place.
// Shipped with the package (no CDN, no library); the page works without it, only less live.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) {
    return;
  }
  var every = Number(live.getAttribute("data-refresh-ms")) || 5000;
  var source = live.getAttribute("data-src");

  function typing() {
    var active = document.activeElement;
    return active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA");
  }

  function refresh() {
    if (document.hidden || typing()) {
      return;
    }
    fetch(source, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        live.innerHTML = html;
        live.classList.remove("stale");
        document.body.setAttribute("data-refreshed-at", String(Date.now()));
      })
      .catch(function () {
        live.classList.add("stale");
      });
  }

  window.setInterval(refresh, every);
})();
