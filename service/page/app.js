// session-monitor's page: plain DOM, no framework, no dependency, no build step.
// Everything that comes from the network (user and host names above all) is written with
// textContent or as an SVG attribute value, never parsed as markup.

const MINUTE = 60e3;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const SVG = 'http://www.w3.org/2000/svg';
// Rows rendered at once: the rest is counted, so 10,000 users stay fast; the filter finds them.
const LIST_LIMIT = 200;
// The history's bucket per range (the API's `step`), and how many UTC days of peaks cover it.
const RANGES = {
  '24h': { span: DAY, step: '1m', per: 'minute', days: 2, words: 'the last 24 hours' },
  '7d': { span: 7 * DAY, step: '10m', per: '10 minutes', days: 8, words: 'the last 7 days' },
  '14d': { span: 14 * DAY, step: '20m', per: '20 minutes', days: 14, words: 'the last 14 days' },
};

const $ = (id) => document.getElementById(id);

const state = {
  counts: null, // {active_users, active_sessions, hosts: {host: users}}
  changedAt: null,
  status: null, // /api/v1/status
  statusError: null,
  users: [], // /api/v1/users, sorted by name
  lower: [], // the names in lower case, same order
  usersError: null,
  range: RANGES[location.hash.slice(1)] ? location.hash.slice(1) : '24h',
  history: null, // /api/v1/history
  peaks: null, // /api/v1/peaks
  historyError: null,
  skew: 0, // the server's clock minus ours, from the Date header (ms)
  mode: 'connecting',
};

const now = () => Date.now() + state.skew;

// ---- formatting -----------------------------------------------------------------------------

const numbers = new Intl.NumberFormat();
const clock = new Intl.DateTimeFormat(undefined, { hour: 'numeric', minute: '2-digit' });
const clockSeconds = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit',
});
const weekday = new Intl.DateTimeFormat(undefined, { weekday: 'short' });
const dayOfWeek = (t) => `${weekday.format(t)} ${new Date(t).getDate()}`;
const moment = new Intl.DateTimeFormat(undefined, {
  weekday: 'short', day: 'numeric', month: 'short', hour: 'numeric', minute: '2-digit',
});
const utcDay = new Intl.DateTimeFormat(undefined, {
  weekday: 'short', day: 'numeric', month: 'short', timeZone: 'UTC',
});

const int = (n) => (typeof n === 'number' ? numbers.format(n) : '–');
const plural = (n, word) => `${int(n)} ${word}${n === 1 ? '' : 's'}`;

