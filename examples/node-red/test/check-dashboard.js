// Opens the dashboard in headless Chromium, waits until every expectation holds, and saves a
// screenshot: the browser half of tests/tests/node_red.rs (which starts mosquitto, the service and
// Node-RED first).
//
//   node test/check-dashboard.js URL SCREENSHOT.png 'SELECTOR=TEXT'... [--next 'SELECTOR=TEXT'...]...
//
// An expectation holds when some element matching SELECTOR has TEXT as its text (whitespace
// collapsed, e.g. a table row `qs1 1`). The page is a client-side Vue app fed over socket.io, so
// this waits on the rendered page, not on the HTML. `--next` starts another phase on the same open
// page: when a phase holds, this prints `phase N ok` and waits for a line on stdin (the caller
// changes something meanwhile) before it waits for the next phase, so later phases check live
// updates. The screenshot is taken when the first phase holds (or when it fails). Exits 0, or 1
// after CHECK_TIMEOUT_MS (default 60000) for a phase, naming what was missing, with the page's
// text.
const { chromium } = require('playwright-core')

async function main () {
  const [url, screenshot, ...specs] = process.argv.slice(2)
  if (!url || !screenshot) {
    console.error('usage: check-dashboard.js URL SCREENSHOT.png [SELECTOR=TEXT]...')
    process.exit(2)
  }
  const phases = [[]]
  for (const spec of specs) {
    if (spec === '--next') {
      phases.push([])
      continue
    }
    const at = spec.indexOf('=')
    if (at < 1) throw new Error(`not SELECTOR=TEXT: ${spec}`)
    phases[phases.length - 1].push({ selector: spec.slice(0, at), text: spec.slice(at + 1) })
  }
  const stdin = require('readline').createInterface({ input: process.stdin })
  const lines = stdin[Symbol.asyncIterator]()
  const timeout = Number(process.env.CHECK_TIMEOUT_MS || 60000)
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Playwright gives each launch a fresh profile; nothing reaches out of this machine.
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'
    ]
  })
  let missing = []
  let text = ''
  let phase = 0
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } })
    page.on('pageerror', (error) => console.error(`page error: ${error.message}`))
    await page.goto(url, { waitUntil: 'load', timeout })
    for (; phase < phases.length; phase++) {
      if (phase > 0) {
        console.log(`phase ${phase} ok`)
        if ((await lines.next()).done) throw new Error(`stdin closed before phase ${phase + 1}`)
      }
      const deadline = Date.now() + timeout
      for (;;) {
        missing = await page.evaluate((expectations) => {
          const norm = (s) => (s || '').replace(/\s+/g, ' ').trim()
          return expectations.filter(({ selector, text }) =>
            ![...document.querySelectorAll(selector)].some((el) => norm(el.innerText) === text))
        }, phases[phase])
        if (missing.length === 0 || Date.now() > deadline) break
        await page.waitForTimeout(200)
      }
      if (phase === 0) {
        // Let the chart finish its animation before the picture.
        await page.waitForTimeout(missing.length === 0 ? 1500 : 0)
        await page.screenshot({ path: screenshot, fullPage: true })
      }
      if (missing.length > 0) break
    }
    text = await page.evaluate(() => document.body.innerText)
  } finally {
    stdin.close()
    await browser.close()
  }
  if (missing.length > 0) {
    console.error(`phase ${phase + 1}: not on the page after ${timeout} ms:`)
    for (const { selector, text } of missing) console.error(`  ${selector} = ${JSON.stringify(text)}`)
    console.error(`--- page text ---\n${text}`)
    process.exit(1)
  }
  console.log(`phase ${phases.length} ok`)
}

main().catch((error) => {
  console.error(error)
  process.exit(1)
})
