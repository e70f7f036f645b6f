// Drives prism's /ui page in headless Chromium (Debian's) with playwright-core:
// `node ui.mjs http://127.0.0.1:PORT USER PASSWORD SCREENSHOT.png`.
// Checks that the page shows the counter, a broadcast sent with its own form,
// a ticker price and a message over the GraphQL subscription, also one sent
// while its socket was down (it resumes from the last eventId); saves a
// screenshot; prints what it saw as JSON. Exits 1 on any failure.
import { chromium } from 'playwright-core';

const [base, user, password, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
let ok = false;
const seen = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(15_000);
  await page.goto(`${base}/ui`);

  await page.waitForFunction(() => Number(document.getElementById('counter').textContent) >= 2);
  seen.counter = await page.textContent('#counter');

  await page.waitForFunction(() => !Number.isNaN(parseFloat(document.getElementById('ticker-price').textContent)));
  seen.ticker = await page.textContent('#ticker-price');

  await page.fill('#login-user', user);
  await page.fill('#login-pass', password);
  await page.click('#login-button');
  await page.waitForFunction(() => document.getElementById('login-state').textContent.startsWith('logged in'));

  const text = `hello from the browser ${Date.now()}`;
  await page.fill('#broadcast-input', text);
  await page.click('#broadcast-button');
  await page.waitForFunction((t) => document.getElementById('stream-list').textContent.includes(t), text);
  seen.broadcast = text;

  await page.waitForFunction(() => document.getElementById('gql-dot').classList.contains('live'));
  const chat = `chat from the browser ${Date.now()}`;
  await page.fill('#message-input', chat);
  await page.click('#message-button');
  await page.waitForFunction((t) => document.getElementById('gql-list').textContent.includes(t), chat);
  await page.waitForFunction((t) => document.getElementById('named-list').textContent.includes(t), chat);
  seen.subscription = chat;

  // The subscription's socket drops; a message sent before it is back
  // reaches the page once it has resumed from its last eventId.
  const missed = `sent while the socket was down ${Date.now()}`;
  const wasDown = await page.evaluate(async (t) => {
    gql.close();
    const r = await fetch('/messages', {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify({ content: t }),
    });
    if (r.status !== 201) throw new Error(`POST /messages: ${r.status}`);
    return !document.getElementById('gql-dot').classList.contains('live');
  }, missed);
  if (!wasDown) throw new Error('the GraphQL socket was still up when the message was sent');
  await page.waitForFunction((t) => document.getElementById('gql-list').textContent.includes(t), missed);
  seen.resumed = missed;

  await page.waitForFunction(() => Number(document.getElementById('stat-requests').textContent) > 0);
  seen.requests = await page.textContent('#stat-requests');

  await page.screenshot({ path: screenshot, fullPage: true });
  ok = true;
} catch (e) {
  console.error(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
process.exit(ok ? 0 : 1);
