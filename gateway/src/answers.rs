//! Public responses assembled from the stages' results: a region's result and the metadata
//! (stage times, cache tiers) every answer carries.

use std::time::Instant;

use osprey_proto::convert::public_finish_reason;
use osprey_proto::v1::{self, CacheHits, Metadata, Timing};
use osprey_proto::worker::v1 as worker;

use crate::features::Pooled;
use crate::prepare::Prepared;

/// Region `i`'s result from the LLM's final response about it.
pub fn region_result(
    prepared: &Prepared,
    i: usize,
    answer: worker::GenerateResponse,
    metadata: Metadata,
) -> v1::RegionResult {
    let rle = prepared.masks[i].to_rle();
    v1::RegionResult {
        region_index: i as u32,
        label: prepared.labels[i].clone(),
        text: answer.answer,
        raw_text: answer.raw_text,
        area: rle.area(),
        bbox: rle.bbox().iter().map(|&v| v as f32).collect(),
        mask: prepared.sam_masks[i].clone(),
        generated_tokens: answer.generated_tokens,
        finish_reason: public_finish_reason(answer.finish_reason),
        metadata: Some(metadata),
    }
}

/// Metadata of an answer served from the result cache: only SAM (if any) ran.
pub fn cached_metadata(prepared: &Prepared, start: Instant) -> Metadata {
    Metadata {
        timing: Some(Timing { sam_ns: prepared.sam_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
        cache: Some(CacheHits {
            sam_embedding: prepared.sam_tier as i32,
            result: true,
            ..CacheHits::default()
        }),
    }
}

/// Metadata of an answer the LLM gave (`llm` its timings).
pub fn answer_metadata(
    prepared: &Prepared,
    pooled: &Pooled,
    llm: Option<&worker::Timing>,
    prefix_hit: bool,
    start: Instant,
) -> Metadata {
    let llm = llm.cloned().unwrap_or_default();
    Metadata {
        timing: Some(Timing {
            sam_ns: prepared.sam_ns,
            encode_ns: pooled.encode_ns,
            pool_ns: pooled.pool_ns,
            prefill_ns: llm.prefill_ns,
            decode_ns: llm.decode_ns,
            total_ns: elapsed_ns(start),
            ..Timing::default()
        }),
        cache: Some(CacheHits {
            sam_embedding: prepared.sam_tier as i32,
            vision_features: pooled.tier as i32,
            llm_prefix: prefix_hit,
            result: false,
        }),
    }
}

/// Metadata with only a total time (Annotate's per-item summary).
pub fn total_metadata(start: Instant) -> Metadata {
    Metadata { timing: Some(Timing { total_ns: elapsed_ns(start), ..Timing::default() }), cache: None }
}

pub fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}
