// The annotation page in a real browser (Debian's Chromium driven by Playwright) against
// `gateway local --serve` (real worker binaries, real MobileSAM): open the sample photo, click,
// compare the page's mask with what the Segment API returns for the same prompt, accept and read
// the description, refine, draw a box, run everything mode, ask, export COCO and check the file,
// import it back, undo; a bad file, an image over the pixel limit, a missing or wrong API key and
// a SAM worker that is down show the server's messages and lose no region; after a gateway
// restart the page registers its image again.
//
// node test/browser.mjs GATEWAY_BINARY [SCREENSHOT.png]
// Prints the median click-to-mask latency; exits non-zero on the first failed check.

import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import * as zlib from "node:zlib";
import * as esbuild from "esbuild";
import { chromium } from "playwright-core";

const here = fileURLToPath(new URL(".", import.meta.url));
const repo = join(here, "../../..");
const [gatewayBinary, screenshotPath] = process.argv.slice(2);
if (!gatewayBinary) throw new Error("usage: node test/browser.mjs GATEWAY_BINARY [SCREENSHOT.png]");
const samplePath = join(repo, "tests/fixtures/vision/photo.png");
const sample = readFileSync(samplePath);
const [WIDTH, HEIGHT] = [sample.readUInt32BE(16), sample.readUInt32BE(20)];

// The generated client and the page's RLE code, bundled for Node on the fly.
const bundle = esbuild.buildSync({
  entryPoints: [join(here, "api.ts")],
  bundle: true,
  platform: "node",
  format: "esm",
  write: false,
  logLevel: "warning",
});
const api = await import(`data:text/javascript;base64,${Buffer.from(bundle.outputFiles[0].text).toString("base64")}`);

const cleanups = [];
let checks = 0;
function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
  checks++;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Starts a process; resolves once a stdout line matches `ready`, with the output so far. */
