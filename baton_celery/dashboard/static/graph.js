// baton dashboard: a layered layout of a workflow's steps, drawn in SVG, left to right.
//
// Each step goes in the layer after its deepest dependency (the longest path from a
// root), steps in a layer are ordered by the average row of their dependencies (one
// sweep: keeps edges short without the cost of crossing minimisation), and a layer
// taller than MAX_ROWS is wrapped into several columns, set closer together than the
// layers are. About linear in steps + edges: 1,000 steps lay out in milliseconds.
"use strict";

var batonGraph = (function () {
  var MAX_ROWS = 24;

  // steps: [{name, deps}] -> {pos: {name: {col, row, layer, height}}, columns, layers, rows}
  function layout(steps) {
    var byName = {};
    steps.forEach(function (s, i) {
      byName[s.name] = i;
    });
    // Kahn's order: a step's layer is known once all its dependencies' are.
    var waiting = steps.map(function () {
      return 0;
    });
    var dependents = steps.map(function () {
      return [];
    });
    steps.forEach(function (s, i) {
      s.deps.forEach(function (d) {
        if (d in byName) {
          waiting[i] += 1;
          dependents[byName[d]].push(i);
        }
      });
    });
    var layer = steps.map(function () {
      return 0;
    });
    var ready = [];
    waiting.forEach(function (n, i) {
      if (n === 0) ready.push(i);
    });
    var seen = 0;
    for (var head = 0; head < ready.length; head++) {
      var i = ready[head];
      seen += 1;
      dependents[i].forEach(function (j) {
        layer[j] = Math.max(layer[j], layer[i] + 1);
        waiting[j] -= 1;
        if (waiting[j] === 0) ready.push(j);
      });
    }
    var deepest = Math.max.apply(null, layer.concat([0]));
    if (seen < steps.length) {
      // A cycle (a store would never hold one): put what is left after everything else.
      waiting.forEach(function (n, i) {
        if (n > 0) layer[i] = deepest + 1;
      });
      deepest += 1;
    }
    var layers = [];
    for (var l = 0; l <= deepest; l++) layers.push([]);
    steps.forEach(function (s, i) {
      layers[layer[i]].push(i);
    });
    // Order each layer by the mean position of its dependencies in earlier layers.
    var row = new Array(steps.length);
    var pos = {};
    var column = 0;
    var tallest = 0;
    var band = 0; // layers placed so far
    layers.forEach(function (members) {
      if (!members.length) return;
      members.forEach(function (i, k) {
        var deps = steps[i].deps.filter(function (d) {
          return d in byName;
        });
        var sum = 0;
        deps.forEach(function (d) {
          sum += row[byName[d]];
        });
        members[k] = { i: i, key: deps.length ? sum / deps.length : k, k: k };
      });
      members.sort(function (a, b) {
        return a.key - b.key || a.k - b.k;
      });
      var height = Math.min(members.length, MAX_ROWS);
      tallest = Math.max(tallest, height);
      members.forEach(function (m, k) {
        row[m.i] = k;
        pos[steps[m.i].name] = { col: column + Math.floor(k / MAX_ROWS), row: k % MAX_ROWS, layer: band, height: height };
      });
      column += Math.ceil(members.length / MAX_ROWS);
      band += 1;
    });
    return { pos: pos, columns: column, layers: band, rows: tallest };
  }

  function short(text, max) {
    return text.length <= max ? text : text.slice(0, max - 1) + "…";
  }

  // Draw into <svg>: one <g data-node data-state> per step, one <path> per edge.
  // Returns {name: g} so that a live update can restyle a node.
  function draw(svgNode, steps) {
    var compact = steps.length > 150;
    var W = compact ? 132 : 176;
    var H = compact ? 24 : 42;
    var GX = compact ? 44 : 56; // between layers
    var GW = 10; // between the columns of one wrapped layer
    var GY = compact ? 8 : 14;
    var PAD = 12;
    var laid = layout(steps);
    var rows = Math.max(laid.rows, 1);
    var width = PAD * 2 + laid.columns * (W + GW) - GW + Math.max(laid.layers - 1, 0) * (GX - GW);
    var height = PAD * 2 + rows * (H + GY) - GY;
    svgNode.setAttribute("width", Math.max(width, 0));
    svgNode.setAttribute("height", Math.max(height, 0));
    svgNode.setAttribute("viewBox", "0 0 " + width + " " + height);
    svgNode.classList.toggle("compact", compact);
    function xy(name) {
      var p = laid.pos[name];
      var offset = ((rows - p.height) * (H + GY)) / 2; // a short layer is centered
      return { x: PAD + p.col * (W + GW) + p.layer * (GX - GW), y: PAD + offset + p.row * (H + GY) };
    }
    var edges = baton.svg("g", { class: "edges" });
    var nodes = baton.svg("g", { class: "nodes" });
    var out = {};
    steps.forEach(function (s) {
      var to = xy(s.name);
      s.deps.forEach(function (d) {
        if (!(d in laid.pos)) return;
        var from = xy(d);
        var x1 = from.x + W;
        var y1 = from.y + H / 2;
        var x2 = to.x;
        var y2 = to.y + H / 2;
        var bend = Math.max((x2 - x1) / 2, 16);
        edges.appendChild(baton.svg("path", {
          d: "M" + x1 + "," + y1 + " C" + (x1 + bend) + "," + y1 + " " + (x2 - bend) + "," + y2 + " " + x2 + "," + y2,
          "data-edge": d + "→" + s.name,
        }));
      });
      var g = baton.svg("g", { class: "node", "data-node": s.name, transform: "translate(" + to.x + "," + to.y + ")" });
      g.appendChild(baton.svg("title", {}, s.name + " (" + s.task + ")"));
      g.appendChild(baton.svg("rect", { width: W, height: H, rx: 5 }));
      g.appendChild(baton.svg("text", { x: 8, y: compact ? 16 : 17, class: "label" }, short(s.name, compact ? 17 : 22)));
      if (!compact) g.appendChild(baton.svg("text", { x: 8, y: 33, class: "sub" }, ""));
      nodes.appendChild(g);
      out[s.name] = g;
    });
    svgNode.textContent = "";
    svgNode.appendChild(edges);
    svgNode.appendChild(nodes);
    return out;
  }

  return { layout: layout, draw: draw, MAX_ROWS: MAX_ROWS };
})();
