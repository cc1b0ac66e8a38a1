// Gangway: the live list of Harbor's public services, fed by the public event stream.
//
// The stream starts with a snapshot and then sends one event per change (`service` upserts a
// whole service, `service_removed` drops it), so the page never patches fields piecemeal: a
// service is always drawn from one complete, current entry. A snapshot replaces every row, which
// is what makes a reconnect (resumed, or after a restart) free of stale and duplicated rows.
'use strict';

(() => {
  const STREAM = '/api/v1/catalog/events';
  const $ = (id) => document.getElementById(id);
  const ui = {
    rows: $('rows'),
    table: $('services'),
    filter: $('filter'),
    count: $('count'),
    nomatch: $('nomatch'),
    empty: $('empty'),
    conn: $('conn'),
    connText: $('conn-text'),
    compact: $('compact'),
  };

  // Storage can be unavailable (private modes, strict policies); the page works without it.
  const store = {
    get(k) { try { return localStorage.getItem(k); } catch { return null; } },
    set(k, v) { try { localStorage.setItem(k, v); } catch { /* not remembered */ } },
  };

  /** name → <tr>; each row carries its service as `_svc`, its search text as `_key`. */
  const rows = new Map();
  /** Rows with leases, for the countdown tick. */
  const leased = new Set();
  let status = null;
  let statusAt = 0;
  /** Server clock minus ours, so that countdowns are right on a machine whose clock is off. */
  let clockOffset = 0;
  let loaded = false;
  let query = '';
  let sortKey = 'name';
  let sortDir = 1;

  // ---------------------------------------------------------------- rendering

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  /** The URL a person opens for one host of an HTTP service, through the proxy. */
  function urlFor(host, path) {
    const port = status && status.proxy_port;
    const hostPort = port && port !== 80 ? `${host}:${port}` : host;
    return `http://${hostPort}${path || '/'}`;
  }

  function addressCell(svc) {
    const td = h('td', { role: 'cell', class: 'addr', 'data-label': 'Address' });
    if (svc.protocol !== 'http') {
      // A tcp service's names, if it has any, are its certificate's or its SNI names.
      const names = (svc.hosts || []).length ? ` (${svc.hosts.join(', ')})` : '';
      const kind = svc.protocol === 'tcp' ? 'tcp' : 'tls';
      td.append(h('span', { class: 'mono', text: `${kind} ${svc.listen || ''}${names}` }));
      return td;
    }
    for (const host of svc.hosts || []) {
      const label = `${host}${svc.path && svc.path !== '/' ? svc.path : ''}`;
      // A wildcard host names many sites, none of which can be opened as such.
      td.append(host.includes('*')
        ? h('span', { class: 'mono', text: label })
        : h('a', { href: urlFor(host, svc.path), class: 'mono', text: label }));
    }
    return td;
  }

  function expiresMs(u) {
    const t = u.expires_at ? Date.parse(u.expires_at) : NaN;
    return Number.isNaN(t) ? null : t;
  }

  function upstreamItem(svc, u, leases) {
    const li = h('li');
    if (u.healthy === true) li.append(h('span', { class: 'health up', text: '● up' }));
    else if (u.healthy === false) li.append(h('span', { class: 'health down', text: '▼ down' }));
    li.append(h('span', { class: 'mono', text: u.addr }));
    if (typeof u.in_flight === 'number') {
      li.append(h('span', { class: 'load', text: `${u.in_flight} in flight` }));
    }
    const exp = expiresMs(u);
    // With one upstream its lease is the service's, shown in the Lease column already.
    if (exp !== null && svc.upstreams.length > 1) {
      const ttl = h('span', { class: 'ttl' });
      leases.push({ node: ttl, exp, ttl: (u.ttl_secs || 0) * 1000, prefix: '' });
      li.append(ttl);
    }
    return li;
  }

  function render(svc) {
    const leases = [];
    const tr = h('tr', { role: 'row', 'data-name': svc.name, 'data-kind': svc.kind });
    tr.append(h('th', { role: 'rowheader', scope: 'row', text: svc.name }));
    tr.append(addressCell(svc));
    tr.append(h('td', { role: 'cell', 'data-label': 'Kind' }, h('span', { class: `kind ${svc.kind}`, text: svc.kind })));
    const ups = h('ul', { class: 'ups' });
    for (const u of svc.upstreams || []) ups.append(upstreamItem(svc, u, leases));
    if (!svc.upstreams || svc.upstreams.length === 0) ups.append(h('li', { class: 'muted', text: 'none' }));
    tr.append(h('td', { role: 'cell', 'data-label': 'Upstreams' }, ups));
    const strategy = h('td', { role: 'cell', 'data-label': 'Strategy', class: 'mono', text: svc.strategy || '' });
    if (svc.shadow) {
      // A candidate picking beside the live strategy: how often the two chose alike.
      const a = svc.shadow.agreement;
      const agree = typeof a === 'number' ? `${Math.round(a * 100)} % agree` : 'no picks yet';
      strategy.append(h('span', { class: 'shadow', text: `shadow ${svc.shadow.strategy}: ${agree}` }));
    }
    tr.append(strategy);

    const leaseTd = h('td', { role: 'cell', 'data-label': 'Lease' });
    let last = null;
    for (const u of svc.upstreams || []) {
      const exp = expiresMs(u);
      if (exp !== null && (!last || exp > last.exp)) last = { exp, ttl: (u.ttl_secs || 0) * 1000 };
    }
    if (last) {
      // The service lives as long as its longest lease; each upstream shows its own as well.
      const node = h('time', { class: 'lease', datetime: new Date(last.exp).toISOString() });
      leases.push({ node, exp: last.exp, ttl: last.ttl, prefix: '' });
      leaseTd.append(node);
    } else {
      leaseTd.append(h('span', { class: 'muted', text: svc.kind === 'static' ? 'static' : '–' }));
    }
    tr.append(leaseTd);

    tr._svc = svc;
    tr._key = [svc.name, ...(svc.hosts || []), svc.listen || ''].join(' ').toLowerCase();
    tr._leases = leases;
    tr._expires = last ? last.exp : Infinity;
    tr.hidden = !matches(tr);
    tickRow(tr, serverNow());
    return tr;
  }

  // ---------------------------------------------------------------- lease countdowns

  function serverNow() {
    return Date.now() + clockOffset;
  }

  function fmt(ms) {
    const s = Math.ceil(ms / 1000);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
  }

  function tickRow(tr, now) {
    for (const l of tr._leases) {
      const left = l.exp - now;
      // A client renews about every third of its TTL: under a third left means renewals are
      // being missed.
      const warnAt = Math.max(3000, l.ttl / 3);
      const state = left <= 0 ? 'gone' : left <= warnAt ? 'warn' : '';
      const text = left <= 0 ? 'expiring…' : fmt(left);
      if (l.node.textContent !== text) l.node.textContent = text;
      const cls = `${l.node.classList.contains('lease') ? 'lease' : 'ttl'}${state ? ` ${state}` : ''}`;
      if (l.node.className !== cls) l.node.className = cls;
      if (l.node.classList.contains('lease')) {
        l.node.setAttribute('aria-label', left <= 0 ? 'lease expiring' : `lease ends in ${text}`);
      }
    }
  }

  function tick() {
    const now = serverNow();
    for (const tr of leased) if (!tr.hidden) tickRow(tr, now);
    renderUptime();
  }

  // ---------------------------------------------------------------- order and filter

  function sortValue(tr) {
    const s = tr._svc;
    switch (sortKey) {
      case 'kind': return s.kind;
      case 'strategy': return s.strategy || '';
      case 'address': return s.protocol !== 'http' ? `~${s.listen}` : ((s.hosts || [])[0] || '');
      case 'lease': return tr._expires;
      default: return s.name;
    }
  }

  function compare(a, b) {
    const x = sortValue(a);
    const y = sortValue(b);
    let c = 0;
    if (typeof x === 'number' && typeof y === 'number') c = x === y ? 0 : x < y ? -1 : 1;
    else c = String(x).localeCompare(String(y));
    if (c === 0) c = a._svc.name < b._svc.name ? -1 : a._svc.name > b._svc.name ? 1 : 0;
    return c * sortDir;
  }

  function place(tr) {
    for (const other of ui.rows.children) {
      if (compare(tr, other) < 0) {
        ui.rows.insertBefore(tr, other);
        return;
      }
    }
    ui.rows.append(tr);
  }

  function resort() {
    const sorted = [...rows.values()].sort(compare);
    ui.rows.append(...sorted);
    for (const th of ui.table.tHead.querySelectorAll('th[data-sort]')) {
      if (th.dataset.sort === sortKey) th.setAttribute('aria-sort', sortDir > 0 ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    }
  }

  function matches(tr) {
    return query === '' || tr._key.includes(query);
  }

  function applyFilter() {
    query = ui.filter.value.trim().toLowerCase();
    for (const tr of rows.values()) {
      const hide = !matches(tr);
      if (tr.hidden !== hide) tr.hidden = hide;
    }
    updateCounts();
    tick();
  }

  function updateCounts() {
    let shown = 0;
    for (const tr of rows.values()) if (!tr.hidden) shown += 1;
    const total = rows.size;
    const noun = total === 1 ? 'service' : 'services';
    const text = query ? `${shown} of ${total} ${noun}` : `${total} public ${noun}`;
    // A live region: touch it only when it says something new.
    if (ui.count.textContent !== text) ui.count.textContent = text;
    ui.empty.hidden = !loaded || total > 0;
    ui.table.hidden = loaded && total === 0;
    ui.nomatch.hidden = !(total > 0 && shown === 0);
    if (!ui.nomatch.hidden) ui.nomatch.textContent = `No service matches “${ui.filter.value.trim()}”.`;
  }

  // ---------------------------------------------------------------- applying the stream

  function upsert(svc) {
    const old = rows.get(svc.name);
    const tr = render(svc);
    rows.set(svc.name, tr);
    leased.delete(old);
    if (tr._leases.length) leased.add(tr);
    if (old && compare(tr, old) === 0 && old.parentNode) {
      old.replaceWith(tr);
    } else {
      if (old) old.remove();
      place(tr);
    }
    updateCounts();
  }

  function removeService(name) {
    const old = rows.get(name);
    if (!old) return;
    old.remove();
    rows.delete(name);
    leased.delete(old);
    updateCounts();
  }

  function applySnapshot(data) {
    setStatus(data.status);
    rows.clear();
    leased.clear();
    for (const svc of data.services || []) {
      const tr = render(svc);
      rows.set(svc.name, tr);
      if (tr._leases.length) leased.add(tr);
    }
    ui.rows.replaceChildren();
    resort();
    loaded = true;
    if (store.get('gangway.compact') === null) setCompact(rows.size > 100, false);
    updateCounts();
    // How many snapshots this page has applied (a reconnect after a restart makes it two).
    document.documentElement.dataset.snapshot = String(Number(document.documentElement.dataset.snapshot || 0) + 1);
  }

  // ---------------------------------------------------------------- status strip

  function setStatus(s) {
    if (!s) return;
    status = s;
    statusAt = Date.now();
    if (typeof s.server_time_ms === 'number') clockOffset = s.server_time_ms - Date.now();
    $('st-backend').textContent = s.backend;
    const sync = $('st-sync');
    if (s.in_sync === true) { sync.textContent = 'in sync'; sync.className = 'ok'; }
    else if (s.in_sync === false) { sync.textContent = 'out of sync'; sync.className = 'bad'; }
    else { sync.textContent = s.backend === 'embedded' ? 'built in' : 'unknown'; sync.className = ''; }
    $('st-plugins').textContent = String(s.plugins);
    $('st-version').textContent = s.version;
    renderHttps(s.https);
    renderUptime();
  }

  // Whether every service that asks for HTTPS has its certificate; the operator's API says which
  // do not, and why.
  function renderHttps(https) {
    const node = $('st-https');
    if (!https) { node.textContent = 'off'; node.className = ''; return; }
    const n = https.problems;
    node.textContent = n === 0 ? 'ok' : `${n} without certificate`;
    node.className = n === 0 ? 'ok' : 'bad';
  }

  function renderUptime() {
    if (!status) return;
    const secs = status.uptime_secs + Math.floor((Date.now() - statusAt) / 1000);
    const d = Math.floor(secs / 86400);
    const text = d > 0 ? `${d}d ${fmt(((secs % 86400) * 1000) || 1000)}` : fmt(Math.max(secs, 1) * 1000);
    const node = $('st-uptime');
    if (node.textContent !== text) node.textContent = text;
  }

  // ---------------------------------------------------------------- connection

  let source = null;
  let lastId = '';
  let retryTimer = 0;
  let retryDelay = 1000;

  function setConn(state) {
    ui.conn.dataset.state = state;
    ui.connText.textContent = state === 'live' ? 'Live' : state === 'reconnecting' ? 'Reconnecting…' : 'Connecting…';
    document.body.classList.toggle('stale', state !== 'live');
  }

  function connect() {
    clearTimeout(retryTimer);
    // EventSource sends Last-Event-ID itself when it reconnects; a new EventSource (after the
    // browser gave up) carries it in the URL instead.
    const url = lastId ? `${STREAM}?last_event_id=${encodeURIComponent(lastId)}` : STREAM;
    const es = new EventSource(url);
    source = es;
    es.onopen = () => {
      retryDelay = 1000;
      setConn('live');
    };
    es.onerror = () => {
      if (source !== es) return;
      setConn('reconnecting');
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        retryTimer = setTimeout(connect, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 15000);
      }
    };
    const on = (type, apply) => es.addEventListener(type, (e) => {
      if (source !== es) return;
      let data;
      try { data = JSON.parse(e.data); } catch { return; }
      if (e.lastEventId) lastId = e.lastEventId;
      apply(data);
    });
    on('snapshot', applySnapshot);
    on('service', (d) => upsert(d.service));
    on('service_removed', (d) => removeService(d.name));
    on('load', (d) => { for (const svc of d.services || []) upsert(svc); });
    on('backend', (d) => {
      // Another proxy now, on its own port: a fresh snapshot brings its name and every link.
      if (d.state === 'swapped') {
        es.close();
        lastId = '';
        connect();
        return;
      }
      if (status && typeof d.in_sync === 'boolean') setStatus({ ...status, in_sync: d.in_sync });
    });
    on('tls', (d) => {
      if (status && typeof d.problems === 'number') {
        status.https = { problems: d.problems };
        renderHttps(status.https);
      }
    });
    on('plugin', (d) => {
      if (status && typeof d.plugins === 'number') {
        status.plugins = d.plugins;
        $('st-plugins').textContent = String(d.plugins);
      }
    });
  }

  // ---------------------------------------------------------------- controls

  function setCompact(on, remember) {
    document.body.classList.toggle('compact', on);
    ui.compact.setAttribute('aria-pressed', String(on));
    if (remember) store.set('gangway.compact', on ? '1' : '0');
  }

  ui.filter.addEventListener('input', applyFilter);
  ui.filter.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && ui.filter.value) {
      ui.filter.value = '';
      applyFilter();
    }
  });
  $('tools').addEventListener('submit', (e) => e.preventDefault());
  ui.compact.addEventListener('click', () => setCompact(!document.body.classList.contains('compact'), true));
  for (const th of ui.table.tHead.querySelectorAll('th[data-sort]')) {
    th.querySelector('button').addEventListener('click', () => {
      if (sortKey === th.dataset.sort) sortDir = -sortDir;
      else { sortKey = th.dataset.sort; sortDir = 1; }
      resort();
    });
  }
  document.addEventListener('keydown', (e) => {
    const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
    if (e.key === '/' && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
      e.preventDefault();
      ui.filter.focus();
    }
  });

  const stored = store.get('gangway.compact');
  if (stored !== null) setCompact(stored === '1', false);
  setInterval(tick, 1000);
  connect();
})();
