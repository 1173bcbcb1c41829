// A screenshot of a Label Studio task with the gateway's prediction shown (the region and its
// per-region description), for docs/INTEGRATIONS.md; tests/tests/label_studio.rs runs it.
//   node tools/label_studio_screenshot.mjs BASE_URL EMAIL PASSWORD PROJECT TASK OUT.png
// Chromium is Debian's (CHROMIUM overrides /usr/bin/chromium), driven by the playwright-core the
// annotation page's browser test installs in gateway/web/node_modules.
import { createRequire } from "node:module";

const require = createRequire(new URL("../gateway/web/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const [base, email, password, project, task, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(`${base}/user/login/`);
  await page.fill('input[name="email"]', email);
  await page.fill('input[name="password"]', password);
  await Promise.all([page.waitForNavigation(), page.click('button[type="submit"], input[type="submit"]')]);
  await page.goto(`${base}/projects/${project}/data?tab=0&task=${task}`);
  // The editor draws regions on canvases; the per-region text shows in the region list.
  await page.waitForSelector("canvas", { timeout: 60000 });
  await page.waitForTimeout(4000);
  await page.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
}