function start(command, args, ready, timeoutMs) {
  const child = spawn(command, args, { cwd: repo, stdio: ["ignore", "pipe", "pipe"] });
  // SIGINT: `gateway local` then stops its worker processes too.
  cleanups.push(async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGINT");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  });
  let output = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${command} not ready in ${timeoutMs} ms:\n${output}`)), timeoutMs);
    const onData = (data) => {
      output += data;
      if (ready.test(output)) {
        clearTimeout(timer);
        resolve({ child, output: () => output });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", (data) => (output += data));
    child.on("exit", (code) => reject(new Error(`${command} exited (${code}) during start:\n${output}`)));
  });
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

function iou(a, b) {
  let inter = 0;
  let union = 0;
  for (let i = 0; i < a.length; i++) {
    inter += a[i] & b[i];
    union += a[i] | b[i];
  }
  return union ? inter / union : 1;
}

const imageKey = (key) => ({ source: { case: "key", value: key } });

/** The mask the Segment API returns for a prompt, chosen as the page chooses (best predicted IoU). */
async function apiMask(client, key, prompt) {
  const response = await client.segment({ image: imageKey(key), prompts: [prompt] });
  const masks = response.prompts[0].masks;
  const best = masks.reduce((a, b) => (b.predictedIou > a.predictedIou ? b : a), masks[0]);
  const rle = best.mask;
  const counts = rle.counts.case === "compressed" ? api.decompressRuns(rle.counts.value) : rle.counts.value.counts;
  return api.decodeRuns(counts, rle.width, rle.height).data;
}

/** The page's state, with masks as plain arrays. */
function pageState(page) {
  return page.evaluate(() => {
    const s = window.ospreyPage;
    return {
      key: s.image?.key,
      regions: s.regions.map((r) => ({ id: r.id, text: r.text, status: r.status, task: r.task, mask: Array.from(r.mask.data) })),
      current: {
        points: s.current.points,
        box: s.current.box,
        mask: s.current.mask ? Array.from(s.current.mask.data) : null,
      },
      answers: s.answers,
      clickToMaskMs: s.clickToMaskMs,
    };
  });
}

/** Page coordinates of an image pixel. */
async function at(page, x, y) {
  const box = await page.locator("#overlay").boundingBox();
  return [box.x + ((x + 0.5) / WIDTH) * box.width, box.y + ((y + 0.5) / HEIGHT) * box.height];
}

async function click(page, x, y, button = "left") {
  const before = await page.evaluate(() => window.ospreyPage.clickToMaskMs.length);
  const [px, py] = await at(page, x, y);
  await page.mouse.click(px, py, { button });
  await page.waitForFunction((n) => window.ospreyPage.clickToMaskMs.length > n, before, { timeout: 30_000 });
}

async function idle(page, timeout = 120_000) {
  await page.waitForFunction(() => document.body.dataset.busy === "false", null, { timeout });
}

/** A PNG of only a signature, an IHDR declaring `width` x `height` (8-bit RGB) and an IEND. */
function pngHeaderOnly(width, height) {
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const length = Buffer.alloc(4);
    length.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(body));
    return Buffer.concat([length, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([signature, chunk("IHDR", ihdr), chunk("IEND", Buffer.alloc(0))]);
}

/** The server's answer to a call that fails, as the page shows it ("Code: message"). */
async function serverError(call) {
  try {
    await call();
  } catch (error) {
    return `${api.Code[error.code]}: ${error.rawMessage}`;
  }
  return "no error";
}

async function errorText(page) {
  await page.locator("#error").waitFor({ state: "visible", timeout: 30_000 });
  return page.locator("#error-text").textContent();
}

async function openSample(page) {
  await page.locator("#file").setInputFiles(samplePath);
  await page.locator("#canvas-box").waitFor({ state: "visible", timeout: 60_000 });
  await page.waitForFunction(() => document.body.dataset.samReady === "true", null, { timeout: 120_000 });
}

async function main() {
  const [grpcPort, httpPort, keyedGrpcPort, keyedHttpPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
  const started = Date.now();
  const local = await start(
    gatewayBinary,
    ["local", "--serve", "--listen", `127.0.0.1:${grpcPort}`, "--http-listen", `127.0.0.1:${httpPort}`, "--max-new-tokens", "8"],
    /Serving until ctrl-c/,
    240_000,
  );
  const pageUrl = `http://127.0.0.1:${httpPort}/`;
  check(local.output().includes(`annotation page: ${pageUrl}`), "gateway local prints the page URL");
  check(local.output().includes("SAM: the official MobileSAM weights"), "MobileSAM is in use (tools/setup_test_env.sh fetches it)");
  console.log(local.output().match(/workers ready in [\d.]+s/)?.[0]);
  console.log(`gateway local --serve ready in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  // A second gateway with an API key, in front of the same workers.
  const workers = local.output().match(/vision (\S+), llm (\S+), sam (\S+)\)/);
  check(workers, "gateway local prints its workers' addresses");
  const startKeyed = () =>
    start(
      gatewayBinary,
      [
        "serve", "--listen", `127.0.0.1:${keyedGrpcPort}`, "--http-listen", `127.0.0.1:${keyedHttpPort}`,
        "--vision-workers", workers[1], "--llm-workers", workers[2], "--sam-workers", workers[3], "--api-key", "sesame",
      ],
      /serving HTTP/,
      60_000,
    ).catch((error) => {
      throw new Error(`gateway serve --api-key: ${error.message}`);
    });
  let keyedGateway = await startKeyed();
  const client = api.client(pageUrl);

  const profile = mkdtempSync(join(tmpdir(), "osprey-chromium-"));
  cleanups.push(() => rmSync(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1280, height: 760 },
    acceptDownloads: true,
  });
  cleanups.push(() => context.close());
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(error.message));

  // ---- open the sample ----
  await page.goto(pageUrl);
  await page.waitForFunction(() => document.body.dataset.ready === "true");
  await openSample(page);
  const registered = await client.registerImage({ encoded: sample });
  let state = await pageState(page);
  check(state.key === registered.key, "the page registered the image (same key as the API gives)");
  check((await page.locator("#error").isHidden()), "no error after opening the sample");

  // ---- a click: the page's mask is SAM's mask for that point ----
  const point = [75, 60];
  await click(page, ...point);
  state = await pageState(page);
  const expected = await apiMask(client, registered.key, {
    points: [{ x: state.current.points[0].x, y: state.current.points[0].y, label: api.PointLabel.FOREGROUND }],
    multimaskOutput: true,
  });
  const clickMask = state.current.mask;
  const clickArea = clickMask.reduce((a, b) => a + b, 0);
  check(iou(clickMask, expected) > 0.99, `click mask matches the Segment API's (IoU ${iou(clickMask, expected).toFixed(3)})`);
  const describeMask = (mask) => {
    const box = api.bbox({ width: WIDTH, height: HEIGHT, data: Uint8Array.from(mask) });
    return `area ${mask.reduce((a, b) => a + b, 0)} px, bbox ${box}`;
  };
  check(clickMask[point[1] * WIDTH + point[0]] === 1, `the clicked pixel is inside the mask (${describeMask(clickMask)})`);
  check(clickArea > 0.005 * WIDTH * HEIGHT && clickArea < 0.5 * WIDTH * HEIGHT, `the mask is an object, not the image (${clickArea} px)`);

  // ---- a right click refines it (previous low-res logits) ----
  await click(page, 20, 20, "right");
  state = await pageState(page);
  check(state.current.points.length === 2 && !state.current.points[1].positive, "the right click is a background point");
  const logits = await page.evaluate(() => {
    const l = window.ospreyPage.undo.at(-1).current.logits;
    return { height: l.height, width: l.width, values: Array.from(l.values) };
  });
  const refined = await apiMask(client, registered.key, {
    points: state.current.points.map((p) => ({ x: p.x, y: p.y, label: p.positive ? api.PointLabel.FOREGROUND : api.PointLabel.BACKGROUND })),
    maskInput: logits,
  });
  check(iou(state.current.mask, refined) > 0.99, "the refined mask matches the API's for the same points and logits");

  // ---- accept: the description streams in ----
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => window.ospreyPage.regions[0]?.status === "done", null, { timeout: 120_000 });
  state = await pageState(page);
  const described = [];
  for await (const result of client.describe({
    image: imageKey(registered.key),
    regions: [{ source: { case: "mask", value: { format: { case: "rle", value: { width: WIDTH, height: HEIGHT, counts: { case: "uncompressed", value: { counts: api.encodeRuns({ width: WIDTH, height: HEIGHT, data: Uint8Array.from(state.regions[0].mask) }) } } } } } } }],
    task: api.DescribeTask.SHORT,
  })) described.push(result.text);
  check(state.regions.length === 1 && state.current.mask === null, "accepting makes a region and clears the mask");
  check(state.regions[0].text === described[0], `the page shows Describe's text (${JSON.stringify(described[0])})`);
  check((await page.locator("#regions li .text").first().textContent()) === described[0], "the text is in the region list");

  // ---- a box ----
  const [bx0, by0] = await at(page, 100, 30);
  const [bx1, by1] = await at(page, 150, 95);
  const boxesBefore = state.clickToMaskMs.length;
  await page.mouse.move(bx0, by0);
  await page.mouse.down();
  await page.mouse.move((bx0 + bx1) / 2, (by0 + by1) / 2, { steps: 3 });
  await page.mouse.move(bx1, by1, { steps: 3 });
  await page.mouse.up();
  await page.waitForFunction((n) => window.ospreyPage.clickToMaskMs.length > n, boxesBefore, { timeout: 30_000 });
  state = await pageState(page);
  const [x0, y0, x1, y1] = state.current.box;
  check(x0 < 102 && x0 > 98 && y1 > 93, `the drag is a box (${state.current.box.map((v) => v.toFixed(1))})`);
  const boxMask = await apiMask(client, registered.key, { box: { x0, y0, x1, y1 } });
  check(iou(state.current.mask, boxMask) > 0.99, "the box mask matches the API's");
  await page.locator("#accept").click();
  await page.waitForFunction(() => window.ospreyPage.regions.every((r) => r.status === "done"), null, { timeout: 120_000 });

  // ---- click-to-mask latency with the embedding resident ----
  const latencyStart = (await pageState(page)).clickToMaskMs.length;
  const points = [[30, 60], [60, 80], [120, 40], [45, 30], [135, 80], [90, 20], [20, 90], [70, 65], [110, 70], [140, 30], [55, 45]];
  for (const [x, y] of points) {
    await click(page, x, y);
    await page.keyboard.press("Escape");
  }
  const latencies = (await pageState(page)).clickToMaskMs.slice(latencyStart);
  console.log(`click-to-mask latency (MobileSAM, resident embedding, ${latencies.length} clicks): median ${median(latencies).toFixed(0)} ms, min ${Math.min(...latencies).toFixed(0)} ms, max ${Math.max(...latencies).toFixed(0)} ms`);

  // ---- task switch, everything mode ----
  await page.locator("#stage").focus();
  await page.keyboard.press("1");
  check((await page.locator("#task").inputValue()) === "category", "key 1 switches the task to category");
  await page.locator("#density").selectOption("8");
  await page.locator("#stage").focus();
  await page.keyboard.press("e");
  await page.waitForFunction(() => document.body.dataset.busy === "true");
  check(/Everything/.test(await page.locator("#progress").textContent()), "everything mode shows its progress");
  await idle(page);
  state = await pageState(page);
  const proposed = state.regions.filter((r) => r.task === "category");
  check(proposed.length >= 1, `everything mode yields regions (${proposed.length})`);
  check(proposed.every((r) => r.mask.some((v) => v)), "every proposed region has a mask");

  // ---- ask about two selected regions ----
  await page.locator("#regions li input[type=checkbox]").nth(0).check();
  await page.locator("#regions li input[type=checkbox]").nth(1).check();
  const question = "What is region1 next to region2?";
  await page.locator("#question").fill(question);
  await page.locator("#ask-button").click();
  await page.waitForFunction(() => window.ospreyPage.answers.length === 1);
  await idle(page);
  state = await pageState(page);
  let expectedAnswer = "";
  for await (const chunk of client.chat({
    image: imageKey(registered.key),
    regions: state.regions.slice(0, 2).map((r) => ({ source: { case: "mask", value: { format: { case: "rle", value: { width: WIDTH, height: HEIGHT, counts: { case: "uncompressed", value: { counts: api.encodeRuns({ width: WIDTH, height: HEIGHT, data: Uint8Array.from(r.mask) }) } } } } } } })),
    question,
  })) expectedAnswer += chunk.text;
  check(state.answers[0].answer === expectedAnswer, `the streamed answer is Chat's (${JSON.stringify(expectedAnswer)})`);

  // ---- a bad file: the server's message, nothing lost ----
  const regionsBefore = state.regions.length;
  const junk = Buffer.from("this is not an image");
  await page.locator("#file").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: junk });
  const badFileMessage = await errorText(page);
  let serverMessage = "";
  try {
    await client.registerImage({ encoded: junk });
  } catch (error) {
    serverMessage = `${api.Code[error.code]}: ${error.rawMessage}`;
  }
  check(badFileMessage === serverMessage, `a bad file shows the server's message (${badFileMessage})`);
  state = await pageState(page);
  check(state.regions.length === regionsBefore && state.key === registered.key, "the bad file lost nothing");
  await page.locator("#error-close").click();

  // ---- an image over the pixel limit (a PNG header declaring 8000x6000): the server's message, nothing lost ----
  const huge = pngHeaderOnly(8000, 6000);
  await page.locator("#file").setInputFiles({ name: "huge.png", mimeType: "image/png", buffer: huge });
  const hugeMessage = await errorText(page);
  const hugeServerMessage = await serverError(() => client.registerImage({ encoded: huge }));
  check(hugeServerMessage.startsWith("InvalidArgument"), `the server refuses an image over the limits (${hugeServerMessage})`);
  check(hugeMessage === hugeServerMessage, `an image over the limits shows the server's message (${hugeMessage})`);
  state = await pageState(page);
  check(state.regions.length === regionsBefore && state.key === registered.key, "the image over the limits lost nothing");
  await page.locator("#error-close").click();

  // ---- edit, export ----
  await page.locator("#regions li .text").first().fill("edited text");
  await page.locator("#regions li .text").first().blur();
  state = await pageState(page);
  check(state.regions[0].text === "edited text", "a region's text can be edited");
  if (screenshotPath) await page.screenshot({ path: screenshotPath });
  await page.locator("#stage").focus();
  const [download] = await Promise.all([page.waitForEvent("download"), page.keyboard.press("Control+s")]);
  const coco = JSON.parse(readFileSync(await download.path(), "utf8"));
  check(coco.images.length === 1 && coco.images[0].width === WIDTH && coco.images[0].height === HEIGHT, "COCO image entry");
  check(coco.annotations.length === state.regions.length, `one annotation per region (${coco.annotations.length})`);
  coco.annotations.forEach((annotation, i) => {
    const { size, counts } = annotation.segmentation;
    check(typeof counts === "string" && size[0] === HEIGHT && size[1] === WIDTH, "segmentation is compressed RLE");
    const decoded = api.decodeRuns(api.decompressRuns(counts), WIDTH, HEIGHT).data;
    check(iou(decoded, state.regions[i].mask) === 1, `annotation ${i} decodes to the region's mask`);
    check(annotation.area === api.area({ data: decoded }), `annotation ${i} area`);
    check(annotation.osprey.text === state.regions[i].text, `annotation ${i} carries the region's text`);
  });
  const qa = coco.osprey_questions[0];
  check(qa.question === question && qa.answer === expectedAnswer, "the question and answer are exported");
  check(qa.annotation_ids.join() === [state.regions[0].id, state.regions[1].id].join(), "the question names its regions");

  // ---- delete everything, import the export back, undo ----
  const selectAll = async () => {
    for (const box of await page.locator("#regions li input[type=checkbox]").all()) await box.check();
    await page.locator("#stage").focus();
  };
  await selectAll();
  await page.keyboard.press("Delete");
  check((await pageState(page)).regions.length === 0, "Delete removes the selected regions");
  await page.keyboard.press("Control+z");
  check((await pageState(page)).regions.length === state.regions.length, "Ctrl+Z brings them back");
  await selectAll();
  await page.keyboard.press("Delete");
  check((await pageState(page)).regions.length === 0, "all deleted again");
  await page.locator("#import").setInputFiles(await download.path());
  await page.waitForFunction((n) => window.ospreyPage.regions.length === n, state.regions.length, { timeout: 10_000 });
  const imported = await pageState(page);
  imported.regions.forEach((region, i) => {
    check(iou(region.mask, state.regions[i].mask) === 1 && region.text === state.regions[i].text, `imported region ${i}`);
  });
  const importedAnswer = imported.answers.at(-1);
  check(importedAnswer.answer === expectedAnswer && importedAnswer.question === question, "imported question and answer");
  check(importedAnswer.regionIds.join() === [imported.regions[0].id, imported.regions[1].id].join(), "the imported answer names the imported regions");

  // ---- a missing or wrong API key: the server's message; the right one works ----
  const keyed = await context.newPage();
  await keyed.goto(`http://127.0.0.1:${keyedHttpPort}/`);
  await keyed.locator("#file").setInputFiles(samplePath);
  const noKeyMessage = await errorText(keyed);
  check(noKeyMessage === "Unauthenticated: missing or invalid API key", `a missing key shows the server's message (${noKeyMessage})`);
  await keyed.locator("#error-close").click();
  await keyed.locator("#apikey").fill("open sesame");
  await keyed.locator("#file").setInputFiles(samplePath);
  const keyMessage = await errorText(keyed);
  check(keyMessage === "Unauthenticated: missing or invalid API key", `a wrong key shows the server's message (${keyMessage})`);
  await keyed.locator("#apikey").fill("sesame");
  await keyed.locator("#error-close").click();
  await openSample(keyed);
  check(await keyed.locator("#error").isHidden(), "the right key opens the image");

  // ---- the gateway restarts and forgets the image: the next click registers it again and gets its mask ----
  keyedGateway.child.kill("SIGINT");
  await new Promise((resolve) => (keyedGateway.child.exitCode !== null ? resolve() : keyedGateway.child.once("exit", resolve)));
  keyedGateway = await startKeyed();
  await click(keyed, ...point);
  const afterRestart = await keyed.evaluate(() => ({ reregistered: window.ospreyPage.reregistered, key: window.ospreyPage.image.key }));
  check(afterRestart.reregistered === 1 && afterRestart.key === registered.key, `after a gateway restart the page registered its image again (${JSON.stringify(afterRestart)})`);
  const restartedMask = (await pageState(keyed)).current.mask;
  check(iou(restartedMask, clickMask) > 0.99, "and the click's mask is the one before the restart");
  check(await keyed.locator("#error").isHidden(), "no error after the restart");

  // ---- the SAM worker goes down: a click shows the server's message, nothing is lost ----
  const samPid = execFileSync("pgrep", ["-P", String(local.child.pid), "-x", "sam-worker"], { encoding: "utf8" }).trim();
  check(/^\d+$/.test(samPid), `gateway local runs one sam-worker (${samPid})`);
  process.kill(Number(samPid), "SIGKILL");
  const regionsBeforeDown = (await pageState(page)).regions;
  await page.keyboard.press("Escape");
  const [dx, dy] = await at(page, ...point);
  await page.mouse.click(dx, dy);
  const downMessage = await errorText(page);
  const downServerMessage = await serverError(() =>
    client.segment({ image: imageKey(registered.key), prompts: [{ points: [{ x: point[0], y: point[1], label: api.PointLabel.FOREGROUND }] }] }),
  );
  check(downServerMessage.startsWith("Unavailable"), `the server says the SAM worker is unavailable (${downServerMessage})`);
  check(downMessage === downServerMessage, `a worker that is down shows the server's message (${downMessage})`);
  const afterDown = (await pageState(page)).regions;
  check(
    afterDown.length === regionsBeforeDown.length && afterDown.every((r, i) => r.text === regionsBeforeDown[i].text && iou(r.mask, regionsBeforeDown[i].mask) === 1),
    "the worker being down lost no region",
  );

  check(pageErrors.length === 0, `no uncaught errors on the page (${pageErrors.join("; ")})`);
  console.log(`${checks} passed, 0 failed`);
  return { latencies };
}

try {
  await main();
} catch (error) {
  console.error(error.stack ?? error);
  process.exitCode = 1;
} finally {
  for (const cleanup of cleanups.reverse()) {
    try {
      await cleanup();
    } catch {}
  }
}
