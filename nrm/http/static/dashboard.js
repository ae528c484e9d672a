// nrm live dashboard. Frames are complete snapshots pushed by the daemon a
// few times per second (api/v1/events); the only state kept here is the
// power series for the chart, because each frame carries only the points
// added since the previous one. All text is set with textContent: container
// and application names come from users and must never become markup.
(function () {
  'use strict';

  var WINDOW_S = 300;
  var points = [];          // [wall time s, node W], ascending
  var cap = null;
  var frames = 0;

  function $(id) { return document.getElementById(id); }
  function setText(id, text) { var el = $(id); if (el) { el.textContent = text; } }
  function watts(v) { return v === null || v === undefined ? '-' : v.toFixed(1) + ' W'; }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function duration(s) {
    s = Math.floor(s);
    if (s < 120) { return s + ' s'; }
    if (s < 7200) { return Math.floor(s / 60) + ' min'; }
    return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  }
  function cpulist(cpus) {
    var out = [], i = 0;
    while (i < cpus.length) {
      var j = i;
      while (j + 1 < cpus.length && cpus[j + 1] === cpus[j] + 1) { j++; }
      out.push(i === j ? String(cpus[i]) : cpus[i] + '-' + cpus[j]);
      i = j + 1;
    }
    return out.join(',');
  }
  // Level 1 (slowest) red through yellow to green at full speed.
  function levelColour(level, levels) {
    if (level === null || level === undefined) { return '#d1d5db'; }
    var f = Math.max(0, Math.min(1, (level - 1) / Math.max(1, levels - 1)));
    return 'hsl(' + Math.round(f * 120) + ', 70%, 55%)';
  }

  function replaceRows(tbody, rows) {
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function renderPackages(packages) {
    var keys = Object.keys(packages).sort(function (a, b) { return a - b; });
    replaceRows($('packages').tBodies[0], keys.map(function (k) {
      var p = packages[k], tr = el('tr');
      tr.id = 'package-' + k;
      tr.appendChild(el('td', k));
      tr.appendChild(el('td', watts(p.power_w)));
      tr.appendChild(el('td', watts(p.dram_power_w)));
      tr.appendChild(el('td', p.temperature_c === null || p.temperature_c === undefined
        ? '-' : p.temperature_c.toFixed(1) + ' \u00b0C'));
      return tr;
    }));
  }

  function renderCpus(info) {
    var strip = $('cpu-strip');
    if (!info || !info.ids) { strip.textContent = 'no hardware backend'; return; }
    var levels = info.levels || 16;
    if (strip.children.length !== info.ids.length) {
      while (strip.firstChild) { strip.removeChild(strip.firstChild); }
      info.ids.forEach(function (id) {
        var c = el('div', id, 'cpu');
        c.id = 'cpu-' + id;
        strip.appendChild(c);
      });
      var legend = $('cpu-legend');
      while (legend.firstChild) { legend.removeChild(legend.firstChild); }
      legend.appendChild(el('span', 'level 1 '));
      for (var l = 1; l <= levels; l++) {
        var s = el('span', null, 'swatch');
        s.style.background = levelColour(l, levels);
        legend.appendChild(s);
      }
      legend.appendChild(el('span', ' ' + levels + ' (full speed)'));
    }
    info.ids.forEach(function (id, i) {
      var c = $('cpu-' + id);
      var level = info.duty ? info.duty[i] : null;
      var freq = info.freq_hz ? info.freq_hz[i] : null;
      var owner = info.owner ? info.owner[i] : null;
      c.style.background = levelColour(level, levels);
      c.dataset.level = level === null || level === undefined ? '' : String(level);
      c.className = owner ? 'cpu owned' : 'cpu';
      c.title = 'cpu ' + id + ': level ' + (level === null ? '?' : level) + '/' + levels +
        (freq ? ', ' + (freq / 1e9).toFixed(2) + ' GHz' : '') +
        (owner ? ', container ' + owner : ', free');
    });
  }

  function renderContainers(list, waiting) {
    setText('containers-count', list.length);
    setText('containers-waiting', waiting);
    replaceRows($('containers').tBodies[0], list.map(function (c) {
      var tr = el('tr');
      tr.id = 'container-' + c.id;
      tr.appendChild(el('td', c.id));
      tr.appendChild(el('td', c.name));
      tr.appendChild(el('td', c.user));
      tr.appendChild(el('td', cpulist(c.cpus || [])));
      tr.appendChild(el('td', c.power));
      tr.appendChild(el('td', c.running_tasks + ' / ' + (c.tasks || []).length));
      var td = el('td');
      (c.apps || []).forEach(function (a) {
        var line = el('div');
        var bar = el('span', null, 'bar');
        bar.style.width = Math.min(120, Math.log10(1 + (a.rate || 0)) * 30) + 'px';
        line.appendChild(bar);
        line.appendChild(el('span', a.app + ': ' + a.progress + ' (' +
          (a.rate || 0).toFixed(1) + '/s)' + (a.running ? '' : ' done')));
        td.appendChild(line);
      });
      if (!c.apps || !c.apps.length) { td.textContent = '-'; }
      tr.appendChild(td);
      return tr;
    }));
  }

  function renderDecisions(list, total) {
    setText('decisions-total', total);
    replaceRows($('decisions').tBodies[0], list.slice().reverse().map(function (d) {
      var tr = el('tr');
      tr.appendChild(el('td', d.time ? new Date(d.time * 1000).toLocaleTimeString() : '-'));
      tr.appendChild(el('td', d.container));
      tr.appendChild(el('td', d.cpu === undefined ? '-' : d.cpu));
      tr.appendChild(el('td', d.control || d.event || '-'));
      tr.appendChild(el('td', d.old === undefined ? (d.message || '-') : d.old + ' \u2192 ' + d.new));
      tr.appendChild(el('td', d.reason || '-'));
      return tr;
    }));
  }

  function addPoints(newPoints, reset) {
    if (reset) { points = []; }
    var last = points.length ? points[points.length - 1][0] : -Infinity;
    newPoints.forEach(function (p) {
      if (p[0] > last && p[1] !== null) { points.push(p); last = p[0]; }
    });
    var cutoff = last - WINDOW_S;
    var drop = 0;
    while (drop < points.length && points[drop][0] < cutoff) { drop++; }
    if (drop) { points.splice(0, drop); }
  }

  function drawChart() {
    var canvas = $('power-chart');
    var ratio = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); }
    if (canvas.height !== Math.round(h * ratio)) { canvas.height = Math.round(h * ratio); }
    var g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    var left = 48, right = 8, top = 8, bottom = 20;
    var pw = w - left - right, ph = h - top - bottom;
    var tmax = points.length ? points[points.length - 1][0] : Date.now() / 1000;
    var tmin = tmax - WINDOW_S;
    var vmax = cap || 0;
    points.forEach(function (p) { if (p[1] > vmax) { vmax = p[1]; } });
    vmax = vmax > 0 ? vmax * 1.15 : 10;
    var step = Math.pow(10, Math.floor(Math.log10(vmax / 4)));
    if (vmax / step > 10) { step *= 2; }
    if (vmax / step > 10) { step *= 2.5; }
    g.font = '11px system-ui, sans-serif';
    g.fillStyle = '#6b7280';
    g.strokeStyle = '#e5e7eb';
    g.lineWidth = 1;
    for (var v = 0; v <= vmax; v += step) {
      var y = top + ph - (v / vmax) * ph;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
      g.fillText(v.toFixed(step < 1 ? 1 : 0) + ' W', 2, y + 4);
    }
    for (var m = 0; m <= WINDOW_S; m += 60) {
      var x = left + pw - (m / WINDOW_S) * pw;
      g.fillText(m ? '-' + m / 60 + ' min' : 'now', Math.min(x - 10, left + pw - 24), h - 4);
    }
    if (cap) {
      var cy = top + ph - (cap / vmax) * ph;
      g.strokeStyle = '#dc2626';
      g.setLineDash([5, 4]);
      g.beginPath(); g.moveTo(left, cy); g.lineTo(left + pw, cy); g.stroke();
      g.setLineDash([]);
    }
    if (points.length < 2) { return; }
    g.strokeStyle = '#2563eb';
    g.lineWidth = 1.5;
    g.beginPath();
    points.forEach(function (p, i) {
      var px = left + ((p[0] - tmin) / WINDOW_S) * pw;
      var py = top + ph - (p[1] / vmax) * ph;
      if (i === 0) { g.moveTo(px, py); } else { g.lineTo(px, py); }
    });
    g.stroke();
  }

  function apply(frame) {
    frames++;
    setText('frames', frames);
    setText('version', 'nrmd ' + frame.version);
    setText('backend', (frame.backend || 'no hardware') +
      (frame.emulated && frame.backend !== 'emulated' ? ' (emulated)' : ''));
    setText('uptime', duration(frame.uptime_s || 0));
    setText('node-power', watts(frame.node_power_w));
    $('node-power').dataset.watts = frame.node_power_w === null ? '' : String(frame.node_power_w);
    cap = frame.cap_w;
    setText('node-cap', cap ? watts(cap) : 'none');
    renderPackages(frame.packages || {});
    renderCpus(frame.cpus);
    renderContainers(frame.containers || [], frame.waiting || 0);
    renderDecisions(frame.decisions || [], frame.decisions_total || 0);
    setText('tasks-started', (frame.tasks || {}).tasks_started || 0);
    setText('tasks-finished', (frame.tasks || {}).tasks_finished || 0);
    addPoints(frame.points || [], frame.history);
    drawChart();
  }

  function state(name) {
    var b = $('conn-state');
    b.dataset.state = name;
    b.textContent = name;
  }

  function poll() {
    // Fallback for browsers without EventSource: one frame per second.
    fetch('api/v1/live').then(function (r) { return r.json(); }).then(function (f) {
      state('live'); apply(f);
    }).catch(function () { state('error'); }).then(function () { setTimeout(poll, 1000); });
  }

  function connect() {
    if (!window.EventSource) { poll(); return; }
    var source = new EventSource('api/v1/events');
    source.addEventListener('state', function (e) {
      state('live');
      apply(JSON.parse(e.data));
    });
    // EventSource reconnects by itself (the server sends retry: 2000).
    source.onerror = function () { state(source.readyState === 2 ? 'error' : 'reconnecting'); };
  }

  window.addEventListener('resize', drawChart);
  connect();
}());
