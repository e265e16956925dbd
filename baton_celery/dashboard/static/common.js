// baton dashboard: helpers shared by the pages. Every text from a workflow (labels,
// step and task names, errors) goes into the page as textContent, never as HTML.
"use strict";

var baton = (function () {
  var TERMINAL = { completed: true, discarded: true, cancelled: true };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      for (var key in attrs) {
        if (attrs[key] !== null && attrs[key] !== undefined) node.setAttribute(key, attrs[key]);
      }
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function pad(n) {
    return (n < 10 ? "0" : "") + n;
  }

  // A Unix time as local HH:MM:SS, with the date when it is not today.
  function time(unix) {
    if (unix === null || unix === undefined) return "";
    var d = new Date(unix * 1000);
    var clock = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    if (d.toDateString() === new Date().toDateString()) return clock;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + clock;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) return "";
    if (seconds < 0) seconds = 0;
    if (seconds < 10) return seconds.toFixed(2) + " s";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    var m = Math.floor(seconds / 60);
    if (m < 60) return m + " min " + Math.floor(seconds % 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function now() {
    return Date.now() / 1000;
  }

  function data() {
    return JSON.parse(document.getElementById("baton-data").textContent);
  }

  // The "live" indicator in the top bar: idle, connecting, live, retrying, finished, busy.
  var LIVE_TEXT = {
    idle: "",
    connecting: "connecting…",
    live: "live",
    retrying: "reconnecting…",
    finished: "finished",
    busy: "server busy: live updates paused",
  };

  function live(state) {
    var node = document.getElementById("live");
    if (!node) return;
    node.setAttribute("data-live", state);
    node.textContent = LIVE_TEXT[state] || state;
  }

  // An EventSource that reports its state, and starts over when the server refused it
  // (503 when too many pages are open) instead of giving up as browsers do. ``url`` is
  // called at each start: it says where the page is.
  function stream(url, handlers) {
    var source = null;
    var stopped = false;
    function open() {
      live("connecting");
      source = new EventSource(url());
      source.onopen = function () {
        live("live");
      };
      source.onerror = function () {
        if (stopped) return;
        if (source.readyState === EventSource.CLOSED) {
          live("busy");
          setTimeout(function () {
            if (!stopped) open();
          }, 10000);
        } else {
          live("retrying");
        }
      };
      for (var name in handlers) {
        source.addEventListener(name, (function (handle) {
          return function (message) {
            handle(JSON.parse(message.data));
          };
        })(handlers[name]));
      }
    }
    open();
    return {
      close: function () {
        stopped = true;
        if (source) source.close();
      },
    };
  }

  return {
    TERMINAL: TERMINAL,
    el: el,
    svg: svg,
    time: time,
    duration: duration,
    now: now,
    data: data,
    live: live,
    stream: stream,
  };
})();
