// The annotation page: open an image, click or drag for SAM masks, accept them and read what
// Osprey says about each region. It talks only to the public osprey.v1.Osprey API over gRPC-Web.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { DescribeTask, Osprey, type RegionResult } from "./gen/osprey/v1/gateway_pb";
import { PointLabel, type LowResLogits, type RleMask } from "./gen/osprey/v1/types_pb";
import { exportCoco, importCoco, type AnswerRecord } from "./coco";
import { area, bbox, decodeRuns, decompressRuns, encodeRuns, type Bitmap } from "./rle";

type TaskName = "category" | "short" | "detailed";
const TASKS: Record<TaskName, DescribeTask> = {
  category: DescribeTask.CATEGORY,
  short: DescribeTask.SHORT,
  detailed: DescribeTask.DETAILED,
};

export interface Region {
  id: number;
  mask: Bitmap;
  color: [number, number, number];
  text: string;
  task: TaskName;
  status: "pending" | "done" | "error";
  selected: boolean;
}

interface PromptPoint {
  x: number;
  y: number;
  positive: boolean;
}

interface Current {
  points: PromptPoint[];
  box: [number, number, number, number] | null;
  logits: LowResLogits | null;
  mask: Bitmap | null;
}

interface LoadedImage {
  key: string;
  name: string;
  width: number;
  height: number;
  bitmap: ImageBitmap;
  /** The file's bytes, to register the image again with a gateway that no longer knows it. */
  bytes: Uint8Array;
}

interface Snapshot {
  regions: Region[];
  current: Current;
  answers: AnswerRecord[];
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const state = {
  image: null as LoadedImage | null,
  regions: [] as Region[],
  current: emptyCurrent(),
  answers: [] as AnswerRecord[],
  undo: [] as Snapshot[],
  nextId: 1,
  /** Milliseconds from each click or box to its mask drawn on the page. */
  clickToMaskMs: [] as number[],
  /** Times the image was registered again with a gateway that had lost it. */
  reregistered: 0,
};
// For the browser test and the curious: the page's state, read-only by convention.
(window as unknown as { ospreyPage: typeof state }).ospreyPage = state;

function emptyCurrent(): Current {
  return { points: [], box: null, logits: null, mask: null };
}

// ---- API ----

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  interceptors: [
    (next) => async (request) => {
      const key = $<HTMLInputElement>("apikey").value.trim();
      if (key) request.header.set("x-api-key", key);
      return next(request);
    },
  ],
});
const osprey = createClient(Osprey, transport);

function imageRef() {
  if (!state.image) throw new Error("open an image first");
  return { source: { case: "key" as const, value: state.image.key } };
}

/**
 * Runs `call` with the page's image. When the gateway no longer knows the image (it restarted,
 * the key expired, its cached copy was damaged), registers the image again and runs `call` once
 * more; the regions already made stay as they are.
 */
async function withImage<T>(call: (image: ReturnType<typeof imageRef>) => Promise<T>): Promise<T> {
  const image = state.image;
  try {
    return await call(imageRef());
  } catch (error) {
    const unknown =
      error instanceof ConnectError && (error.code === Code.FailedPrecondition || error.code === Code.NotFound);
    if (!unknown || !image || image !== state.image) throw error;
    const done = busy("Registering image again");
    try {
      // Keys are derived from the bytes, so the key stays the same.
      image.key = (await osprey.registerImage({ encoded: image.bytes, warmFeatures: true })).key;
    } finally {
      done();
    }
    state.reregistered++;
    return call(imageRef());
  }
}

function maskRegion(region: Region) {
  const { width, height } = region.mask;
  return {
    label: `r${region.id}`,
    source: {
      case: "mask" as const,
      value: {
        format: {
          case: "rle" as const,
          value: { width, height, counts: { case: "uncompressed" as const, value: { counts: encodeRuns(region.mask) } } },
        },
      },
    },
  };
}

function bitmapOf(rle: RleMask): Bitmap {
  const counts = rle.counts.case === "compressed" ? decompressRuns(rle.counts.value) : rle.counts.value?.counts ?? [];
  return decodeRuns(counts, rle.width, rle.height);
}

// ---- progress and errors ----

const activeSteps = new Map<number, string>();
let nextStep = 0;

