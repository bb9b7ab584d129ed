// Drives the chat page in headless Chromium (see browser-test.sh for the environment).
const { chromium } = require("playwright-core");

const url = process.env.URL;
const out = process.env.OUT;
const expectFake = process.env.EXPECT_FAKE === "1";

function check(cond, message) {
  if (!cond) throw new Error("browser test failed: " + message);
}

(async () => {
  const context = await chromium.launchPersistentContext(process.env.PROFILE, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 420, height: 760 }, // phone-sized: the page must stay usable
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    const consoleErrors = [];
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    // Only the server under test may be contacted.
    await page.route("**/*", (route) => {
      const u = new URL(route.request().url());
      if (u.hostname === "127.0.0.1") return route.continue();
      consoleErrors.push("blocked external request " + u.href);
      return route.abort();
    });
    await page.goto(url, { waitUntil: "load" });
    await page.waitForFunction(() => document.getElementById("model").textContent.length > 0);

    const input = page.locator("#input");
    await input.fill("Hello there, browser!");
    await input.press("Enter");
    await page.waitForSelector(".msg.user");
    // Streaming: the reply grows over several animation frames before it is complete.
    const lengths = new Set();
    const t0 = Date.now();
    while (Date.now() - t0 < 30000) {
      const partial = await page.locator(".msg.assistant .bubble").last().textContent().catch(() => "");
      lengths.add((partial || "").length);
      if (await page.locator(".msg.assistant.done").count()) break;
      await page.waitForTimeout(15);
    }
    const reply = await page.locator(".msg.assistant.done .bubble").last().textContent();
    check(reply && reply.length > 0, "an assistant reply appeared");
    check(lengths.size >= 3, "the reply streamed in (saw lengths " + [...lengths].join(",") + ")");
    if (expectFake) check(reply === "echo: Hello there, browser!" || reply.startsWith("echo: Hello there, browser! #"), "reply text: " + reply);
    await page.screenshot({ path: out + "/chat.png", fullPage: true });

    await input.fill("/temperature 0.5");
    await input.press("Enter");
    check((await page.locator(".msg.system").last().textContent()).includes("0.5"), "/temperature answers");

    await input.fill("/clear");
    await input.press("Enter");
    check((await page.locator(".msg").count()) === 0, "/clear empties the conversation");
    await page.screenshot({ path: out + "/cleared.png", fullPage: true });
    check(consoleErrors.length === 0, "console errors: " + consoleErrors.join(" | "));
    console.log("browser test passed: reply " + JSON.stringify(reply) + ", streamed in " + lengths.size + " sizes; screenshots in " + out);
  } finally {
    await context.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
