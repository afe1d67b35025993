// Live updates without inline script (the page's CSP allows scripts from this origin only):
// every element with data-live="URL" is refreshed from that URL every 1.5 s while the page is
// visible, until the request and its access reach an end state.
"use strict";
(function () {
  const FINAL = /id="request-state">(DENIED|CANCELLED|EXPIRED)<|id="grant-state">(REVOKED|EXPIRED|RELEASED|FAILED)</;
  function watch(el) {
    const url = el.getAttribute("data-live");
    async function tick() {
      if (!document.hidden) {
        try {
          const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
          if (response.ok) {
            const html = await response.text();
            if (html !== el.innerHTML) el.innerHTML = html;
            if (FINAL.test(html)) return;
          }
        } catch (e) { /* the next tick tries again */ }
      }
      setTimeout(tick, 1500);
    }
    setTimeout(tick, 1500);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(watch);
  });
})();