function busy(label: string): () => void {
  const step = nextStep++;
  activeSteps.set(step, label);
  renderStatus();
  return () => {
    activeSteps.delete(step);
    renderStatus();
  };
}

function renderStatus() {
  $("progress").textContent = [...activeSteps.values()].join(" · ");
  document.body.dataset.busy = activeSteps.size ? "true" : "false";
}

function say(text: string) {
  $("message").textContent = text;
}

/** Shows the server's message; the regions already made stay as they are. */
function showError(error: unknown) {
  let text: string;
  if (error instanceof ConnectError) {
    text = `${Code[error.code] ?? error.code}: ${error.rawMessage}`;
  } else {
    text = error instanceof Error ? error.message : String(error);
  }
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// ---- undo ----

function snapshot(): Snapshot {
  return {
    regions: state.regions.map((r) => ({ ...r })),
    current: { ...state.current, points: [...state.current.points] },
    answers: state.answers.map((a) => ({ ...a })),
  };
}

function remember() {
  state.undo.push(snapshot());
  if (state.undo.length > 100) state.undo.shift();
}

function undo() {
  const previous = state.undo.pop();
  if (!previous) return;
  state.regions = previous.regions;
  state.current = previous.current;
  state.answers = previous.answers;
  redrawAll();
}

// ---- opening an image ----

async function openFile(file: Blob, name: string) {
  clearError();
  const done = busy("Registering image");
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    // The server decides what it accepts and says why not; the page keeps its image until then.
    const registered = await osprey.registerImage({ encoded: bytes, warmFeatures: true });
    const bitmap = await createImageBitmap(file);
    state.image = { key: registered.key, name, width: registered.width, height: registered.height, bitmap, bytes };
    state.regions = [];
    state.answers = [];
    state.current = emptyCurrent();
    state.undo = [];
    setupCanvases();
    redrawAll();
    say(`${name}: ${registered.width}×${registered.height}`);
    void warmSam();
  } catch (error) {
    showError(error);
  } finally {
    done();
  }
}

/** Makes SAM compute the image embedding now, while the person looks at the picture. */
async function warmSam() {
  const image = state.image;
  if (!image) return;
  const done = busy("Encoding image (SAM)");
  try {
    await withImage((ref) =>
      osprey.segment({
        image: ref,
        prompts: [{ points: [{ x: image.width / 2, y: image.height / 2, label: PointLabel.FOREGROUND }] }],
      }),
    );
    document.body.dataset.samReady = "true";
  } catch (error) {
    showError(error);
  } finally {
    done();
  }
}

// ---- drawing ----

const imageCanvas = () => $<HTMLCanvasElement>("image");
const overlay = () => $<HTMLCanvasElement>("overlay");
let regionLayer: HTMLCanvasElement | null = null;
let currentLayer: HTMLCanvasElement | null = null;
let dragBox: [number, number, number, number] | null = null;

function setupCanvases() {
  const image = state.image!;
  $("empty").hidden = true;
  $("canvas-box").hidden = false;
  for (const canvas of [imageCanvas(), overlay()]) {
    canvas.width = image.width;
    canvas.height = image.height;
  }
  imageCanvas().getContext("2d")!.drawImage(image.bitmap, 0, 0, image.width, image.height);
  fitCanvas();
  regionLayer = document.createElement("canvas");
  currentLayer = document.createElement("canvas");
  for (const canvas of [regionLayer, currentLayer]) {
    canvas.width = image.width;
    canvas.height = image.height;
  }
}

/** Shows the image as large as the stage allows, small images scaled up too. */
function fitCanvas() {
  const image = state.image;
  if (!image) return;
  const stage = $("stage");
  const scale = Math.min((stage.clientWidth - 24) / image.width, (stage.clientHeight - 24) / image.height, 8);
  const box = $("canvas-box");
  box.style.width = `${Math.max(1, Math.floor(image.width * scale))}px`;
  box.style.height = `${Math.max(1, Math.floor(image.height * scale))}px`;
}

