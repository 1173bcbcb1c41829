//! The pipelines behind the public RPCs, stage after stage: image and regions (`prepare`), region
//! tokens (`features`), answers from the result cache or the LLM, and the public responses
//! (`answers`). Each runs under the request's [`Deadline`].

use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::image::RgbImage;
use osprey_common::mask::Mask;
use osprey_proto::v1::{self, CacheHits, Metadata, Timing};
use osprey_proto::worker::v1 as worker;
use tokio::sync::mpsc;
use tonic::Status;

use crate::answers::{answer_metadata, cached_metadata, elapsed_ns, region_result};
use crate::cache_entries::{answer_from_bytes, answer_key, answer_to_bytes, pixels_key, pixels_to_bytes};
use crate::clients::Answers;
use crate::deadline::Deadline;
use crate::features::Pooled;
use crate::images::RequestImage;
use crate::prepare::{Prepared, tier};
use crate::request::{QuestionInput, SegmentInput, SegmentWork};
use crate::state::Gateway;

/// How many times a Describe asks another LLM replica for the answers a broken stream left
/// unfinished, and an Ask asks again.
pub const MAX_STREAM_RETRIES: usize = 2;

/// The answer to a free-form question.
pub enum Answer {
    /// From the result cache: the LLM's final response, as stored.
    Cached(worker::GenerateResponse),
    Streaming(Answers, Box<Pooled>),
}

impl Gateway {
    /// RegisterImage: the pixels kept under the image's key; with `warm`, its features computed.
    pub async fn register(
        &self,
        image: RgbImage,
        warm: bool,
        deadline: Deadline,
        start: Instant,
    ) -> Result<v1::RegisterImageResponse, ServiceError> {
        let image = RequestImage::decoded(image, &self.model_revision);
        let pixels = image.pixels(&self.cache).await?;
        let key = pixels_key(&image.key);
        self.cache.put(&key, pixels_to_bytes(&key, &pixels)).await;
        let mut metadata = Metadata::default();
        if warm {
            let tier = self.warm_features(&image, deadline).await?;
            let timing =
                Timing { encode_ns: elapsed_ns(start), total_ns: elapsed_ns(start), ..Timing::default() };
            metadata.timing = Some(timing);
            metadata.cache = Some(CacheHits { vision_features: tier as i32, ..CacheHits::default() });
        }
        Ok(v1::RegisterImageResponse {
            key: image.key,
            width: image.width,
            height: image.height,
            metadata: Some(metadata),
        })
    }

    /// Segment: SAM's masks for prompts, or for the whole image.
    pub async fn segment(
        &self,
        input: SegmentInput,
        deadline: Deadline,
        start: Instant,
    ) -> Result<v1::SegmentResponse, ServiceError> {
        let image = RequestImage::resolve(input.image, &self.cache, &self.model_revision).await?;
        let pixels = async || image.wire_pixels(&self.cache).await;
        let image_key = image.key.clone();
        let (prompts, everything, was_resident) = match input.work {
            SegmentWork::Prompts(prompts) => {
                // A Segment client may refine its masks later, so it gets their logits.
                let request =
                    worker::PredictRequest { image_key, image: None, prompts, return_low_res_logits: true };
                let response = self.sam.predict(deadline, request, pixels).await?;
                let prompts = response
                    .prompts
                    .into_iter()
                    .map(|p| v1::PromptResult { masks: p.masks.into_iter().map(Into::into).collect() })
                    .collect();
                (prompts, vec![], response.was_resident)
            }
            SegmentWork::Everything(params) => {
                let request = worker::EverythingRequest { image_key, image: None, params: Some(params) };
                let response = self.sam.everything(deadline, request, pixels).await?;
                (vec![], response.masks.into_iter().map(Into::into).collect(), response.was_resident)
            }
        };
        let metadata = Metadata {
            timing: Some(Timing {
                sam_ns: elapsed_ns(start),
                total_ns: elapsed_ns(start),
                ..Timing::default()
            }),
            cache: Some(CacheHits { sam_embedding: tier(was_resident) as i32, ..CacheHits::default() }),
        };
        Ok(v1::SegmentResponse { prompts, everything, metadata: Some(metadata) })
    }

