// COCO run-length masks as pycocotools writes them: runs over pixels in column-major order,
// starting with a run of zeros; the compressed form packs them as 6-bit characters.

/** A binary mask, row-major, one byte per pixel (0 or 1). */
export interface Bitmap {
  width: number;
  height: number;
  data: Uint8Array;
}

/** Run lengths (column-major, zeros first) of a row-major bitmap. */
export function encodeRuns(mask: Bitmap): number[] {
  const { width, height, data } = mask;
  const counts: number[] = [];
  let current = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const value = data[y * width + x];
      if (value !== current) {
        counts.push(run);
        run = 0;
        current = value;
      }
      run++;
    }
  }
  counts.push(run);
  return counts;
}

/** The row-major bitmap of column-major run lengths; throws when they do not cover the image. */
export function decodeRuns(counts: ArrayLike<number>, width: number, height: number): Bitmap {
  const data = new Uint8Array(width * height);
  let index = 0;
  let value = 0;
  for (let i = 0; i < counts.length; i++) {
    const end = index + counts[i];
    if (end > width * height) throw new Error("RLE runs exceed the image size");
    if (value) {
      for (let k = index; k < end; k++) {
        const x = Math.floor(k / height);
        const y = k - x * height;
        data[y * width + x] = 1;
      }
    }
    index = end;
    value ^= 1;
  }
  if (index !== width * height) throw new Error("RLE runs do not cover the image");
  return { width, height, data };
}

/** pycocotools' compressed string of run lengths. */
export function compressRuns(counts: ArrayLike<number>): string {
  let out = "";
  for (let i = 0; i < counts.length; i++) {
    let x = counts[i];
    if (i > 2) x -= counts[i - 2];
    for (;;) {
      let c = x & 0x1f;
      x >>= 5;
      const more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      out += String.fromCharCode(c + 48);
      if (!more) break;
    }
  }
  return out;
}

/** Run lengths of pycocotools' compressed string. */
export function decompressRuns(text: string): number[] {
  const counts: number[] = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= text.length) throw new Error("truncated compressed RLE");
      const c = text.charCodeAt(p) - 48;
      if (c < 0 || c > 63) throw new Error("bad character in compressed RLE");
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    if (x < 0) throw new Error("negative run in compressed RLE");
    counts.push(x);
  }
  return counts;
}

export function area(mask: Bitmap): number {
  let total = 0;
  for (const v of mask.data) total += v;
  return total;
}

/** COCO bbox [x, y, w, h] of the mask's pixels (as pycocotools' toBbox). */
export function bbox(mask: Bitmap): [number, number, number, number] {
  const { width, height, data } = mask;
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[y * width + x]) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? [0, 0, 0, 0] : [x0, y0, x1 - x0 + 1, y1 - y0 + 1];
}
