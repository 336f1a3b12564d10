// The page's view of the proxy nodes the Qlik API lists, in a real browser (Debian's chromium,
// headless, driven by playwright-core). Run by tests/tests/page.rs against the real service and
// testkit's fake Qlik site: one node whose events carry hashed session ids, one that never sends.
//
//   node qlik_nodes.test.mjs '{"url": "...", "silent": "qs-rim1", "hashed": "qs-central"}'
//
// Exits 0 when every check passed; otherwise prints the failure and exits 1.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const plan = JSON.parse(process.argv[2] ?? '{}');
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'session-monitor-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: plan.chromium || '/usr/bin/chromium', headless: true, args: FLAGS,
  });
  const problems = [];
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
    await page.goto(plan.url);
    const row = (host) => `#proxies tbody tr[data-host="${host}"]`;
    await page.waitForSelector(`${row(plan.silent)}[data-silent="true"]`, { timeout: 15e3 })
      .catch(async () => { throw new Error(`no silent row for ${plan.silent}: ${await page.innerHTML('#proxies tbody')}`); });
    const mark = await page.textContent(`${row(plan.silent)} .mark`);
    if (!/silent/.test(mark)) throw new Error(`the silent node's mark says ${mark}`);
    console.log(`ok: ${plan.silent} is marked silent`);
    await page.waitForSelector('#proxies-silent:not([hidden])', { timeout: 5e3 });
    const note = await page.textContent('#proxies-silent');
    if (!note.includes(plan.silent)) throw new Error(`the note does not name ${plan.silent}: ${note}`);
    console.log(`ok: the note says: ${note}`);
    await page.waitForSelector(`${row(plan.hashed)}[data-ids-match="false"]`, { timeout: 5e3 })
      .catch(async () => { throw new Error(`${plan.hashed} is not shown with hashed ids: ${await page.innerHTML('#proxies tbody')}`); });
    const hashed = await page.textContent(`${row(plan.hashed)} .mark`);
    if (!/hashed/.test(hashed)) throw new Error(`${plan.hashed}'s mark says ${hashed}`);
    console.log(`ok: ${plan.hashed} shows its event ids are hashed (matched by count)`);
    const health = await page.textContent('#qlik-nodes');
    if (!/2 listed · 1 silent: .* · ids hashed on 1 /.test(health) || !health.includes(plan.silent)) {
      throw new Error(`the health panel says ${health}`);
    }
    console.log(`ok: health panel: ${health}`);
    if (problems.length) throw new Error(problems.join('\n'));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => process.exit(0), (e) => { console.error(`FAILED: ${e.message}`); process.exit(1); });
