// The login link carries the token after '#' (never sent, never logged): post it.
(function () {
  "use strict";
  const form = document.getElementById("token-login");
  if (!form || location.hash.indexOf("#token=") !== 0) { return; }
  form.elements.token.value = decodeURIComponent(location.hash.slice(7));
  history.replaceState(null, "", location.pathname + location.search);
  form.submit();
})();
// Live updates: one EventSource per page, fed by the console's NATS follower.
// Each update carries the newest stream sequence; every [data-live] section
// re-reads itself at that sequence (the server waits for the projection to
// reach it). At most one refresh runs at a time; updates that arrive meanwhile
// are merged into one more refresh, so a busy swarm never queues requests.
(function () {
  "use strict";
  window.cfSeq = 0;
  let busy = false;
  let pending = false;
  const lastRefresh = {};
  const trailing = {};
  const dot = document.getElementById("live");
  const CATCH_UP_MS = 300;
  let catchUp = null;
  let catchUpMs = CATCH_UP_MS;

  async function refresh() {
    if (busy) { pending = true; return; }
    busy = true;
    pending = false;
    const seq = window.cfSeq;  // updates arriving meanwhile raise cfSeq for the next refresh
    try {
      const now = Date.now();
      const sections = Array.from(document.querySelectorAll("[data-live]"));
      await Promise.all(sections.map(function (el) {
        if (!el.id) { return null; }
        // Heavy sections (analytics, agents, graph) refresh at most every data-live-min ms;
        // a skipped one gets a trailing refresh, so the last event is always shown.
        const min = parseInt(el.dataset.liveMin || "0", 10);
        const last = lastRefresh[el.id] || 0;
        if (min && now - last < min) {
          if (!trailing[el.id]) {
            trailing[el.id] = setTimeout(function () { delete trailing[el.id]; refresh(); },
                                         min - (now - last));
          }
          return null;
        }
        lastRefresh[el.id] = now;
        const url = el.dataset.live + (el.dataset.live.indexOf("?") >= 0 ? "&" : "?") + "seq=" + seq;
        const target = "#" + el.id;
        const swap = el.id === "banner" ? "innerHTML" : "outerHTML";
        return htmx.ajax("GET", url, { target: target, swap: swap }).catch(function () { return null; });
      }));
      document.body.dataset.seq = String(seq);
      document.dispatchEvent(new CustomEvent("cf-refreshed", { detail: { seq: seq } }));
      // A projector that had not reached the sequence yet answered with what it had
      // (its data-checkpoint says how far it was): look again shortly, or the page
      // would stay behind until some later event.
      const behind = Array.from(document.querySelectorAll("[data-checkpoint]")).some(
        function (el) { return parseInt(el.dataset.checkpoint || "0", 10) < window.cfSeq; });
      if (!behind) {
        catchUpMs = CATCH_UP_MS;
      } else if (!catchUp) {  // backing off while the projector stays behind (or down)
        catchUp = setTimeout(function () { catchUp = null; refresh(); }, catchUpMs);
        catchUpMs = Math.min(catchUpMs * 2, 5000);
      }
    } finally {
      busy = false;
      if (pending) { refresh(); }
    }
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("hello", function (e) {
      window.cfSeq = JSON.parse(e.data).seq;
      document.body.dataset.live = "on";
      if (dot) { dot.classList.add("on"); }
      // Events stored between rendering this page (or losing the stream) and this
      // hello are announced by no update: re-read once at the hello's sequence.
      refresh();
    });
    source.addEventListener("update", function (e) {
      const data = JSON.parse(e.data);
      window.cfSeq = Math.max(window.cfSeq, data.seq);
      refresh();
    });
    source.onerror = function () {
      document.body.dataset.live = "off";
      if (dot) { dot.classList.remove("on"); }
    };
  }

  // After an action, refresh at once (the action's own event also arrives by SSE).
  document.body.addEventListener("htmx:afterRequest", function (e) {
    const verb = (e.detail.requestConfig || {}).verb;
    if (verb === "post") { refresh(); }
  });
  // A live re-read replaces its section, inputs too: what the operator is typing (a gate's
  // note) and where the cursor is are carried over to the new inputs with the same id.
  let typed = null;
  document.body.addEventListener("htmx:beforeSwap", function (e) {
    const target = e.detail.target;
    if ((e.detail.requestConfig || {}).verb !== "get" || !target) { return; }
    typed = Array.from(target.querySelectorAll("input[id], textarea[id]")).filter(
      function (el) { return el.value !== el.defaultValue; }).map(function (el) {
      const focused = el === document.activeElement;
      return { id: el.id, value: el.value, focused: focused,
               start: focused ? el.selectionStart : null, end: focused ? el.selectionEnd : null };
    });
  });
  document.body.addEventListener("htmx:afterSwap", function () {
    (typed || []).forEach(function (was) {
      const el = document.getElementById(was.id);
      if (!el || el.value !== el.defaultValue) { return; }
      el.value = was.value;
      if (was.focused) { el.focus(); el.setSelectionRange(was.start, was.end); }
    });
    typed = null;
  });
  // A live re-read that fails (no projector answering, the console restarting) keeps the
  // section as it was, marks the page stale, and tries again in two seconds.
  document.body.addEventListener("htmx:beforeSwap", function (e) {
    const verb = (e.detail.requestConfig || {}).verb;
    if (verb === "get" && e.detail.xhr && e.detail.xhr.status >= 400) {
      e.detail.shouldSwap = false;
      document.body.dataset.stale = "true";
      if (dot) { dot.classList.remove("on"); dot.title = "live updates stalled: " + e.detail.xhr.status; }
      setTimeout(refresh, 2000);
    } else if (verb === "get") {
      delete document.body.dataset.stale;
      if (dot && document.body.dataset.live === "on") { dot.classList.add("on"); dot.title = "live updates"; }
    }
  });

  // Graph: "fit to the window" scales the drawing down (it keeps its viewBox); the choice
  // outlives live refreshes, which replace the section.
  function applyFit() {
    const box = document.querySelector("[data-fit]");
    if (!box) { return; }
    const wrap = document.querySelector(box.dataset.fit);
    if (wrap) { wrap.classList.toggle("fit", box.checked); }
  }
  document.addEventListener("change", function (e) {
    if (e.target && e.target.matches && e.target.matches("[data-fit]")) { applyFit(); }
  });
  document.body.addEventListener("htmx:afterSwap", applyFit);
  connect();
})();
