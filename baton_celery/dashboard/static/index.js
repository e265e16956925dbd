// baton dashboard, the index: one row per workflow, kept current by the live stream.
// A row is <tr data-workflow-id data-state>; a summary replaces it only when its seq
// (the number of the workflow's latest event) is higher than the row's.
"use strict";

(function () {
  var page = baton.data();
  var live = page.live;
  var tbody = document.getElementById("rows");
  var empty = document.getElementById("empty");
  var rows = {}; // workflow id -> {summary, tr, cells}

  function workflowUrl(id) {
    return live.workflow_url.replace("WORKFLOW_ID", encodeURIComponent(id));
  }

  function makeRow(summary) {
    var tr = baton.el("tr", { "data-workflow-id": summary.id });
    var link = baton.el("a", { href: workflowUrl(summary.id), class: "name" });
    link.appendChild(baton.el("span", summary.label ? {} : { class: "nolabel" }, summary.label || "(no label)"));
    var id = baton.el("code", { class: "wid", title: summary.id }, summary.id.slice(0, 8));
    var name = baton.el("td");
    name.appendChild(link);
    name.appendChild(id);
    var state = baton.el("td");
    var badge = baton.el("span", { class: "badge" });
    state.appendChild(badge);
    var progress = baton.el("td", { class: "progress" });
    var bar = baton.el("span", { class: "bar" });
    var fill = baton.el("span");
    bar.appendChild(fill);
    var count = baton.el("span", { class: "count" });
    progress.appendChild(bar);
    progress.appendChild(count);
    var started = baton.el("td", { class: "num" });
    var took = baton.el("td", { class: "num" });
    var failed = baton.el("td", { class: "failed-steps" });
    [name, state, progress, started, took, failed].forEach(function (td) {
      tr.appendChild(td);
    });
    return { tr: tr, badge: badge, fill: fill, count: count, started: started, took: took, failed: failed };
  }

  function fillRow(row, s) {
    row.summary = s;
    row.tr.setAttribute("data-state", s.state);
    row.badge.textContent = s.state;
    row.badge.className = "badge s-" + s.state;
    row.fill.style.width = (s.total ? (100 * s.settled) / s.total : 0) + "%";
    row.fill.className = "s-" + s.state;
    row.count.textContent = s.settled + " / " + s.total;
    row.started.textContent = baton.time(s.created_at);
    tick(row);
    var failed = s.failed_steps;
    row.failed.textContent = failed.slice(0, 5).join(", ") + (failed.length > 5 ? " +" + (failed.length - 5) + " more" : "");
    row.failed.title = failed.join(", ");
  }

  function tick(row) {
    var s = row.summary;
    row.took.textContent = baton.duration((s.finished_at || baton.now()) - s.created_at);
  }

  function place(row) {
    // Newest first, by creation time.
    var created = row.summary.created_at;
    var next = null;
    for (var i = 0; i < tbody.children.length; i++) {
      var other = rows[tbody.children[i].getAttribute("data-workflow-id")];
      if (other && other.summary.created_at < created) {
        next = tbody.children[i];
        break;
      }
    }
    tbody.insertBefore(row.tr, next);
  }

  function show(summary) {
    var row = rows[summary.id];
    if (row) {
      if (summary.seq > row.summary.seq) fillRow(row, summary);
      return;
    }
    // A workflow the page does not show yet: a new one, on the first page only.
    if (!live.first_page || (live.state && live.state !== summary.state)) return;
    if (live.oldest !== null && summary.created_at < live.oldest) return; // a later page's
    row = rows[summary.id] = makeRow(summary);
    fillRow(row, summary);
    place(row);
    empty.hidden = true;
  }

  page.data.workflows.forEach(function (s) {
    var row = (rows[s.id] = makeRow(s));
    fillRow(row, s);
    tbody.appendChild(row.tr);
  });
  empty.hidden = page.data.workflows.length > 0;

  setInterval(function () {
    for (var id in rows) if (rows[id].summary.state === "running") tick(rows[id]);
  }, 1000);

  baton.stream(
    function () {
      return live.stream;
    },
    {
      workflow: show,
    }
  );
})();