function paintMasks(canvas: HTMLCanvasElement, masks: { mask: Bitmap; rgba: [number, number, number, number] }[]) {
  const context = canvas.getContext("2d")!;
  const pixels = context.createImageData(canvas.width, canvas.height);
  const out = pixels.data;
  for (const { mask, rgba } of masks) {
    const data = mask.data;
    for (let i = 0; i < data.length; i++) {
      if (data[i]) {
        out[4 * i] = rgba[0];
        out[4 * i + 1] = rgba[1];
        out[4 * i + 2] = rgba[2];
        out[4 * i + 3] = rgba[3];
      }
    }
  }
  context.putImageData(pixels, 0, 0);
}

function drawRegions() {
  if (!regionLayer) return;
  paintMasks(
    regionLayer,
    state.regions.map((r) => ({ mask: r.mask, rgba: [...r.color, r.selected ? 170 : 110] as [number, number, number, number] })),
  );
}

function drawCurrent() {
  if (!currentLayer) return;
  const masks = state.current.mask ? [{ mask: state.current.mask, rgba: [30, 144, 255, 140] as [number, number, number, number] }] : [];
  paintMasks(currentLayer, masks);
}

function compose() {
  const image = state.image;
  if (!image || !regionLayer || !currentLayer) return;
  const context = overlay().getContext("2d")!;
  context.clearRect(0, 0, image.width, image.height);
  context.drawImage(regionLayer, 0, 0);
  context.drawImage(currentLayer, 0, 0);
  // Marks keep their on-screen size whatever the image size.
  const scale = image.width / overlay().getBoundingClientRect().width || 1;
  for (const point of state.current.points) {
    context.beginPath();
    context.arc(point.x, point.y, 5 * scale, 0, 2 * Math.PI);
    context.fillStyle = point.positive ? "#2ecc40" : "#ff4136";
    context.fill();
    context.lineWidth = 1.5 * scale;
    context.strokeStyle = "#fff";
    context.stroke();
  }
  for (const box of [state.current.box, dragBox]) {
    if (!box) continue;
    context.lineWidth = 2 * scale;
    context.strokeStyle = "#ffdc00";
    context.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
}

function redrawAll() {
  drawRegions();
  drawCurrent();
  compose();
  renderRegionList();
  renderAnswers();
  updateButtons();
}

function updateButtons() {
  const hasImage = state.image !== null;
  $<HTMLButtonElement>("accept").disabled = !state.current.mask;
  $<HTMLButtonElement>("everything").disabled = !hasImage;
  $<HTMLButtonElement>("export").disabled = !hasImage;
  $<HTMLButtonElement>("undo").disabled = state.undo.length === 0;
  $<HTMLButtonElement>("ask-button").disabled = !hasImage;
  $("count").textContent = state.regions.length ? `(${state.regions.length})` : "";
}

// ---- prompts: clicks and boxes ----

let segmentInFlight = false;
let segmentWanted = false;
let promptStartedAt = 0;

function imagePoint(event: MouseEvent): [number, number] {
  const rect = overlay().getBoundingClientRect();
  const image = state.image!;
  const x = ((event.clientX - rect.left) / rect.width) * image.width;
  const y = ((event.clientY - rect.top) / rect.height) * image.height;
  return [Math.min(Math.max(x, 0), image.width - 1), Math.min(Math.max(y, 0), image.height - 1)];
}

function requestMask(startedAt: number) {
  promptStartedAt = startedAt;
  segmentWanted = true;
  if (!segmentInFlight) void runSegment();
}

/** Decodes the current prompt; clicks made meanwhile are sent together once it returns. */
async function runSegment() {
  segmentInFlight = true;
  try {
    while (segmentWanted && state.image) {
      segmentWanted = false;
      const startedAt = promptStartedAt;
      const current = state.current;
      const key = state.image.key;
      if (current.points.length === 0 && !current.box) break;
      // The first single click asks for SAM's three candidates and keeps the best, as SAM's own
      // demo does; later clicks refine that mask from its low-resolution logits.
      const multimask = current.points.length === 1 && !current.box && !current.logits;
      const [x0, y0, x1, y1] = current.box ?? [0, 0, 0, 0];
      const response = await withImage((image) =>
        osprey.segment({
          image,
          prompts: [
            {
              points: current.points.map((p) => ({
                x: p.x,
                y: p.y,
                label: p.positive ? PointLabel.FOREGROUND : PointLabel.BACKGROUND,
              })),
              box: current.box ? { x0, y0, x1, y1 } : undefined,
              maskInput: current.logits ?? undefined,
              multimaskOutput: multimask,
            },
          ],
        }),
      );
      if (state.image?.key !== key || state.current !== current) continue;
      const masks = response.prompts[0]?.masks ?? [];
      const best = masks.reduce((a, b) => (b.predictedIou > a.predictedIou ? b : a), masks[0]);
      if (!best?.mask) throw new Error("the server returned no mask");
      current.mask = bitmapOf(best.mask);
      current.logits = best.lowResLogits ?? null;
      drawCurrent();
      compose();
      updateButtons();
      await new Promise((resolve) => requestAnimationFrame(resolve));
      state.clickToMaskMs.push(performance.now() - startedAt);
      document.body.dataset.masks = String(state.clickToMaskMs.length);
    }
  } catch (error) {
    showError(error);
  } finally {
    segmentInFlight = false;
  }
}

function setupPointer() {
  let down: { x: number; y: number; button: number; screenX: number; screenY: number } | null = null;
  const canvas = overlay();
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("mousedown", (event) => {
    if (!state.image) return;
    const [x, y] = imagePoint(event);
    down = { x, y, button: event.button, screenX: event.clientX, screenY: event.clientY };
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!down || down.button !== 0) return;
    if (Math.hypot(event.clientX - down.screenX, event.clientY - down.screenY) < 5) return;
    const [x, y] = imagePoint(event);
    dragBox = [Math.min(down.x, x), Math.min(down.y, y), Math.max(down.x, x), Math.max(down.y, y)];
    compose();
  });
  window.addEventListener("mouseup", (event) => {
    if (!down || !state.image) return;
    const start = down;
    down = null;
    const startedAt = performance.now();
    if (dragBox) {
      const box = dragBox;
      dragBox = null;
      remember();
      state.current = { ...state.current, box, points: [...state.current.points] };
      requestMask(startedAt);
      return;
    }
    if (event.target !== canvas) return;
    if (event.shiftKey) {
      toggleRegionAt(start.x, start.y);
      return;
    }
    remember();
    const points = [...state.current.points, { x: start.x, y: start.y, positive: start.button !== 2 }];
    state.current = { ...state.current, points };
    compose();
    requestMask(startedAt);
  });
}

