// The portal's only script (the CSP allows no inline one). Everything works without it
// but two things: dates in the browser's time zone (UTC stays on hover), and the live
// progress of a recovery job. It writes text only (textContent), never HTML.
"use strict";
(function () {
  var FORMAT = {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  };

  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (!isNaN(moment.getTime())) {
        el.textContent = moment.toLocaleString(undefined, FORMAT);
        el.classList.add("local");
      }
    });
  }

  function setTime(dd, iso) {
    dd.textContent = "";
    if (!iso) {
      var none = document.createElement("span");
      none.className = "none";
      none.textContent = "never";
      dd.appendChild(none);
      return;
    }
    var el = document.createElement("time");
    el.setAttribute("datetime", iso);
    el.title = iso.replace("T", " ").replace(/\.\d+Z$/, " UTC");
    el.textContent = el.title;
    dd.appendChild(el);
    localize(dd);
  }

  function follow(card) {
    var url = card.getAttribute("data-progress");
    var note = document.getElementById("live-note");
    if (note) { note.hidden = false; }
    function show(job) {
      card.querySelectorAll("[data-field]").forEach(function (el) {
        var value = job[el.getAttribute("data-field")];
        el.textContent = value === null || value === undefined ? "—" : String(value);
      });
      card.querySelectorAll("[data-time]").forEach(function (el) {
        setTime(el, job[el.getAttribute("data-time")]);
      });
      var state = document.getElementById("job-state");
      var badge = document.createElement("span");
      badge.className = "badge " + job.state_class;
      badge.textContent = job.state_text;
      state.textContent = "";
      state.appendChild(badge);
      card.setAttribute("data-state", job.state);
      if (!job.active) {
        ["live-note", "job-refresh", "cancel-form"].forEach(function (id) {
          var el = document.getElementById(id);
          if (el) { el.remove(); }
        });
      }
    }
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.json(); })
        .then(function (job) { show(job); if (job.active) { setTimeout(tick, 700); } })
        .catch(function () { setTimeout(tick, 3000); });
    }
    setTimeout(tick, 300);
  }

  document.addEventListener("DOMContentLoaded", function () {
    localize(document);
    var card = document.querySelector("[data-progress]");
    if (card) { follow(card); }
  });
})();