function ago(ms, none = 'none since start') {
  if (typeof ms !== 'number') return none;
  const s = Math.max(0, Math.round((now() - ms) / 1000));
  if (s < 2) return 'just now';
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ago`;
  return `${Math.floor(h / 24)} days ago`;
}

function since(ms) {
  if (typeof ms !== 'number') return '';
  return now() - ms < 20 * HOUR ? clock.format(ms) : moment.format(ms);
}

// ---- network --------------------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, { cache: 'no-store', headers: { Accept: 'application/json' } });
  const date = Date.parse(response.headers.get('date') || '');
  if (!Number.isNaN(date)) {
    // The header has whole seconds: only a clear difference is a skew.
    const skew = date + 500 - Date.now();
    state.skew = Math.abs(skew) > 2000 ? skew : 0;
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && typeof body.error === 'string') message = body.error;
    } catch {
      // not JSON: the status line says enough
    }
    throw new Error(message);
  }
  return response.json();
}

// Runs `task` at most once per `gap` ms, never twice at once; a call while it runs runs it
// again afterwards, so the last call always sees fresh data.
function throttle(task, gap) {
  let last = -Infinity;
  let timer = 0;
  let running = false;
  let again = false;
  const run = async () => {
    timer = 0;
    if (running) {
      again = true;
      return;
    }
    running = true;
    last = performance.now();
    try {
      await task();
    } finally {
      running = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  };
  const schedule = () => {
    if (!timer) timer = setTimeout(run, Math.max(0, last + gap - performance.now()));
  };
  return schedule;
}

// ---- live count: server-sent events, polling while the stream is down -----------------------

let pollTimer = 0;
let polling = false;

function connect() {
  if (typeof EventSource !== 'function') {
    startPolling();
    return;
  }
  const source = new EventSource('api/v1/stream');
  source.addEventListener('open', () => {
    stopPolling();
    setMode('live');
  });
  source.addEventListener('counts', (event) => {
    stopPolling();
    setMode('live');
    onCounts(JSON.parse(event.data));
  });
  source.addEventListener('error', () => {
    // The browser retries by itself unless the stream is closed for good (a wrong answer).
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connect, 30e3);
    }
    startPolling();
  });
}

function startPolling() {
  if (pollTimer) return;
  pollTimer = setInterval(pollOnce, 1000);
  pollOnce();
}

function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = 0;
}

async function pollOnce() {
  if (polling) return;
  polling = true;
  try {
    const summary = await getJson('api/v1/summary');
    if (!pollTimer) return; // the stream came back meanwhile
    setMode('polling');
    onCounts({
      active_users: summary.active_users,
      active_sessions: summary.active_sessions,
      hosts: summary.active_users_per_host || {},
    });
  } catch {
    setMode('offline');
  } finally {
    polling = false;
  }
}

function setMode(mode) {
  if (state.mode === mode) return;
  state.mode = mode;
  const link = $('link');
  link.dataset.state = mode;
  link.textContent = {
    live: 'live',
    polling: 'polling every second',
    offline: 'service unreachable, retrying',
  }[mode] || 'connecting…';
}

function onCounts(counts) {
  const previous = state.counts;
  state.counts = counts;
  const changed = !previous
    || previous.active_users !== counts.active_users
    || previous.active_sessions !== counts.active_sessions
    || JSON.stringify(previous.hosts) !== JSON.stringify(counts.hosts);
  if (!changed) return;
  if (previous) state.changedAt = now();
  renderCount();
  renderProxies();
  followInChart(counts.active_users);
  refreshUsers();
  refreshStatus();
}

function renderCount() {
  const c = state.counts;
  const count = $('count');
  count.textContent = int(c.active_users);
  count.dataset.value = String(c.active_users);
  $('sessions').textContent = int(c.active_sessions);
  $('updated').textContent = state.changedAt
    ? `changed at ${clockSeconds.format(state.changedAt)}`
    : `as of ${clockSeconds.format(now())}`;
  document.title = `${int(c.active_users)} active · session-monitor`;
}

// ---- health and proxies ---------------------------------------------------------------------

async function loadStatus() {
  try {
    state.status = await getJson('api/v1/status');
    state.statusError = null;
  } catch (error) {
    state.statusError = error.message;
  }
  renderHealth();
  renderProxies();
}

function flag(element, ok, yes, no) {
  element.textContent = ok ? `✓ ${yes}` : `✗ ${no}`;
  element.className = ok ? 'ok' : 'bad';
  element.dataset.ok = String(Boolean(ok));
}

function renderHealth() {
  const s = state.status;
  if (!s) {
    $('mqtt').textContent = state.statusError ? 'unknown' : '–';
    $('mqtt').title = state.statusError || '';
    return;
  }
  flag($('mqtt'), s.mqtt_connected, 'connected', 'disconnected');
  $('mqtt').title = state.statusError ? `status unavailable: ${state.statusError}` : '';
  flag($('ready'), s.ready, 'ready', 'restoring');
  $('received').textContent = int(s.datagrams_received);
  const dropped = $('dropped');
  dropped.textContent = int(s.datagrams_dropped);
  dropped.className = s.datagrams_dropped > 0 ? 'warn' : '';
  const kernel = $('kernel');
  kernel.textContent = int(s.udp_kernel_drops);
  kernel.className = s.udp_kernel_drops > 0 ? 'bad' : '';
  $('last-event').textContent = ago(s.last_event);
  renderQlikNodes(s);
  $('version').textContent = s.version ? `v${s.version}` : '';
}

// The nodes the Qlik API lists: how many, which are silent (listed users, no event since the
// service started: their appender is not sending), and whether their event ids are the API's.
function renderQlikNodes(s) {
  const nodes = s.qlik_nodes ?? [];
  for (const e of document.querySelectorAll('.qlik')) e.hidden = nodes.length === 0;
  const out = $('qlik-nodes');
  const silent = s.silent_nodes ?? [];
  const hashed = nodes.filter((n) => n.up && n.heard_since_start && !n.event_ids_match_api).length;
  out.textContent = `${int(nodes.length)} listed · ${int(silent.length)} silent`
    + (silent.length ? `: ${silent.join(', ')}` : '')
    + ` · ids ${hashed ? `hashed on ${int(hashed)} (matched by count)` : 'match the API'}`;
  out.className = silent.length ? 'bad' : '';
  const note = $('proxies-silent');
  note.hidden = silent.length === 0;
  note.textContent = silent.length
    ? `Silent: ${silent.join(', ')}. The Qlik API lists sessions there, yet no event has arrived since the service started: the proxy's appender is not sending (see the Qlik set-up's troubleshooting).`
    : '';
}

function renderProxies() {
  const hosts = new Map();
  for (const h of state.status?.hosts ?? []) {
    hosts.set(h.host, {
      host: h.host, users: h.active_users, sessions: h.active_sessions, last: h.last_event,
    });
  }
  // Nodes the Qlik API lists are shown even before (or without) their first event.
  const nodes = new Map();
  for (const n of state.status?.qlik_nodes ?? []) {
    nodes.set(n.host.toLowerCase(), n);
    const known = [...hosts.keys()].some((h) => h.toLowerCase() === n.host.toLowerCase());
    if (!known) hosts.set(n.host, { host: n.host, users: 0, sessions: 0, last: null });
  }
  const live = state.counts?.hosts;
  if (live) {
    // The live counts are newer than the status: a host they leave out has no user now.
    for (const h of hosts.values()) h.users = live[h.host] ?? 0;
    for (const [host, users] of Object.entries(live)) {
      if (!hosts.has(host)) hosts.set(host, { host, users, sessions: null, last: null });
    }
  }
  const rows = [...hosts.values()].sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : 0));
  const most = Math.max(1, ...rows.map((r) => r.users || 0));
  const body = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement('tr');
    tr.dataset.host = r.host;
    const name = cell(tr, r.host, 'host');
    const share = document.createElement('span');
    share.className = 'share';
    const fill = document.createElement('span');
    fill.style.width = `${(100 * (r.users || 0)) / most}%`;
    share.append(fill);
    name.append(share);
    cell(tr, int(r.users), 'num users');
    cell(tr, int(r.sessions), 'num');
    cell(tr, ago(r.last, '–'), 'num last').title = r.last ? '' : 'no event since the service started';
    const node = nodes.get(r.host.toLowerCase());
    if (node) {
      tr.dataset.silent = String(node.silent);
      tr.dataset.idsMatch = String(node.event_ids_match_api);
      const mark = document.createElement('span');
      mark.className = node.silent ? 'mark bad' : 'mark muted';
      mark.textContent = node.silent ? ' silent' : node.event_ids_match_api ? ' ids = API' : ' ids hashed';
      mark.title = node.silent
        ? 'the Qlik API lists sessions here, yet no event has arrived since the service started'
        : node.event_ids_match_api
          ? "the events' session ids are the API's: sessions are matched by id"
          : "the events' session ids differ from the API's (a salted hash): sessions are matched by count";
      name.append(mark);
    }
    body.append(tr);
  }
  $('proxies').tBodies[0].replaceChildren(body);
  $('proxies-empty').hidden = rows.length > 0;
}

function cell(tr, text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  td.className = className;
  tr.append(td);
  return td;
}

// ---- users ----------------------------------------------------------------------------------

async function loadUsers() {
  try {
    const users = await getJson('api/v1/users');
    state.users = Array.isArray(users) ? users : [];
    state.lower = state.users.map((u) => String(u.name).toLowerCase());
    state.usersError = null;
  } catch (error) {
    state.usersError = error.message;
  }
  renderUsers();
}

function renderUsers() {
  const query = $('filter').value.trim().toLowerCase();
  const total = state.users.length;
  const rows = document.createDocumentFragment();
  let matched = 0;
  for (let i = 0; i < total; i += 1) {
    if (query && !state.lower[i].includes(query)) continue;
    matched += 1;
    if (matched <= LIST_LIMIT) rows.append(userRow(state.users[i], state.lower[i], query));
  }
  const list = $('users');
  list.replaceChildren(rows);
  list.dataset.total = String(total);
  list.dataset.matched = String(matched);
  let note;
  if (state.usersError) note = `User list unavailable: ${state.usersError}`;
  else if (query) note = `${int(matched)} of ${plural(total, 'user')} match`;
  else note = plural(total, 'user');
  $('users-count').textContent = note;
  let more = '';
  if (matched > LIST_LIMIT) {
    more = `${int(matched - LIST_LIMIT)} more not shown: refine the filter to find them`;
  } else if (query && matched === 0 && total > 0) {
    more = `No user name contains “${query}”.`;
  }
  $('users-more').textContent = more;
}

function userRow(user, lower, query) {
  const li = document.createElement('li');
  const name = document.createElement('span');
  name.className = 'name';
  const name_ = String(user.name);
  const at = query ? lower.indexOf(query) : -1;
  // Highlight only where lower-casing kept the length (it does not for a few scripts).
  if (at >= 0 && lower.length === name_.length) {
    const mark = document.createElement('mark');
    mark.textContent = name_.slice(at, at + query.length);
    name.append(name_.slice(0, at), mark, name_.slice(at + query.length));
  } else {
    name.textContent = name_;
  }
  const sessions = document.createElement('span');
  sessions.className = 'n';
  sessions.textContent = plural(user.sessions, 'session');
  const hosts = document.createElement('span');
  hosts.className = 'meta';
  hosts.textContent = Array.isArray(user.hosts) ? user.hosts.join(', ') : '';
  const first = document.createElement('span');
  first.className = 'meta n';
  first.textContent = `since ${since(user.first_seen)}`;
  li.title = `last event ${ago(user.last_seen)}`;
  li.append(name, sessions, hosts, first);
  return li;
}

// ---- history chart --------------------------------------------------------------------------

let historyRequest = 0;

async function loadHistory() {
  const request = ++historyRequest;
  await statusLoaded;
  const range = RANGES[state.range];
  const to = Math.round(now());
  const from = to - range.span;
  // The API takes 1 to the retention's whole days.
  const retention = state.status?.history?.retention_seconds;
  const most = typeof retention === 'number' ? Math.max(1, Math.floor(retention / 86400)) : 14;
  try {
    const [history, peaks] = await Promise.all([
      getJson(`api/v1/history?from=${from}&to=${to}&step=${range.step}`),
      getJson(`api/v1/peaks?days=${Math.min(range.days, most)}`),
    ]);
    if (request !== historyRequest) return;
    state.history = history;
    state.peaks = peaks;
    state.historyError = null;
  } catch (error) {
    if (request !== historyRequest) return;
    state.historyError = error.message;
  }
  renderToday();
  drawChart();
}

function todayUtc() {
  return new Date(now()).toISOString().slice(0, 10);
}

function renderToday() {
  const today = (state.peaks?.days ?? []).find((d) => d.date === todayUtc());
  $('today').textContent = today
    ? `Peak today (UTC): ${int(today.active_users)} at ${clock.format(today.at)}`
    : '';
}

// Between two loads, the live count extends the newest bucket and today's peak, so the chart
// follows at once.
function followInChart(users) {
  const today = (state.peaks?.days ?? []).find((d) => d.date === todayUtc());
  if (today && users > today.active_users) {
    today.active_users = users;
    today.at = now();
    renderToday();
  }
  const h = state.history;
  if (!h || !Array.isArray(h.times) || !h.total || !Array.isArray(h.total.max)) return;
  const step = h.step_seconds * 1000;
  const t = now();
  const n = h.times.length;
  if (n === 0 || t < h.times[n - 1]) return;
  if (t >= h.times[n - 1] + step) {
    if (t >= h.times[n - 1] + 2 * step) return; // a missed bucket: wait for the next load
    h.times.push(h.times[n - 1] + step);
    h.total.max.push(users);
    if (Array.isArray(h.total.last)) h.total.last.push(users);
    h.to = Math.max(h.to, h.times[n] + step);
  } else {
    h.total.max[n - 1] = Math.max(h.total.max[n - 1] ?? 0, users);
    if (Array.isArray(h.total.last)) h.total.last[n - 1] = users;
  }
  drawChartSoon();
}

let drawQueued = false;
function drawChartSoon() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    drawChart();
  });
}

function node(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function niceStep(raw) {
  if (raw <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  const f = raw / power;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * power;
}

// Tick times on local hour or day boundaries, at most one per `spacing` pixels.
function timeTicks(from, to, width, spacing) {
  const most = Math.max(2, Math.floor(width / spacing));
  const every = [HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY]
    .find((e) => (to - from) / e <= most) ?? 7 * DAY;
  const ticks = [];
  const d = new Date(from);
  if (every < DAY) {
    d.setMinutes(0, 0, 0);
    for (let t = d.getTime(); t <= to; t += HOUR) {
      if (t >= from && new Date(t).getHours() % (every / HOUR) === 0) ticks.push(t);
    }
  } else {
    d.setHours(0, 0, 0, 0);
    for (let i = 0; d.getTime() <= to; i += 1, d.setDate(d.getDate() + 1)) {
      const t = d.getTime();
      // Every other day counted from the Unix epoch, so the ticks do not move with `from`.
      const index = Math.round((t - d.getTimezoneOffset() * MINUTE) / DAY);
      if (t >= from && index % (every / DAY) === 0) ticks.push(t);
    }
  }
  const daily = every >= DAY;
  return ticks.map((t) => {
    const midnight = new Date(t).getHours() === 0 && new Date(t).getMinutes() === 0;
    return { t, label: daily || midnight ? dayOfWeek(t) : clock.format(t) };
  });
}

function drawChart() {
  const svg = $('chart');
  const width = svg.clientWidth;
  const height = svg.clientHeight;
  if (!width || !height) return;
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const range = RANGES[state.range];
  $('step').textContent = range.per;
  const h = state.history;
  const valid = h && Array.isArray(h.times) && h.total && Array.isArray(h.total.max);
  if (!valid) {
    const message = state.historyError ? `History unavailable: ${state.historyError}` : 'Loading…';
    svg.replaceChildren(node('text', {
      x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'empty',
    }, message));
    svg.setAttribute('aria-label', message);
    return;
  }
  const m = { left: 44, right: 14, top: 24, bottom: 24 };
  const from = h.from;
  const to = Math.max(h.to, from + 1);
  const step = h.step_seconds * 1000;
  const plotWidth = width - m.left - m.right;
  const x = (t) => Math.min(width - m.right,
    Math.max(m.left, m.left + ((t - from) / (to - from)) * plotWidth));
  const values = h.total.max;
  // A peak in the newest bucket may lie a little past `to`.
  const peaks = (state.peaks?.days ?? []).filter((d) => d.at >= from && d.at <= to + step);
  let top = 0;
  for (const v of values) if (typeof v === 'number' && v > top) top = v;
  for (const p of peaks) top = Math.max(top, p.active_users);
  const yStep = niceStep(top / 4);
  const yMax = Math.max(yStep, Math.ceil(top / yStep) * yStep);
  const y = (v) => height - m.bottom - (v / yMax) * (height - m.top - m.bottom);

  const parts = [];
  for (let v = 0; v <= yMax; v += yStep) {
    parts.push(node('line', {
      x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: 'grid',
    }));
    parts.push(node('text', { x: m.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, int(v)));
  }
  for (const tick of timeTicks(from, to, plotWidth, 64)) {
    const tx = x(tick.t);
    parts.push(node('line', {
      x1: tx, x2: tx, y1: m.top, y2: height - m.bottom, class: 'grid',
    }));
    parts.push(node('text', { x: tx, y: height - 7, 'text-anchor': 'middle' }, tick.label));
  }

  // The line breaks wherever a bucket has no data: the service was down, which is not a zero.
  let drawn = 0;
  let segment = [];
  const flush = () => {
    if (segment.length === 0) return;
    const first = segment[0];
    const last = segment[segment.length - 1];
    const data = {
      'data-from': first.t, 'data-to': last.t, 'data-max': Math.max(...segment.map((p) => p.v)),
    };
    if (segment.length === 1) {
      parts.push(node('circle', { cx: first.x, cy: first.y, r: 2.5, class: 'pt', ...data }));
    } else {
      const line = segment.map((p, i) => `${i ? 'L' : 'M'}${p.x.toFixed(1)} ${p.y.toFixed(1)}`).join('');
      const base = y(0).toFixed(1);
      parts.push(node('path', {
        d: `${line}L${last.x.toFixed(1)} ${base}L${first.x.toFixed(1)} ${base}Z`, class: 'area',
      }));
      parts.push(node('path', { d: line, class: 'line', ...data }));
    }
    drawn += segment.length;
    segment = [];
  };
  for (let i = 0; i < h.times.length; i += 1) {
    const v = values[i];
    if (typeof v !== 'number') {
      flush();
      continue;
    }
    const t = h.times[i];
    segment.push({ t, v, x: x(t + step / 2), y: y(v) });
  }
  flush();

  // Each UTC day's peak: a dot, and its number where there is room.
  const placed = [];
  for (const p of [...peaks].sort((a, b) => b.active_users - a.active_users)) {
    const px = x(p.at);
    const py = y(p.active_users);
    const dot = node('circle', {
      cx: px, cy: py, r: 4, class: 'peak', 'data-value': p.active_users, 'data-at': p.at,
    });
    const day = utcDay.format(Date.parse(`${p.date}T00:00:00Z`));
    dot.append(node('title', {}, `Peak of ${day} (UTC): ${plural(p.active_users, 'user')} at ${moment.format(p.at)}`));
    parts.push(dot);
    if (placed.every((other) => Math.abs(other - px) > 30)) {
      placed.push(px);
      const lx = Math.min(width - m.right - 12, Math.max(m.left + 12, px));
      parts.push(node('text', {
        x: lx, y: py - 8, 'text-anchor': 'middle', class: 'peak-label',
      }, int(p.active_users)));
    }
  }

  if (drawn === 0) {
    parts.push(node('text', {
      x: m.left + plotWidth / 2, y: (m.top + height - m.bottom) / 2, 'text-anchor': 'middle', class: 'empty',
    }, `No data for ${range.words} yet`));
  }

  // The value under the pointer.
  const cursor = node('line', { y1: m.top, y2: height - m.bottom, class: 'cursor', visibility: 'hidden' });
  const tip = node('g', { class: 'tip', visibility: 'hidden' });
  const tipBox = node('rect', { rx: 4, height: 20 });
  const tipText = node('text', {});
  tip.append(tipBox, tipText);
  const hit = node('rect', {
    x: m.left, y: m.top, width: plotWidth, height: height - m.top - m.bottom, fill: 'transparent',
  });
  parts.push(cursor, tip, hit);
  svg.replaceChildren(...parts);

  const show = (event) => {
    const box = svg.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * width;
    const t = from + ((px - m.left) / plotWidth) * (to - from);
    const first = h.times[0];
    if (first === undefined) return;
    const i = Math.min(h.times.length - 1, Math.max(0, Math.floor((t - first) / step)));
    const v = values[i];
    const cx = x(h.times[i] + step / 2);
    cursor.setAttribute('x1', cx);
    cursor.setAttribute('x2', cx);
    cursor.setAttribute('visibility', 'visible');
    tipText.textContent = `${moment.format(h.times[i])}: ${typeof v === 'number' ? plural(v, 'user') : 'no data'}`;
    tip.setAttribute('visibility', 'visible');
    const textWidth = tipText.getComputedTextLength() + 12;
    const left = cx + textWidth + 8 > width - m.right ? cx - textWidth - 6 : cx + 6;
    tipBox.setAttribute('x', left);
    tipBox.setAttribute('y', m.top);
    tipBox.setAttribute('width', textWidth);
    tipText.setAttribute('x', left + 6);
    tipText.setAttribute('y', m.top + 14);
  };
  const hide = () => {
    cursor.setAttribute('visibility', 'hidden');
    tip.setAttribute('visibility', 'hidden');
  };
  hit.addEventListener('pointermove', show);
  hit.addEventListener('pointerdown', show);
  hit.addEventListener('pointerleave', hide);

  const best = peaks.length ? Math.max(...peaks.map((p) => p.active_users)) : top;
  svg.setAttribute('aria-label', `Active users over ${range.words}; highest ${int(best)}`);
  svg.dataset.points = String(drawn);
}

function selectRange(name) {
  if (!RANGES[name]) return;
  state.range = name;
  for (const button of document.querySelectorAll('.ranges button')) {
    button.setAttribute('aria-pressed', String(button.dataset.range === name));
  }
  window.history.replaceState(null, '', `#${name}`);
  state.history = null;
  state.peaks = null;
  state.historyError = null;
  drawChart();
  loadHistory();
}

// ---- start ----------------------------------------------------------------------------------

const refreshUsers = throttle(loadUsers, 1000);
const refreshStatus = throttle(loadStatus, 1000);
// The history waits for the first status, which tells the retention.
const statusLoaded = loadStatus();
const refreshHistory = throttle(loadHistory, 1000);

function start() {
  for (const button of document.querySelectorAll('.ranges button')) {
    button.addEventListener('click', () => selectRange(button.dataset.range));
  }
  $('filter').addEventListener('input', renderUsers);
  new ResizeObserver(drawChartSoon).observe($('chart'));
  selectRange(state.range);
  connect();
  refreshUsers();
  // A hidden tab fetches nothing on timers (the live count still arrives) and catches up on return.
  const visible = (task) => () => {
    if (!document.hidden) task();
  };
  setInterval(visible(refreshUsers), 10e3);
  setInterval(visible(refreshStatus), 5e3);
  setInterval(visible(refreshHistory), 60e3);
  setInterval(() => {
    // "12 s ago" moves on by itself.
    renderHealth();
    renderProxies();
  }, 1000);
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) return;
    refreshUsers();
    refreshStatus();
    refreshHistory();
  });
}

start();
