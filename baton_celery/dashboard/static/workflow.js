// baton dashboard, one workflow: its graph, timeline, steps and history, from the page's
// snapshot, then kept current by the live stream.
//
// The steps start "pending" and every event is applied in order, the snapshot's history
// and the live events alike (as baton_celery/dashboard/views.py's apply_event does).
// An event numbered at or below the last one applied is ignored: nothing counts twice.
"use strict";

(function () {
  var page = baton.data();
  var live = page.live;
  var wf = page.detail.workflow;
  var seq = 0;
  var names = [];
  var steps = {};
  var ui = {}; // step name -> its elements: graph node, table row, timeline track
  var summary = document.getElementById("summary");
  var historyList = document.getElementById("history");

  page.detail.steps.forEach(function (s) {
    names.push(s.name);
    steps[s.name] = {
      name: s.name, task: s.task, deps: s.deps, state: "pending", attempt: 0, error: null,
      started_at: null, settled_at: null, runs: [],
    };
  });

  // --- the model --------------------------------------------------------------------

  function applyStep(step, ev) {
    var at = Date.parse(ev.timestamp) / 1000;
    if (ev.state === "snoozed") return; // its message came early and was requeued
    var runs = step.runs;
    var open = runs.length && runs[runs.length - 1][1] === null;
    step.state = ev.state;
    step.attempt = ev.attempt;
    step.error = ev.error;
    if (ev.state === "executing") {
      if (step.started_at === null) step.started_at = at;
      if (open) runs[runs.length - 1] = [runs[runs.length - 1][0], at, "lost"];
      runs.push([at, null, null]);
      return;
    }
    if (open) runs[runs.length - 1] = [runs[runs.length - 1][0], at, ev.state];
    if (baton.TERMINAL[ev.state]) step.settled_at = at;
  }

  // Apply one event to the model; returns the step it changed (or true for the finish),
  // or null for an event applied already.
  function apply(ev) {
    if (ev.seq <= seq) return null;
    seq = ev.seq;
    if (ev.kind === "workflow_finished") {
      wf.state = ev.outcome;
      wf.finished_at = Date.parse(ev.timestamp) / 1000;
      wf.failed_steps = ev.failed_steps;
      return true;
    }
    var step = steps[ev.step_name];
    if (step) applyStep(step, ev);
    return step || true;
  }

  function settled() {
    var n = 0;
    names.forEach(function (name) {
      if (baton.TERMINAL[steps[name].state]) n += 1;
    });
    return n;
  }

  function end() {
    return wf.finished_at || baton.now();
  }

  // --- drawing ----------------------------------------------------------------------

  function field(name) {
    return summary.querySelector('[data-field="' + name + '"]');
  }

  function drawSummary() {
    summary.setAttribute("data-state", wf.state);
    var badge = field("state");
    badge.textContent = wf.state;
    badge.className = "badge s-" + wf.state;
    var done = settled();
    field("progress").textContent = done + " / " + names.length + " steps settled";
    var bar = field("bar");
    bar.style.width = (names.length ? (100 * done) / names.length : 0) + "%";
    bar.className = "s-" + wf.state;
    field("started").textContent = baton.time(wf.created_at);
    field("duration").textContent = baton.duration(end() - wf.created_at) + (wf.finished_at ? "" : " so far");
    var failed = wf.failed_steps || [];
    var list = field("failed");
    if (list.getAttribute("data-shown") !== failed.join("\n")) {
      list.setAttribute("data-shown", failed.join("\n"));
      list.textContent = "";
      failed.forEach(function (name, k) {
        if (k) list.appendChild(document.createTextNode(", "));
        list.appendChild(baton.el("a", { href: "#", "data-goto": name }, name));
      });
    }
    list.parentNode.hidden = !failed.length;
    document.getElementById("cancel").hidden = !(live.cancel && wf.state === "running");
  }

  function stepDuration(step) {
    if (step.started_at === null) return null;
    return (step.settled_at || end()) - step.started_at;
  }

  function buildStep(step) {
    var tr = baton.el("tr", { "data-step": step.name });
    var name = baton.el("td", { class: "name" }, step.name);
    var state = baton.el("td");
    var badge = baton.el("span", { class: "badge" });
    state.appendChild(badge);
    var attempt = baton.el("td", { class: "num" });
    var task = baton.el("td", { class: "task" }, step.task);
    var took = baton.el("td", { class: "num" });
    var errorCell = baton.el("td");
    var error = baton.el("div", { class: "error" });
    errorCell.appendChild(error);
    [name, state, attempt, task, took, errorCell].forEach(function (td) {
      tr.appendChild(td);
    });
    var row = baton.el("div", { class: "tl-row", "data-timeline": step.name });
    row.appendChild(baton.el("span", { class: "tl-name", title: step.name }, step.name));
    var track = baton.el("div", { class: "tl-track" });
    row.appendChild(track);
    ui[step.name] = { tr: tr, badge: badge, attempt: attempt, took: took, error: error, tl: row, track: track, bars: [] };
  }

  function drawStep(step) {
    var u = ui[step.name];
    u.tr.setAttribute("data-state", step.state);
    u.badge.textContent = step.state;
    u.badge.className = "badge s-" + step.state;
    u.attempt.textContent = step.attempt || "";
    u.took.textContent = baton.duration(stepDuration(step));
    u.error.textContent = step.error || "";
    u.error.title = step.error || "";
    var node = u.node;
    if (node) {
      node.setAttribute("data-state", step.state);
      node.setAttribute("class", "node s-" + step.state);
      var sub = node.querySelector(".sub");
      if (sub) sub.textContent = step.state + (step.attempt > 1 ? " · attempt " + step.attempt : "");
    }
  }

  // The timeline: a bar per attempt, placed on the workflow's time span so far.
  function drawBars(step) {
    var u = ui[step.name];
    var marks = step.runs.slice();
    if (!marks.length && step.settled_at !== null) marks.push([step.settled_at, step.settled_at, step.state]);
    while (u.bars.length < marks.length) {
      var bar = baton.el("span", { class: "tl-bar" });
      u.track.appendChild(bar);
      u.bars.push(bar);
    }
    var t0 = wf.created_at;
    var span = Math.max(end() - t0, 0.001);
    marks.forEach(function (run, k) {
      var bar = u.bars[k];
      var stop = run[1] === null ? end() : run[1];
      bar.style.left = (100 * (run[0] - t0)) / span + "%";
      bar.style.width = (100 * Math.max(stop - run[0], 0)) / span + "%";
      var state = run[1] === null ? "executing" : run[2];
      bar.className = "tl-bar s-" + state;
      bar.title = step.name + ": " + state + ", " + baton.duration(stop - run[0]);
    });
  }

  function drawAxis() {
    var axis = document.getElementById("tl-axis");
    var span = end() - wf.created_at;
    for (var k = 0; k <= 4; k++) axis.children[k].textContent = baton.duration((span * k) / 4);
  }

  // The summary and the timeline depend on every step and on the time span: they are
  // redrawn at most once a frame, however many events arrive.
  var frame = null;
  function drawLater() {
    if (frame === null) frame = requestAnimationFrame(drawAll);
  }

  function drawAll() {
    frame = null;
    names.forEach(function (n) {
      drawBars(steps[n]);
    });
    drawAxis();
    drawSummary();
  }

  function historyItem(ev) {
    var li = baton.el("li", { "data-seq": ev.seq });
    var at = new Date(ev.timestamp);
    li.appendChild(baton.el("time", {}, baton.time(at.getTime() / 1000) + "." + String(at.getMilliseconds()).padStart(3, "0")));
    if (ev.kind === "workflow_finished") {
      li.className = "finish s-" + ev.outcome;
      li.appendChild(baton.el("span", { class: "what" }, "workflow finished: " + ev.outcome));
      if (ev.failed_steps.length) li.appendChild(baton.el("span", { class: "err" }, "failed steps: " + ev.failed_steps.join(", ")));
      return li;
    }
    li.className = "s-" + ev.state;
    li.appendChild(baton.el("span", { class: "what" }, ev.step_name));
    li.appendChild(baton.el("span", { class: "badge s-" + ev.state }, ev.state));
    if (ev.attempt) li.appendChild(baton.el("span", { class: "attempt" }, "attempt " + ev.attempt));
    if (ev.error) li.appendChild(baton.el("span", { class: "err", title: ev.error }, ev.error));
    return li;
  }

  function addHistory(ev) {
    var follow = historyList.parentNode.scrollTop + historyList.parentNode.clientHeight >= historyList.parentNode.scrollHeight - 4;
    historyList.appendChild(historyItem(ev));
    document.getElementById("history-count").textContent = historyList.children.length + " events";
    if (follow) historyList.parentNode.scrollTop = historyList.parentNode.scrollHeight;
  }

  // --- first paint: the snapshot ----------------------------------------------------

  performance.mark("baton-start");
  page.detail.history.forEach(apply);
  var ordered = names.map(function (n) {
    return steps[n];
  });
  var nodes = batonGraph.draw(document.getElementById("graph"), ordered);
  performance.measure("baton-graph", "baton-start");
  if (names.length > 150) document.getElementById("graph-note").textContent = names.length + " steps: hover a step for its name";
  var table = document.createDocumentFragment();
  var timeline = document.getElementById("timeline");
  var axis = baton.el("div", { class: "tl-row tl-axis-row" });
  axis.appendChild(baton.el("span", { class: "tl-name" }, ""));
  var ticks = baton.el("div", { class: "tl-axis", id: "tl-axis" });
  for (var k = 0; k <= 4; k++) ticks.appendChild(baton.el("span", {}, ""));
  axis.appendChild(ticks);
  var rowsOfTimeline = document.createDocumentFragment();
  ordered.forEach(function (step) {
    buildStep(step);
    ui[step.name].node = nodes[step.name];
    table.appendChild(ui[step.name].tr);
    rowsOfTimeline.appendChild(ui[step.name].tl);
    drawStep(step);
    drawBars(step);
  });
  document.getElementById("steps").appendChild(table);
  timeline.appendChild(axis);
  timeline.appendChild(rowsOfTimeline);
  var items = document.createDocumentFragment();
  page.detail.history.forEach(function (ev) {
    items.appendChild(historyItem(ev));
  });
  historyList.appendChild(items);
  document.getElementById("history-count").textContent = historyList.children.length + " events";
  drawSummary();
  drawAxis();
  performance.mark("baton-ready");
  performance.measure("baton-first-render", "baton-start", "baton-ready");

  document.getElementById("fit").addEventListener("click", function (e) {
    var fitted = document.getElementById("graph").classList.toggle("fit");
    e.target.textContent = fitted ? "Actual size" : "Fit to width";
  });

  // Clicking a node, or a failed step's name, shows its row.
  function showRow(name) {
    var tr = ui[name] && ui[name].tr;
    if (!tr) return;
    tr.scrollIntoView({ block: "center" });
    tr.classList.add("flash");
    setTimeout(function () {
      tr.classList.remove("flash");
    }, 1200);
  }
  document.getElementById("graph").addEventListener("click", function (e) {
    var g = e.target.closest && e.target.closest("[data-node]");
    if (g) showRow(g.getAttribute("data-node"));
  });
  field("failed").addEventListener("click", function (e) {
    var name = e.target.getAttribute && e.target.getAttribute("data-goto");
    if (name === null) return;
    e.preventDefault();
    showRow(name);
  });

  document.getElementById("cancel").addEventListener("click", function (e) {
    if (!window.confirm("Cancel this workflow? Running steps finish; the rest are cancelled.")) return;
    e.target.disabled = true;
    e.target.textContent = "Cancelling…";
    var headers = {};
    headers[live.cancel_header[0]] = live.cancel_header[1];
    fetch(live.cancel, { method: "POST", headers: headers, credentials: "same-origin" }).then(function (r) {
      if (!r.ok) e.target.textContent = "Cancel failed (" + r.status + ")";
    });
  });

  // --- live -------------------------------------------------------------------------

  function onEvent(ev) {
    var changed = apply(ev);
    if (changed === null) return;
    if (changed !== true) drawStep(changed);
    addHistory(ev);
    if (ev.kind === "workflow_finished") {
      names.forEach(function (n) {
        drawStep(steps[n]);
      });
      drawAll(); // now: the page may be hidden, and frames are not drawn then
    } else {
      drawLater();
    }
  }

  var ticker = null;
  if (wf.state === "running") {
    var source = baton.stream(
      function () {
        return live.stream + "?after=" + seq;
      },
      {
        step: onEvent,
        finish: onEvent,
        end: function () {
          source.close();
          clearInterval(ticker);
          baton.live("finished");
        },
      }
    );
    ticker = setInterval(function () {
      // Time passes: running steps' durations grow, and the timeline's span.
      names.forEach(function (n) {
        var s = steps[n];
        if (s.runs.length && s.settled_at === null) drawStep(s);
      });
      drawLater();
    }, 1000);
  } else {
    baton.live("finished");
  }
})();
