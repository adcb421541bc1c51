// imagebatch console: small enhancements over pages that work without them.
// Live progress, a lightbox with keyboard review in the gallery, selection helpers, and the
// new-job form's two inputs. No framework, no build; everything is same-origin.
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  var FINAL = ["succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted"];
  var SCRIPT = { "X-Requested-With": "console" };

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  // --- a job's live progress: the live part of the page is fetched again until the job ends ---
  function liveProgress() {
    var live = document.querySelector("[data-live]");
    if (!live || live.getAttribute("data-final") === "1") return;
    var url = live.getAttribute("data-live");
    var busy = false;
    var timer = window.setInterval(function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(url, { headers: SCRIPT, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          live.innerHTML = html;
          // Screen readers hear the progress when it moves, not the whole section each time.
          var said = document.querySelector("[data-live-status]");
          var text = live.querySelector("[data-testid=progress-text]");
          if (said && text && said.textContent !== text.textContent) said.textContent = text.textContent;
          var badge = live.querySelector("[data-status]");
          if (badge && FINAL.indexOf(badge.getAttribute("data-status")) >= 0) {
            window.clearInterval(timer);
            live.setAttribute("data-final", "1");
            window.location.reload(); // the finished job's page has its own actions
          }
        })
        .catch(function () { /* keep the last state; try again on the next tick */ })
        .then(function () { busy = false; });
    }, 1500);
  }

  function confirmForms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (e) {
        if (!window.confirm(form.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
  }

  // --- the gallery ----------------------------------------------------------------------------
  function selection() {
    var boxes = document.querySelectorAll('.tile input[type="checkbox"][name="item"]');
    var count = document.querySelector("[data-selected-count]");
    function update() {
      var n = 0;
      boxes.forEach(function (b) { if (b.checked) n++; });
      if (count) count.textContent = n ? n + " selected" : "";
    }
    boxes.forEach(function (b) { b.addEventListener("change", update); });
    var all = document.querySelector("[data-select-all]");
    if (all) {
      all.addEventListener("click", function () {
        var every = Array.prototype.every.call(boxes, function (b) { return b.checked; });
        boxes.forEach(function (b) { b.checked = !every; });
        update();
      });
    }
  }

  function lightbox() {
    var dialog = document.getElementById("lightbox");
    if (!dialog || typeof dialog.showModal !== "function") return;
    var body = dialog.querySelector("[data-lightbox-body]");
    var links = Array.prototype.slice.call(document.querySelectorAll("[data-lightbox]"));
    var current = -1;
    var opener = null;

    function open(i) {
      if (i < 0 || i >= links.length) return;
      current = i;
      fetch(links[i].getAttribute("data-lightbox"), { headers: SCRIPT, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          body.innerHTML = html;
          wire();
          if (!dialog.open) dialog.showModal();
          var first = body.querySelector("[data-close]");
          if (first) first.focus();
        })
        .catch(function () { window.location.href = links[i].href; });
    }

    function move(step) {
      var next = current + step;
      if (next >= links.length) {
        var more = document.querySelector("[data-next-page]");
        if (more) window.location.href = more.href;
        return;
      }
      if (next >= 0) open(next);
    }

    function mark(decision) {
      var tile = links[current] && links[current].closest(".tile");
      if (!tile) return;
      tile.classList.remove("is-approved", "is-rejected");
      var badge = tile.querySelector(".meta .badge");
      if (decision === "clear") { if (badge) badge.remove(); return; }
      tile.classList.add("is-" + decision);
      if (!badge) {
        badge = document.createElement("span");
        tile.querySelector(".meta").appendChild(badge);
      }
      badge.className = "badge " + decision;
      badge.textContent = decision;
    }

    function send(form, decision) {
      var data = new FormData(form);
      data.set("decision", decision);
      fetch(form.action, { method: "POST", body: data, headers: SCRIPT, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : r.text().then(function (t) { return Promise.reject(t); }); })
        .then(function () { mark(decision); if (decision === "clear") open(current); else move(1); })
        .catch(function (message) { window.alert(message || "The review was not saved."); });
    }

    function wire() {
      var close = body.querySelector("[data-close]");
      if (close) close.addEventListener("click", function () { dialog.close(); });
      var prev = body.querySelector("[data-prev]");
      var next = body.querySelector("[data-next]");
      [[prev, -1], [next, 1]].forEach(function (pair) {
        if (pair[0]) pair[0].addEventListener("click", function (e) { e.preventDefault(); move(pair[1]); });
      });
      var form = body.querySelector("[data-review-form]");
      if (form) {
        form.addEventListener("submit", function (e) {
          e.preventDefault();
          send(form, e.submitter ? e.submitter.value : "approved");
        });
      }
    }

    links.forEach(function (link, i) {
      link.addEventListener("click", function (e) {
        if (e.metaKey || e.ctrlKey || e.shiftKey) return;
        e.preventDefault();
        opener = link;
        open(i);
      });
    });
    dialog.addEventListener("close", function () { if (opener) opener.focus(); });
    dialog.addEventListener("keydown", function (e) {
      var typing = /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName);
      if (typing) return;
      if (e.key === "ArrowRight") { e.preventDefault(); move(1); }
      else if (e.key === "ArrowLeft") { e.preventDefault(); move(-1); }
      else if (e.key === "a" || e.key === "r") {
        var form = body.querySelector("[data-review-form]");
        if (form) { e.preventDefault(); send(form, e.key === "a" ? "approved" : "rejected"); }
      }
    });
  }

  // --- a new job: show the fields of the chosen input --------------------------------------
  function newJob() {
    var form = document.querySelector("[data-new-job]");
    if (!form) return;
    function show() {
      var kind = (form.querySelector("[data-kind]:checked") || {}).value || "csv";
      form.querySelectorAll("[data-when]").forEach(function (el) {
        el.hidden = el.getAttribute("data-when") !== kind;
      });
    }
    form.querySelectorAll("[data-kind]").forEach(function (r) { r.addEventListener("change", show); });
    show();
  }

  ready(function () {
    liveProgress();
    confirmForms();
    selection();
    lightbox();
    newJob();
  });
})();