function clearCurrent() {
  if (!state.current.mask && state.current.points.length === 0 && !state.current.box) return;
  remember();
  state.current = emptyCurrent();
  drawCurrent();
  compose();
  updateButtons();
}

function toggleRegionAt(x: number, y: number) {
  const width = state.image!.width;
  const index = Math.floor(y) * width + Math.floor(x);
  const hit = [...state.regions].reverse().find((r) => r.mask.data[index]);
  if (hit) {
    hit.selected = !hit.selected;
    drawRegions();
    compose();
    renderRegionList();
  }
}

// ---- regions and descriptions ----

const PALETTE: [number, number, number][] = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
];

function newRegion(mask: Bitmap, text = "", status: Region["status"] = "pending"): Region {
  const id = state.nextId++;
  return { id, mask, color: PALETTE[(id - 1) % PALETTE.length], text, task: currentTask(), status, selected: false };
}

function currentTask(): TaskName {
  return $<HTMLSelectElement>("task").value as TaskName;
}

function acceptCurrent() {
  const mask = state.current.mask;
  if (!mask || !state.image) return;
  remember();
  const region = newRegion(mask);
  state.regions.push(region);
  state.current = emptyCurrent();
  redrawAll();
  void describe([region]);
}

function findRegion(id: number) {
  return state.regions.find((r) => r.id === id);
}

/** Streams descriptions of `regions` in; the page stays usable meanwhile. */
async function describe(regions: Region[]) {
  const task = currentTask();
  for (const region of regions) {
    region.status = "pending";
    region.task = task;
  }
  renderRegionList();
  const ids = regions.map((r) => r.id);
  const done = busy(`Describing ${regions.length} region${regions.length > 1 ? "s" : ""}`);
  try {
    await withImage(async (image) => {
      for await (const result of osprey.describe({ image, regions: regions.map(maskRegion), task: TASKS[task] })) {
        const region = findRegion(ids[result.regionIndex]);
        if (region) {
          region.text = result.text;
          region.status = "done";
          renderRegionList();
        }
      }
    });
  } catch (error) {
    for (const id of ids) {
      const region = findRegion(id);
      if (region && region.status === "pending") region.status = "error";
    }
    renderRegionList();
    showError(error);
  } finally {
    done();
  }
}

