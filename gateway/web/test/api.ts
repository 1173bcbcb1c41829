// What the browser test needs besides the browser: the same generated client (over gRPC-Web, as
// the page) to ask the API directly, and the page's RLE code to check exported masks.

import { createClient, type Interceptor } from "@connectrpc/connect";

export { Code } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Osprey } from "../src/gen/osprey/v1/gateway_pb";

export { DescribeTask } from "../src/gen/osprey/v1/gateway_pb";
export { PointLabel } from "../src/gen/osprey/v1/types_pb";
export { area, bbox, compressRuns, decodeRuns, decompressRuns, encodeRuns } from "../src/rle";

export function client(baseUrl: string, apiKey?: string) {
  const withKey: Interceptor = (next) => async (request) => {
    if (apiKey) request.header.set("x-api-key", apiKey);
    return next(request);
  };
  return createClient(Osprey, createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors: [withKey] }));
}
