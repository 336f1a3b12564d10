// The page at `/` in a real browser: Debian's chromium, headless, driven by playwright-core.
// Run by tests/tests/page.rs, which starts the real service, sends datagrams, restarts it and
// passes what the page must show as one JSON argument:
//
//   node page.test.mjs '{"url": "http://127.0.0.1:PORT/", "udp": "127.0.0.1:PORT", ...}'
//
// Exits 0 when every check passed; otherwise prints the failure and exits 1.

import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const plan = JSON.parse(process.argv[2] ?? '{}');
const executablePath = plan.chromium || '/usr/bin/chromium';
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const results = [];
function ok(what) {
  results.push(what);
  console.log(`ok: ${what}`);
}
function check(condition, what) {
  if (!condition) throw new Error(what);
}

const [udpHost, udpPort] = plan.udp.split(/:(?=\d+$)/);
const socket = dgram.createSocket(udpHost.includes(':') ? 'udp6' : 'udp4');
const send = (datagram) => new Promise((resolve, reject) => {
  socket.send(Buffer.from(datagram), Number(udpPort), udpHost, (e) => (e ? reject(e) : resolve()));
});
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Everything the browser reports that a user would call a fault.
function watch(page, problems, ignore = () => false) {
  page.on('console', (m) => {
    if ((m.type() === 'error' || m.type() === 'warning') && !ignore(m.location().url || m.text())) {
      problems.push(`console ${m.type()}: ${m.text()} (${m.location().url})`);
    }
  });
  page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  page.on('requestfailed', (r) => {
    if (!ignore(r.url())) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400 && !ignore(r.url())) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
}

const count = (page) => page.$eval('#count', (e) => e.dataset.value ?? null);
const names = (page) => page.$$eval('#users li .name', (list) => list.map((e) => e.textContent));

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'session-monitor-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 800 },
    locale: 'en-US',
    colorScheme: 'light',
  });
  const problems = [];
  try {
    const page = context.pages()[0] ?? await context.newPage();
    watch(page, problems);
    await page.goto(plan.url);

    // The count the datagrams produced, over the live stream (not the polling fallback).
    await page.waitForSelector(`#count[data-value="${plan.count}"]`, { timeout: 10e3 })
      .catch(async () => { throw new Error(`the page shows ${await count(page)} users, not ${plan.count}`); });
    await page.waitForSelector('#link[data-state="live"]', { timeout: 5e3 });
    ok(`shows ${plan.count} users, live over server-sent events`);

    // Per proxy and health.
    await page.waitForFunction(
      (hosts) => [...document.querySelectorAll('#proxies tbody tr')].map((r) => r.dataset.host).join() === hosts.join(),
      plan.hosts,
      { timeout: 5e3 },
    ).catch(() => { throw new Error(`the proxies table does not list ${plan.hosts.join(', ')}`); });
    const perHost = await page.$$eval('#proxies tbody tr', (rows) => Object.fromEntries(
      rows.map((r) => [r.dataset.host, Number(r.querySelector('.users').textContent.replace(/\D/g, ''))]),
    ));
    check(JSON.stringify(perHost) === JSON.stringify(plan.per_host), `per-proxy users ${JSON.stringify(perHost)}, expected ${JSON.stringify(plan.per_host)}`);
    ok(`per-proxy users ${JSON.stringify(perHost)}`);
    await page.waitForSelector(`#mqtt[data-ok="${plan.mqtt_connected}"]`, { timeout: 5e3 })
      .catch(() => { throw new Error(`the health panel does not say MQTT ${plan.mqtt_connected ? '' : 'dis'}connected`); });
    ok(`health: MQTT connected=${plan.mqtt_connected}`);

    // History restored from the checkpoint: a drawn point from before the restart holding the
    // peak that only existed then, and that day's peak marked.
    await page.waitForFunction(
      ({ peak, before }) => [...document.querySelectorAll('#chart [data-max]')]
        .some((e) => Number(e.dataset.max) === peak && Number(e.dataset.from) < before),
      plan.restored,
      { timeout: 10e3 },
    ).catch(async () => {
      const drawn = await page.$$eval('#chart [data-max]', (l) => l.map((e) => ({ ...e.dataset })));
      throw new Error(`the chart draws no point of ${plan.restored.peak} users before the restart (${plan.restored.before}): ${JSON.stringify(drawn)}`);
    });
    const peakMark = await page.$(`#chart circle.peak[data-value="${plan.restored.peak}"]`);
    check(peakMark, `the day's peak of ${plan.restored.peak} is not marked on the chart`);
    ok(`chart: ${await page.getAttribute('#chart', 'data-points')} points drawn, the pre-restart peak of ${plan.restored.peak} among them and marked`);

    // The chart's ranges redraw from the API.
    for (const range of ['7d', '14d', '24h']) {
      await page.click(`.ranges button[data-range="${range}"]`);
      await page.waitForFunction(
        (peak) => [...document.querySelectorAll('#chart [data-max]')].some((e) => Number(e.dataset.max) === peak),
        plan.restored.peak,
        { timeout: 5e3 },
      ).catch(() => { throw new Error(`the ${range} chart does not draw the restored peak`); });
    }
    ok('7 d, 14 d and 24 h ranges draw the restored peak');

    // A change is followed within a second.
    await page.waitForFunction((n) => document.querySelectorAll('#users li').length === n, plan.count);
    const sent = Date.now();
    await send(plan.live.datagram);
    await page.waitForFunction(
      (n) => document.querySelector('#count').dataset.value === String(n),
      plan.live.count,
      { timeout: 1000, polling: 'raf' },
    ).catch(async () => { throw new Error(`a new user was not shown within 1 s (shows ${await count(page)})`); });
    ok(`followed a new datagram in ${Date.now() - sent} ms (${plan.count} -> ${plan.live.count})`);
    await page.waitForFunction((n) => document.querySelectorAll('#users li').length === n, plan.live.count, { timeout: 5e3 })
      .catch(() => { throw new Error('the user list did not follow the count'); });
    ok(`the list follows: ${plan.live.count} rows`);
    await page.waitForFunction((host) => {
      const row = document.querySelector(`#proxies tr[data-host="${host}"] .last`);
      return /just now|s ago/.test(row?.textContent) && /just now|s ago/.test(document.querySelector('#last-event').textContent);
    }, plan.live.host, { timeout: 7e3 }).catch(async () => {
      throw new Error(`no recent last event for ${plan.live.host}: ${await page.textContent('#proxies tbody')} / ${await page.textContent('#last-event')}`);
    });
    ok(`health and ${plan.live.host} show the last event: ${await page.textContent('#last-event')}`);

    // The filter narrows the list to the matching user, case-insensitively.
    await page.fill('#filter', plan.filter.text.toUpperCase());
    await page.waitForFunction(() => document.querySelectorAll('#users li').length <= 1);
    const matched = await names(page);
    check(matched.length === 1 && matched[0] === plan.filter.match, `filter "${plan.filter.text}" shows ${JSON.stringify(matched)}`);
    await page.fill('#filter', 'no such user at all');
    check((await names(page)).length === 0, 'a filter matching nobody still lists users');
    check((await page.textContent('#users-more')).includes('No user name contains'), 'no "no match" note');
    await page.fill('#filter', '');
    check((await names(page)).length === plan.live.count, 'clearing the filter does not list everyone again');
    ok(`filter "${plan.filter.text.toUpperCase()}" lists only ${matched[0]}`);

    // Readable on a phone: nothing wider than the screen.
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(200);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `at 390 px the page is ${overflow} px wider than the screen`);
    await page.setViewportSize({ width: 1280, height: 800 });
    ok('no horizontal scrolling at 390 px');

    if (plan.screenshot) {
      await page.mouse.move(0, 0);
      await page.evaluate(() => document.activeElement?.blur());
      await sleep(300); // the chart redraws for the restored width on the next frame
      fs.mkdirSync(path.dirname(plan.screenshot), { recursive: true });
      await page.screenshot({ path: plan.screenshot });
      ok(`screenshot ${plan.screenshot} (1280x800)`);
    }

    // User names come from the network: shown as text, never as markup.
    await send(plan.literal.datagram);
    await page.fill('#filter', 'onerror');
    await page.waitForFunction((n) => document.querySelectorAll('#users li').length === 1, null, { timeout: 5e3 })
      .catch(() => { throw new Error('the user with markup in its name is not listed'); });
    check((await names(page))[0] === plan.literal.name, `the name shows as ${JSON.stringify(await names(page))}`);
    check((await page.$$('#users img, #users b, #users script')).length === 0, 'a user name became markup');
    await page.fill('#filter', '');
    ok(`a name with markup shows as text: ${plan.literal.name}`);

    // 10,000 more users: the list renders a bounded number of rows and the filter stays fast.
    const base = plan.live.count + 1;
    const bulk = plan.bulk;
    for (let i = 0; i < bulk.users; i += 100) {
      const batch = [];
      for (let j = i; j < Math.min(bulk.users, i + 100); j += 1) {
        batch.push(send(bulk.template.replaceAll('{i}', String(j).padStart(5, '0'))));
      }
      await Promise.all(batch);
      await sleep(2);
    }
    const total = base + bulk.users;
    await page.waitForSelector(`#count[data-value="${total}"]`, { timeout: 20e3 })
      .catch(async () => { throw new Error(`after ${bulk.users} more users the page shows ${await count(page)}, not ${total}`); });
    await page.waitForSelector(`#users[data-total="${total}"]`, { timeout: 15e3 });
    const rows = (await names(page)).length;
    const more = await page.textContent('#users-more');
    check(rows <= 200 && /more/.test(more), `${rows} rows and "${more}" for ${total} users`);
    const timing = await page.evaluate(({ one, wide }) => {
      const filter = document.querySelector('#filter');
      const time = (text) => {
        const start = performance.now();
        filter.value = text;
        filter.dispatchEvent(new Event('input'));
        return { ms: performance.now() - start, rows: document.querySelectorAll('#users li').length };
      };
      const result = { one: time(one), wide: time(wide), clear: time('') };
      return result;
    }, { one: bulk.one, wide: bulk.wide });
    check(timing.one.rows === 1, `filter "${bulk.one}" shows ${timing.one.rows} rows among ${total}`);
    check(timing.wide.ms < 250 && timing.one.ms < 250 && timing.clear.ms < 250, `filtering ${total} users is slow: ${JSON.stringify(timing)}`);
    ok(`${total} users: ${rows} rows and "${more}"; filter "${bulk.one}" in ${timing.one.ms.toFixed(1)} ms, "${bulk.wide}" in ${timing.wide.ms.toFixed(1)} ms, cleared in ${timing.clear.ms.toFixed(1)} ms`);

    // Without the stream, the page polls the summary.
    const fallback = await context.newPage();
    const stream = (url) => url.includes('/api/v1/stream');
    const fallbackProblems = [];
    watch(fallback, fallbackProblems, stream);
    await fallback.route('**/api/v1/stream', (route) => route.abort());
    await fallback.goto(plan.url);
    await fallback.waitForSelector(`#count[data-value="${total}"]`, { timeout: 10e3 });
    await fallback.waitForSelector('#link[data-state="polling"]', { timeout: 5e3 });
    await fallback.close();
    problems.push(...fallbackProblems);
    ok('without the stream it polls the summary and shows the same count');

    // A bucket without data (the service was down) breaks the line: it is never drawn as zero.
    const gaps = await context.newPage();
    watch(gaps, problems, stream);
    await gaps.route('**/api/v1/history?*', async (route) => {
      const real = await (await route.fetch()).json();
      const n = real.times.length;
      const max = real.times.map(() => null);
      [max[n - 6], max[n - 5], max[n - 4], max[n - 1]] = [4, 5, 3, 2];
      real.total = { max, last: max };
      await route.fulfill({ json: real });
    });
    await gaps.route('**/api/v1/peaks?*', (route) => route.fulfill({ json: { days: [] } }));
    // The live count, which extends the newest bucket, agrees with it.
    await gaps.route('**/api/v1/stream', (route) => route.abort());
    await gaps.route('**/api/v1/summary', (route) => route.fulfill({
      json: { active_users: 2, active_sessions: 2, active_users_per_host: {}, hosts: [], users: [] },
    }));
    await gaps.goto(plan.url);
    await gaps.waitForSelector('#chart [data-max]');
    const drawn = await gaps.$$eval('#chart [data-max]', (l) => l.map((e) => `${e.tagName}:${e.dataset.max}`));
    check(drawn.join() === 'path:5,circle:2', `buckets 4 5 3 _ _ 2 are drawn as ${drawn.join()}`);
    await gaps.close();
    ok('a gap in the history breaks the line (a path, then a lone point), never a zero');

    check(problems.length === 0, `the browser reported:\n  ${problems.join('\n  ')}`);
    ok('no console error or warning, no failed request');
  } finally {
    await context.close();
    socket.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().then(
  () => {
    console.log(`page: all ${results.length} checks passed`);
  },
  (error) => {
    console.error(`FAILED: ${error.message}`);
    console.log(`page: failed after ${results.length} checks`);
    process.exitCode = 1;
  },
);