/** Everything mode: SAM proposes every object and each is described as it is ready. */
async function everything() {
  if (!state.image) return;
  clearError();
  remember();
  const task = currentTask();
  const pointsPerSide = Number($<HTMLSelectElement>("density").value);
  const done = busy("Everything: finding objects");
  let found = 0;
  try {
    // An unknown image fails before the first result, so a retry repeats no region.
    await withImage(async (image) => {
      const everythingRequest = { pointsPerSide, maxMasks: 64 };
      for await (const result of osprey.describe({ image, regions: [], everything: everythingRequest, task: TASKS[task] })) {
        addEverythingResult(result, task);
        found++;
        say(`Everything: ${found} region${found > 1 ? "s" : ""} described`);
      }
    });
    say(`Everything: ${found} region${found === 1 ? "" : "s"}`);
  } catch (error) {
    showError(error);
  } finally {
    done();
  }
}

function addEverythingResult(result: RegionResult, task: TaskName) {
  if (!result.mask) return;
  const region = newRegion(bitmapOf(result.mask), result.text, "done");
  region.task = task;
  state.regions.push(region);
  redrawAll();
}

function deleteRegions(ids: number[]) {
  if (ids.length === 0) return;
  remember();
  state.regions = state.regions.filter((r) => !ids.includes(r.id));
  redrawAll();
}

