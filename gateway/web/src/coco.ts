// COCO JSON for one image: each region an annotation with a compressed RLE `segmentation` and
// Osprey's text; questions asked about regions kept beside them, so an import continues the work.

import { area, bbox, compressRuns, decodeRuns, decompressRuns, encodeRuns, type Bitmap } from "./rle";

export interface AnswerRecord {
  /** Ids of the regions the question was about, in order (region1, region2, ...). */
  regionIds: number[];
  question: string;
  answer: string;
}

interface ExportedRegion {
  id: number;
  mask: Bitmap;
  text: string;
  task: string;
}

interface ImageInfo {
  name: string;
  width: number;
  height: number;
}

export function exportCoco(image: ImageInfo, regions: ExportedRegion[], answers: AnswerRecord[]) {
  return {
    info: { description: "Osprey annotation page export" },
    images: [{ id: 1, file_name: image.name, width: image.width, height: image.height }],
    categories: [{ id: 1, name: "region" }],
    annotations: regions.map((region) => ({
      id: region.id,
      image_id: 1,
      category_id: 1,
      segmentation: { size: [image.height, image.width], counts: compressRuns(encodeRuns(region.mask)) },
      area: area(region.mask),
      bbox: bbox(region.mask),
      iscrowd: 0,
      osprey: { task: region.task, text: region.text },
    })),
    osprey_questions: answers.map((record) => ({
      annotation_ids: record.regionIds.filter((id) => regions.some((r) => r.id === id)),
      question: record.question,
      answer: record.answer,
    })),
  };
}

export interface ImportedRegion {
  annotationId: number;
  mask: Bitmap;
  text: string;
  task: string | null;
}

/** The regions and questions of `coco` that belong to an image of this size. */
export function importCoco(coco: unknown, image: ImageInfo): { regions: ImportedRegion[]; answers: AnswerRecord[] } {
  const doc = coco as {
    images?: { id: number; file_name?: string; width: number; height: number }[];
    annotations?: {
      id: number;
      image_id: number;
      category_id?: number;
      segmentation: unknown;
      osprey?: { task?: string; text?: string };
      caption?: string;
    }[];
    categories?: { id: number; name: string }[];
    osprey_questions?: { annotation_ids: number[]; question: string; answer: string }[];
  };
  if (!doc || !Array.isArray(doc.images) || !Array.isArray(doc.annotations)) {
    throw new Error("not a COCO file: it needs `images` and `annotations`");
  }
  const sameSize = doc.images.filter((i) => i.width === image.width && i.height === image.height);
  const entry = sameSize.find((i) => i.file_name === image.name) ?? sameSize[0];
  if (!entry) {
    throw new Error(`the COCO file has no image of this image's size (${image.width}×${image.height})`);
  }
  const categories = new Map((doc.categories ?? []).map((c) => [c.id, c.name]));
  const regions = doc.annotations
    .filter((a) => a.image_id === entry.id)
    .map((a) => ({
      annotationId: a.id,
      mask: segmentationMask(a.segmentation, image.width, image.height),
      text: a.osprey?.text ?? a.caption ?? categories.get(a.category_id ?? -1) ?? "",
      task: a.osprey?.task ?? null,
    }));
  const answers = (doc.osprey_questions ?? []).map((q) => ({
    regionIds: q.annotation_ids ?? [],
    question: q.question ?? "",
    answer: q.answer ?? "",
  }));
  return { regions, answers };
}

function segmentationMask(segmentation: unknown, width: number, height: number): Bitmap {
  if (Array.isArray(segmentation)) return rasterizePolygons(segmentation as number[][], width, height);
  const rle = segmentation as { size?: number[]; counts?: string | number[] };
  if (!rle || !Array.isArray(rle.size) || rle.counts === undefined) {
    throw new Error("a segmentation is neither polygons nor RLE");
  }
  if (rle.size[0] !== height || rle.size[1] !== width) {
    throw new Error(`an RLE of size ${rle.size.join("×")} does not fit the image (${height}×${width})`);
  }
  const counts = typeof rle.counts === "string" ? decompressRuns(rle.counts) : rle.counts;
  return decodeRuns(counts, width, height);
}

/** Polygons filled by the browser's canvas (close to, not exactly, pycocotools' rasteriser). */
function rasterizePolygons(polygons: number[][], width: number, height: number): Bitmap {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d")!;
  context.fillStyle = "#fff";
  for (const xy of polygons) {
    context.beginPath();
    for (let i = 0; i + 1 < xy.length; i += 2) context.lineTo(xy[i], xy[i + 1]);
    context.closePath();
    context.fill();
  }
  const pixels = context.getImageData(0, 0, width, height).data;
  const data = new Uint8Array(width * height);
  for (let i = 0; i < data.length; i++) data[i] = pixels[4 * i + 3] >= 128 ? 1 : 0;
  return { width, height, data };
}
