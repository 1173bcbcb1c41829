// Builds the page: the client generated from proto/osprey/v1 (src/gen) and the bundle the gateway
// embeds (dist/app.js). Both are committed so that building the gateway needs no Node.
// `node build.mjs --check` builds into a temporary folder and fails when the committed files differ.

import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
const check = process.argv.includes("--check");

function build(root) {
  execFileSync(join(here, "node_modules/.bin/buf"), [
    "generate", join(here, "../../proto"), "--path", join(here, "../../proto/osprey/v1"),
    "--template", join(here, "buf.gen.yaml"), "--output", root,
  ], { cwd: here, stdio: "inherit" });
  esbuild.buildSync({
    entryPoints: [join(root, "src/main.ts")],
    bundle: true,
    format: "iife",
    target: "es2022",
    minify: true,
    legalComments: "none",
    outfile: join(root, "dist/app.js"),
    logLevel: "warning",
  });
}

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

if (!check) {
  build(here);
} else {
  // The hand-written sources are copied beside a fresh src/gen, so both are checked.
  const root = mkdtempSync(join(tmpdir(), "osprey-page-"));
  try {
    cpSync(join(here, "src"), join(root, "src"), {
      recursive: true,
      filter: (path) => !relative(join(here, "src"), path).startsWith("gen"),
    });
    cpSync(join(here, "tsconfig.json"), join(root, "tsconfig.json"));
    symlinkSync(join(here, "node_modules"), join(root, "node_modules"));
    build(root);
    const stale = [...files(join(root, "src/gen")), join(root, "dist/app.js")].filter((fresh) => {
      const committed = join(here, relative(root, fresh));
      try {
        return !readFileSync(committed).equals(readFileSync(fresh));
      } catch {
        return true;
      }
    });
    const committedGen = files(join(here, "src/gen")).map((p) => relative(here, p));
    const freshGen = files(join(root, "src/gen")).map((p) => relative(root, p));
    const extra = committedGen.filter((p) => !freshGen.includes(p));
    if (stale.length || extra.length) {
      console.error("The committed page is stale; run `npm run build` in gateway/web and commit the result:");
      for (const path of [...stale.map((p) => relative(root, p)), ...extra]) console.error(`  ${path}`);
      process.exit(1);
    }
    console.log("gateway/web: the committed client and bundle match a fresh build");
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}
