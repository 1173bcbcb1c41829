// The page's RLE code against pycocotools' own strings (tests/fixtures/codecs/masks.json, made by
// tools/make_codec_fixtures.py): compressing the runs gives pycocotools' string and back, and
// the runs decode to a mask of the fixture's area and bounding box.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
const bundle = esbuild.buildSync({ entryPoints: [join(here, "../src/rle.ts")], bundle: true, platform: "node", format: "esm", write: false });
const rle = await import(`data:text/javascript;base64,${Buffer.from(bundle.outputFiles[0].text).toString("base64")}`);
const fixtures = JSON.parse(readFileSync(join(here, "../../../tests/fixtures/codecs/masks.json"), "utf8"));

let passed = 0;
const failed = [];
for (const f of fixtures) {
  const mask = rle.decodeRuns(f.counts, f.width, f.height);
  const problems = [];
  if (rle.compressRuns(f.counts) !== f.rle) problems.push(`compress gives ${rle.compressRuns(f.counts)}`);
  if (rle.decompressRuns(f.rle).join() !== f.counts.join()) problems.push("decompress differs");
  if (rle.encodeRuns(mask).join() !== f.counts.join()) problems.push("re-encoding the mask differs");
  if (rle.area(mask) !== f.area) problems.push(`area ${rle.area(mask)}`);
  if (rle.bbox(mask).join() !== f.bbox.join()) problems.push(`bbox ${rle.bbox(mask)}`);
  if (problems.length) failed.push(`${f.name}: ${problems.join("; ")}`);
  else passed++;
}
for (const line of failed) console.error(line);
console.log(`${passed} passed, ${failed.length} failed`);
process.exitCode = failed.length ? 1 : 0;