    /// Describe: one question per region, results sent on `tx` as each finishes. Regions whose
    /// answer is in the result cache are answered first, without vision or the LLM.
    pub async fn describe_stream(
        &self,
        prepared: Prepared,
        task: worker::RegionTask,
        parameters: Option<worker::GenerationParameters>,
        deadline: Deadline,
        start: Instant,
        tx: mpsc::Sender<Result<v1::RegionResult, Status>>,
    ) -> Result<(), ServiceError> {
        let n = prepared.masks.len();
        let question = format!("task:{}", task as i32);
        let keys: Vec<Option<String>> =
            (0..n).map(|i| self.answer_key(&prepared, &[i], &question, &[], parameters.as_ref())).collect();
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.cached_answer(key.as_deref()).await {
                Some(answer) => {
                    let result = region_result(&prepared, i, answer, cached_metadata(&prepared, start));
                    metrics::counter!("osprey_gateway_regions_total").increment(1);
                    if tx.send(Ok(result)).await.is_err() {
                        return Ok(());
                    }
                }
                None => missing.push(i),
            }
        }
        if missing.is_empty() {
            return Ok(()); // every answer was cached, or everything mode found nothing
        }
        let pooled = self.pool(&prepared, &missing, deadline).await?;
        let questions = missing
            .iter()
            .enumerate()
            .map(|(row, &i)| {
                Ok(worker::Question {
                    index: i as u32,
                    prompt: Some(worker::question::Prompt::Task(task as i32)),
                    history: vec![],
                    mask_tokens: Some(pooled.mask_tokens(row..row + 1)?),
                    pos_tokens: Some(pooled.pos_tokens(row..row + 1)?),
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let mut stream = self.generate(&prepared, &pooled, questions.clone(), parameters, deadline).await?;
        let mut answered = Vec::new();
        let mut retries = 0;
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => break,
                // The replica went away mid-answer: the questions it had not finished go to
                // another one (each region's answer is sent once, when finished).
                Err(ServiceError::Unavailable(why)) if retries < MAX_STREAM_RETRIES => {
                    retries += 1;
                    let rest: Vec<worker::Question> =
                        questions.iter().filter(|q| !answered.contains(&q.index)).cloned().collect();
                    tracing::warn!(%why, questions = rest.len(), "LLM answer stream broke; asking another replica");
                    metrics::counter!("osprey_gateway_llm_stream_retries_total").increment(1);
                    stream = self.generate(&prepared, &pooled, rest, parameters, deadline).await?;
                    continue;
                }
                Err(err) => return Err(err),
            };
            if !response.finished {
                continue;
            }
            let i = response.question_index as usize;
            if !missing.contains(&i) || answered.contains(&response.question_index) {
                return Err(ServiceError::Internal(format!(
                    "the LLM worker answered unknown or repeated question {i}"
                )));
            }
            answered.push(response.question_index);
            let metadata = answer_metadata(
                &prepared,
                &pooled,
                response.timing.as_ref(),
                response.prefix_cache_hit,
                start,
            );
            let stored = keys[i].as_ref().map(|key| (key.clone(), answer_to_bytes(key, &response)));
            metrics::counter!("osprey_gateway_regions_total").increment(1);
            if tx.send(Ok(region_result(&prepared, i, response, metadata))).await.is_err() {
                return Ok(()); // the client has gone; dropping `stream` cancels the rest downstream
            }
            if let Some((key, answer)) = stored {
                self.cache.put_result(&key, answer).await;
            }
        }
        Ok(())
    }

    /// A free-form question (Ask, Chat) with its regions prepared; the answer comes from the
    /// result cache (with its key) or as the LLM's stream.
    pub async fn question_answer(
        &self,
        input: QuestionInput,
        deadline: Deadline,
    ) -> Result<(Prepared, Answer, Option<String>), ServiceError> {
        let QuestionInput { regions, question, verbatim, history, parameters } = input;
        let prepared = self.prepare(regions, deadline).await?;
        let n = prepared.masks.len();
        let all: Vec<usize> = (0..n).collect();
        let (kind, prompt) = if verbatim {
            ("verbatim", worker::question::Prompt::Verbatim(question.clone()))
        } else {
            ("text", worker::question::Prompt::Text(question.clone()))
        };
        let key =
            self.answer_key(&prepared, &all, &format!("{kind}:{question}"), &history, parameters.as_ref());
        if let Some(answer) = self.cached_answer(key.as_deref()).await {
            return Ok((prepared, Answer::Cached(answer), key));
        }
        let pooled = self.pool(&prepared, &all, deadline).await?;
        let question = worker::Question {
            index: 0,
            prompt: Some(prompt),
            history: history
                .iter()
                .map(|t| worker::Exchange { question: t.question.clone(), answer: t.answer.clone() })
                .collect(),
            mask_tokens: (n > 0).then(|| pooled.mask_tokens(0..n)).transpose()?,
            pos_tokens: (n > 0).then(|| pooled.pos_tokens(0..n)).transpose()?,
        };
        let stream = self.generate(&prepared, &pooled, vec![question], parameters, deadline).await?;
        Ok((prepared, Answer::Streaming(stream, Box::new(pooled)), key))
    }

    /// The last response of a streamed answer: kept in the result cache (when the request has a
    /// key) and summed up in the response metadata.
    pub async fn finish_answer(
        &self,
        key: Option<&str>,
        response: &worker::GenerateResponse,
        prepared: &Prepared,
        pooled: &Pooled,
        start: Instant,
    ) -> Metadata {
        if let Some(key) = key {
            self.cache.put_result(key, answer_to_bytes(key, response)).await;
        }
        answer_metadata(prepared, pooled, response.timing.as_ref(), response.prefix_cache_hit, start)
    }

    /// Sends questions to the routed LLM replica and returns its response stream. The image tokens
    /// are fetched from vision and sent only when that replica does not keep them.
    async fn generate(
        &self,
        prepared: &Prepared,
        pooled: &Pooled,
        questions: Vec<worker::Question>,
        parameters: Option<worker::GenerationParameters>,
        deadline: Deadline,
    ) -> Result<Answers, ServiceError> {
        let request = worker::GenerateRequest {
            image_key: prepared.image.key.clone(),
            image_tokens: None,
            questions,
            parameters,
            feature_revision: pooled.response.feature_revision.clone(),
        };
        self.llm
            .generate(deadline, request, async || self.image_tokens(&prepared.image, deadline).await)
            .await
    }

    /// The result-cache key of a question about `regions` of `prepared`, or `None` when the
    /// answer is not deterministic (sampling) or the result cache is off.
    fn answer_key(
        &self,
        prepared: &Prepared,
        regions: &[usize],
        question: &str,
        history: &[v1::Turn],
        parameters: Option<&worker::GenerationParameters>,
    ) -> Option<String> {
        let greedy = parameters.and_then(|p| p.temperature).unwrap_or(0.0) == 0.0;
        if !greedy || !self.cache.caches_results() {
            return None;
        }
        let masks: Vec<&Mask> = regions.iter().map(|&i| &prepared.masks[i]).collect();
        Some(answer_key(&self.model_revision, &prepared.image.key, &masks, question, history, parameters))
    }

    /// The LLM's final response stored under `key`, if any.
    async fn cached_answer(&self, key: Option<&str>) -> Option<worker::GenerateResponse> {
        let key = key?;
        answer_from_bytes(key, &self.cache.get_result(key).await?)
    }
}