function renderRegionList() {
  const list = $("regions");
  list.replaceChildren(
    ...state.regions.map((region) => {
      const item = document.createElement("li");
      item.dataset.id = String(region.id);
      item.className = `${region.status}${region.selected ? " selected" : ""}`;
      const select = document.createElement("input");
      select.type = "checkbox";
      select.checked = region.selected;
      select.title = "Select for questions, re-description or deletion";
      select.addEventListener("change", () => {
        region.selected = select.checked;
        item.classList.toggle("selected", select.checked);
        drawRegions();
        compose();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${region.color.join(",")})`;
      const text = document.createElement("div");
      text.className = "text";
      text.contentEditable = "true";
      text.textContent = region.text;
      text.title = "Edit the text";
      text.addEventListener("focus", () => remember());
      text.addEventListener("input", () => {
        region.text = text.textContent ?? "";
      });
      const remove = document.createElement("button");
      remove.className = "delete";
      remove.textContent = "×";
      remove.title = "Delete the region";
      remove.addEventListener("click", () => deleteRegions([region.id]));
      const meta = document.createElement("div");
      meta.className = "meta";
      const status = region.status === "error" ? " · description failed" : "";
      meta.textContent = `region${state.regions.indexOf(region) + 1} · ${region.task} · ${area(region.mask)} px${status}`;
      item.append(select, swatch, text, remove, meta);
      return item;
    }),
  );
  $("count").textContent = state.regions.length ? `(${state.regions.length})` : "";
}

// ---- questions ----

async function ask(question: string) {
  if (!state.image || !question.trim()) return;
  const selected = state.regions.filter((r) => r.selected);
  remember();
  const record: AnswerRecord = { regionIds: selected.map((r) => r.id), question, answer: "" };
  state.answers.push(record);
  renderAnswers();
  const done = busy("Answering");
  try {
    await withImage(async (image) => {
      for await (const chunk of osprey.chat({ image, regions: selected.map(maskRegion), question })) {
        record.answer += chunk.text;
        renderAnswers();
      }
    });
  } catch (error) {
    showError(error);
  } finally {
    done();
  }
}

function renderAnswers() {
  $("answers").replaceChildren(
    ...state.answers.map((record) => {
      const item = document.createElement("li");
      const names = record.regionIds
        .map((id) => state.regions.findIndex((r) => r.id === id) + 1)
        .filter((n) => n > 0)
        .map((n) => `region${n}`);
      const q = document.createElement("div");
      q.className = "q";
      q.textContent = `${names.length ? `[${names.join(", ")}] ` : ""}${record.question}`;
      const a = document.createElement("div");
      a.className = "a";
      a.textContent = record.answer;
      item.append(q, a);
      return item;
    }),
  );
}

// ---- COCO ----

function download() {
  if (!state.image) return;
  const coco = exportCoco(state.image, state.regions, state.answers);
  const blob = new Blob([JSON.stringify(coco, null, 1)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${state.image.name.replace(/\.[^.]*$/, "") || "annotations"}.coco.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

async function importFile(file: File) {
  clearError();
  try {
    if (!state.image) throw new Error("open the image the COCO file describes first");
    const imported = importCoco(JSON.parse(await file.text()), state.image);
    remember();
    const byOldId = new Map<number, number>();
    for (const entry of imported.regions) {
      const region = newRegion(entry.mask, entry.text, "done");
      if (entry.task) region.task = entry.task as TaskName;
      byOldId.set(entry.annotationId, region.id);
      state.regions.push(region);
    }
    for (const record of imported.answers) {
      state.answers.push({ ...record, regionIds: record.regionIds.map((id) => byOldId.get(id) ?? -1) });
    }
    redrawAll();
    say(`Imported ${imported.regions.length} regions from ${file.name}`);
  } catch (error) {
    showError(error);
  }
}

// ---- wiring ----

function isTyping(target: EventTarget | null) {
  const element = target as HTMLElement | null;
  return !!element && (element.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(element.tagName));
}

function setTask(task: TaskName) {
  $<HTMLSelectElement>("task").value = task;
  onTaskChange();
}

/** A new task re-describes the selected regions with it. */
function onTaskChange() {
  const selected = state.regions.filter((r) => r.selected);
  if (selected.length) void describe(selected);
}

function setup() {
  setupPointer();
  $<HTMLInputElement>("file").addEventListener("change", (event) => {
    const input = event.target as HTMLInputElement;
    const file = input.files?.[0];
    if (file) void openFile(file, file.name);
    input.value = "";
  });
  $<HTMLInputElement>("import").addEventListener("change", (event) => {
    const input = event.target as HTMLInputElement;
    const file = input.files?.[0];
    if (file) void importFile(file);
    input.value = "";
  });
  $("accept").addEventListener("click", acceptCurrent);
  $("everything").addEventListener("click", () => void everything());
  $("undo").addEventListener("click", undo);
  $("export").addEventListener("click", download);
  $("task").addEventListener("change", onTaskChange);
  $("error-close").addEventListener("click", clearError);
  const apiKey = $<HTMLInputElement>("apikey");
  apiKey.value = localStorage.getItem("osprey-api-key") ?? "";
  apiKey.addEventListener("change", () => localStorage.setItem("osprey-api-key", apiKey.value));
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $<HTMLTextAreaElement>("question");
    void ask(question.value);
    question.value = "";
  });

  const stage = $("stage");
  stage.addEventListener("dragover", (event) => {
    event.preventDefault();
    stage.classList.add("dragging");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (event) => {
    event.preventDefault();
    stage.classList.remove("dragging");
    const file = event.dataTransfer?.files[0];
    if (file) void openFile(file, file.name);
  });
  window.addEventListener("paste", (event) => {
    if (isTyping(event.target)) return;
    const file = [...(event.clipboardData?.files ?? [])][0];
    if (file) {
      event.preventDefault();
      void openFile(file, file.name || "pasted image");
    }
  });
  window.addEventListener("resize", () => {
    fitCanvas();
    compose();
  });

  window.addEventListener("keydown", (event) => {
    if (isTyping(event.target)) return;
    const ctrl = event.ctrlKey || event.metaKey;
    if (ctrl && event.key.toLowerCase() === "z") undo();
    else if (ctrl && event.key.toLowerCase() === "s") download();
    else if (ctrl) return;
    else if (event.key === "Enter") acceptCurrent();
    else if (event.key === "Escape") clearCurrent();
    else if (event.key === "e" || event.key === "E") void everything();
    else if (event.key === "o" || event.key === "O") $<HTMLInputElement>("file").click();
    else if (event.key === "1") setTask("category");
    else if (event.key === "2") setTask("short");
    else if (event.key === "3") setTask("detailed");
    else if (event.key === "Delete" || event.key === "Backspace")
      deleteRegions(state.regions.filter((r) => r.selected).map((r) => r.id));
    else return;
    event.preventDefault();
  });
  updateButtons();
  document.body.dataset.ready = "true";
}

setup();
