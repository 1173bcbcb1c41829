//! The generation engine: the synchronous core that owns the model, on its own thread, so that
//! nothing async ever waits on a forward pass.
//!
//! A [`GenerateRequest`] is one image and several questions about it (one per region, or several
//! turns of a chat). The engine
//!
//! 1. computes the longest token prefix the questions share (system prompt, image, overview text;
//!    it stops before the first region token, since region tokens differ per question), reusing the
//!    longest cached prefix of the same `image_key` and computing only the rest ([`PrefixKv`]);
//! 2. queues one sequence per question, starting from that prefix;
//! 3. runs continuous batching: every [`Engine::step`] admits queued sequences (their remaining
//!    prompt is prefilled in the same forward as the running sequences' next tokens), picks one
//!    token per sequence and sends it on the question's stream. Sequences leave at EOS or
//!    `max_new_tokens`; a sequence whose receiver was dropped is removed before the next forward.
//!
//! [`Engine::spawn`] runs that loop on a dedicated `std::thread` fed by a bounded channel; new
//! requests join between decode steps. Anything async stays in the caller.
//!
//! Known costs: a new request's shared prefix is prefilled on arrival, which pauses decoding of
//! the running batch for that long (chunked prefill would bound it).

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use tokio::sync::mpsc;

use crate::error::LlmError;
use crate::models::osprey_llama::{
    Config, LogitsMode, OspreyLlama, PrefixKv, SeqCache, SeqStep, plan_counts, splice_plan,
};
use crate::prompt::PromptError;
use crate::sampling::{FinishReason, Sampler, SamplingParams};
use crate::tokenizer::IMAGE_TOKEN_INDEX;

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together in one forward.
    pub max_batch_size: usize,
    /// Requests waiting in the channel to the engine thread before `try_submit` says overloaded
    /// (the engine takes them from the channel only while at most a batch of questions waits).
    pub max_queued_requests: usize,
    /// Computed prefixes kept for reuse by later requests about the same image (LRU).
    pub prefix_cache_entries: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch_size: 32, max_queued_requests: 64, prefix_cache_entries: 16 }
    }
}

/// One question: its prompt ids (from `tokenizer_image_token`), its regions' tokens and how to
/// sample.
#[derive(Debug, Clone)]
pub struct Question {
    pub input_ids: Vec<i64>,
    /// `[N, hidden]`, one row per `<mask><pos>` pair, in prompt order.
    pub mask_tokens: Tensor,
    pub pos_tokens: Tensor,
    pub params: SamplingParams,
}

/// Several questions about one image.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Identifies `image_features` for prefix reuse across requests (the service passes the image
    /// key with the feature revision); `None` shares the prefix within this request only. Equal
    /// keys must mean equal features.
    pub image_key: Option<String>,
    /// res4 tokens `[T, mm_hidden]` before the projector; `None` for prompts without `<image>`.
    pub image_features: Option<Tensor>,
    pub questions: Vec<Question>,
}

/// What a question's stream receives: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Finished(Finished),
    Error(String),
}

/// The end of a question's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub reason: FinishReason,
    pub generated_tokens: usize,
    /// Prompt length in positions (image tokens included).
    pub prompt_positions: usize,
    /// Positions shared with the request's other questions (computed once).
    pub shared_prefix_positions: usize,
    /// Positions taken from the prefix cache of earlier requests.
    pub cached_prefix_positions: usize,
}

/// A question's token stream.
pub type EventStream = mpsc::UnboundedReceiver<Event>;

/// Checks a request against the model without computing anything: prompt structure, image and
/// region counts and shapes, sampling parameters, length.
pub fn validate_request(cfg: &Config, req: &GenerateRequest) -> Result<(), LlmError> {
    if req.questions.is_empty() {
        return Err(LlmError::InvalidInput("a request needs at least one question".into()));
    }
    let mm = cfg.mm_hidden_size.expect("the loaded model fills mm_hidden_size. This is a bug.");
    let image_tokens = match &req.image_features {
        Some(f) => match f.dims() {
            [t, c] if *c == mm && *t > 0 => *t,
            dims => {
                return Err(LlmError::InvalidInput(format!(
                    "image_features must be [T, {mm}], got {dims:?}"
                )));
            }
        },
        None => 0,
    };
    let expected_images = usize::from(req.image_features.is_some());
    for (qi, q) in req.questions.iter().enumerate() {
        let ctx = |e: String| LlmError::InvalidInput(format!("question {qi}: {e}"));
        if q.input_ids.is_empty() {
            return Err(ctx("input_ids is empty".into()));
        }
        q.params.validate().map_err(ctx)?;
        let plan = splice_plan(&q.input_ids, cfg)?;
        let (images, pairs) = plan_counts(&plan);
        if images != expected_images {
            return Err(PromptError::ImageCount { found: images, expected: expected_images }.into());
        }
        let hidden = cfg.hidden_size;
        let n = match (q.mask_tokens.dims(), q.pos_tokens.dims()) {
            ([n, a], [m, b]) if n == m && *a == hidden && *b == hidden => *n,
            (a, b) => {
                return Err(ctx(format!(
                    "mask_tokens and pos_tokens must both be [N, {hidden}], got {a:?} and {b:?}"
                )));
            }
        };
        if pairs != n {
            return Err(PromptError::RegionCount { pairs, regions: n }.into());
        }
        let positions = positions_of(&q.input_ids, image_tokens);
        if positions > cfg.max_position_embeddings {
            return Err(ctx(format!(
                "the prompt has {positions} positions, more than the model's {}",
                cfg.max_position_embeddings
            )));
        }
    }
    Ok(())
}

/// Length of the id prefix all questions share: their longest common prefix, cut before the first
/// region token and so that every question keeps at least one id of its own.
fn shared_prefix_len(questions: &[Question], cfg: &Config) -> usize {
    let first = &questions[0].input_ids;
    let mut len = first.len();
    for q in &questions[1..] {
        len = len.min(first.iter().zip(&q.input_ids).take_while(|(a, b)| a == b).count());
    }
    let min_len = questions.iter().map(|q| q.input_ids.len()).min().unwrap_or(0);
    len = len.min(min_len.saturating_sub(1));
    let region = |id: &i64| *id == i64::from(cfg.mask_token_id) || *id == i64::from(cfg.pos_token_id);
    first[..len].iter().position(region).unwrap_or(len)
}

/// Positions taken by `ids` once spliced (the sentinel expands to `image_tokens` positions).
fn positions_of(ids: &[i64], image_tokens: usize) -> usize {
    ids.iter().map(|&i| if i == IMAGE_TOKEN_INDEX { image_tokens } else { 1 }).sum()
}

struct PrefixEntry {
    key: String,
    ids: Vec<i64>,
    image_tokens: usize,
    kv: PrefixKv,
}

/// Computed prefixes by image key, least recently used first.
struct PrefixCache {
    capacity: usize,
    entries: VecDeque<PrefixEntry>,
}

impl PrefixCache {
    /// The cached prefix sharing the most leading ids with `ids` (same key and image size), as
    /// (shared ids, its keys/values truncated to those ids' positions).
    fn longest_match(&mut self, key: &str, ids: &[i64], image_tokens: usize) -> Option<(usize, PrefixKv)> {
        let (best, m) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.key == key && e.image_tokens == image_tokens)
            .map(|(i, e)| (i, e.ids.iter().zip(ids).take_while(|(a, b)| a == b).count()))
            .max_by_key(|&(_, m)| m)?;
        if m == 0 {
            return None;
        }
        let entry = self.entries.remove(best).expect("index from the scan. This is a bug.");
        let kv = entry.kv.truncate(positions_of(&ids[..m], image_tokens));
        self.entries.push_back(entry);
        Some((m, kv.ok()?))
    }

    fn insert(&mut self, key: String, ids: Vec<i64>, image_tokens: usize, kv: PrefixKv) {
        self.entries.retain(|e| !(e.key == key && e.ids == ids));
        self.entries.push_back(PrefixEntry { key, ids, image_tokens, kv });
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }
}

/// A question waiting for a batch slot.
struct Pending {
    prefix: PrefixKv,
    /// The rest of its prompt, spliced: `[T, hidden]`.
    suffix: Tensor,
    sampler: Sampler,
    tx: mpsc::UnboundedSender<Event>,
    done: Finished,
}

/// A sequence in the running batch.
struct Running {
    cache: SeqCache,
    next_input: Tensor,
    sampler: Sampler,
    tx: mpsc::UnboundedSender<Event>,
    done: Finished,
}

/// The synchronous engine: call [`Engine::submit`] and [`Engine::step`] directly, or
/// [`Engine::spawn`] it on its own thread.
pub struct Engine {
    model: OspreyLlama,
    cfg: EngineConfig,
    prefixes: PrefixCache,
    waiting: VecDeque<Pending>,
    running: Vec<Running>,
}

impl Engine {
    pub fn new(model: OspreyLlama, cfg: EngineConfig) -> Self {
        let prefixes = PrefixCache { capacity: cfg.prefix_cache_entries, entries: VecDeque::new() };
        Self { model, cfg, prefixes, waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn model(&self) -> &OspreyLlama {
        &self.model
    }

    /// Sequences queued and running.
    pub fn load(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Validates and queues a request; returns one stream per question, in order.
    pub fn submit(&mut self, req: GenerateRequest) -> Result<Vec<EventStream>, LlmError> {
        validate_request(self.model.config(), &req)?;
        let (txs, rxs): (Vec<_>, Vec<_>) = req.questions.iter().map(|_| mpsc::unbounded_channel()).unzip();
        self.enqueue(req, txs)?;
        Ok(rxs)
    }

    /// Prepares a validated request: shared prefix (cached or computed) and per-question suffixes.
    fn enqueue(
        &mut self,
        req: GenerateRequest,
        txs: Vec<mpsc::UnboundedSender<Event>>,
    ) -> Result<(), LlmError> {
        let cfg = self.model.config().clone();
        let image = req.image_features.as_ref().map(|f| self.model.project_image(f)).transpose()?;
        let image_tokens = image.as_ref().map_or(0, |t| t.dim(0).unwrap_or(0));
        let no_regions = Tensor::zeros((0, cfg.hidden_size), self.model.dtype(), self.model.device())?;
        let plen = shared_prefix_len(&req.questions, &cfg);
        let prefix_ids = &req.questions[0].input_ids[..plen];
        let with_image = |ids: &[i64]| if ids.contains(&IMAGE_TOKEN_INDEX) { image.as_ref() } else { None };

        let cached = match &req.image_key {
            Some(key) if plen > 0 => self.prefixes.longest_match(key, prefix_ids, image_tokens),
            _ => None,
        };
        let (reused_ids, mut prefix) = cached.unwrap_or_default();
        let cached_positions = prefix.len();
        if reused_ids < plen {
            let rest = &prefix_ids[reused_ids..];
            let embeds = self.model.splice(rest, with_image(rest), &no_regions, &no_regions)?;
            prefix = self.model.prefill_prefix(prefix, &embeds)?;
            if let Some(key) = &req.image_key {
                self.prefixes.insert(key.clone(), prefix_ids.to_vec(), image_tokens, prefix.clone());
            }
        }
        let mut pending = Vec::with_capacity(txs.len());
        for (q, tx) in req.questions.into_iter().zip(txs) {
            let rest = &q.input_ids[plen..];
            let suffix = self.model.splice(rest, with_image(rest), &q.mask_tokens, &q.pos_tokens)?;
            let done = Finished {
                reason: FinishReason::Length,
                generated_tokens: 0,
                prompt_positions: prefix.len() + suffix.dim(0)?,
                shared_prefix_positions: prefix.len(),
                cached_prefix_positions: cached_positions,
            };
            pending.push(Pending {
                prefix: prefix.clone(),
                suffix,
                sampler: Sampler::new(q.params),
                tx,
                done,
            });
        }
        // Queued only once every question is ready, so a failure leaves nothing half-queued.
        self.waiting.extend(pending);
        Ok(())
    }

    /// One batched forward: drops sequences nobody listens to, admits queued ones up to the batch
    /// size, and emits one token per running sequence. Returns how many sequences were stepped.
    pub fn step(&mut self) -> Result<usize, LlmError> {
        self.waiting.retain(|p| !p.tx.is_closed());
        self.running.retain(|r| !r.tx.is_closed());
        while self.running.len() < self.cfg.max_batch_size.max(1) {
            let Some(p) = self.waiting.pop_front() else { break };
            let cache = SeqCache::new(p.prefix);
            self.running.push(Running {
                cache,
                next_input: p.suffix,
                sampler: p.sampler,
                tx: p.tx,
                done: p.done,
            });
        }
        metrics::gauge!("osprey_llm_queue_size").set(self.waiting.len() as f64);
        if self.running.is_empty() {
            return Ok(0);
        }
        let n = self.running.len();
        metrics::histogram!("osprey_llm_batch_size").record(n as f64);
        let rows = match self.forward_running() {
            Ok(rows) => rows,
            Err(e) => {
                // The caches may be half-written: fail every sequence of this batch.
                fail(self.running.drain(..), &format!("model: {e}"));
                return Err(e.into());
            }
        };
        let eos = self.model.config().eos_token_id;
        let max_pos = self.model.config().max_position_embeddings;
        let mut keep = Vec::with_capacity(n);
        let mut next_tokens = Vec::with_capacity(n);
        for (mut r, row) in self.running.drain(..).zip(rows) {
            let token = r.sampler.sample(&row);
            let params = r.sampler.params();
            let finish = if params.stop_at_eos && token == eos {
                Some(FinishReason::Eos)
            } else {
                if r.tx.send(Event::Token(token)).is_err() {
                    continue;
                }
                r.done.generated_tokens += 1;
                let full = r.cache.len() >= max_pos;
                (r.done.generated_tokens >= params.max_new_tokens || full).then_some(FinishReason::Length)
            };
            match finish {
                Some(reason) => {
                    r.done.reason = reason;
                    let _ = r.tx.send(Event::Finished(r.done.clone()));
                }
                None => {
                    next_tokens.push(token);
                    keep.push(r);
                }
            }
        }
        if !keep.is_empty() {
            let embeds = match self.model.embed_ids(&next_tokens) {
                Ok(e) => e,
                Err(e) => {
                    fail(keep.into_iter(), &format!("model: {e}"));
                    return Err(e.into());
                }
            };
            for (i, r) in keep.iter_mut().enumerate() {
                // In range by construction: one embedding row per kept sequence.
                r.next_input = embeds.narrow(0, i, 1).expect("one row per sequence. This is a bug.");
            }
        }
        self.running = keep;
        Ok(n)
    }

    /// One forward over the running batch; each sequence's next-token logits as f32.
    fn forward_running(&mut self) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut steps: Vec<SeqStep<'_>> = self
            .running
            .iter_mut()
            .map(|r| SeqStep { cache: &mut r.cache, embeds: r.next_input.clone(), logits: LogitsMode::Last })
            .collect();
        self.model
            .forward(&mut steps)?
            .into_iter()
            .map(|l| {
                l.expect("Last logits were asked for. This is a bug.")
                    .squeeze(0)?
                    .to_dtype(DType::F32)?
                    .to_vec1()
            })
            .collect()
    }

    /// Runs the engine on a dedicated thread. It stops once every handle is dropped and all
    /// accepted work is finished.
    pub fn spawn(self) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(self.cfg.max_queued_requests.max(1));
        let handle = EngineHandle { tx, model_cfg: Arc::new(self.model.config().clone()) };
        let thread = std::thread::Builder::new().name("llm-engine".into()).spawn(move || self.run(rx))?;
        Ok((handle, thread))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if !self.has_work() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            // New requests join between decode steps, while at most a batch of questions waits:
            // the rest stay in the bounded channel, so that a full channel refuses new requests
            // (RESOURCE_EXHAUSTED) instead of the waiting list growing without bound.
            while open && self.waiting.len() < self.cfg.max_batch_size.max(1) {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "decode step failed");
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate { request, streams } => {
                let senders = streams.clone();
                if let Err(e) = self.enqueue(request, streams) {
                    let msg = e.to_string();
                    for tx in senders {
                        let _ = tx.send(Event::Error(msg.clone()));
                    }
                }
            }
        }
    }
}

/// Ends the streams of `seqs` with an error.
fn fail(seqs: impl Iterator<Item = Running>, msg: &str) {
    for r in seqs {
        let _ = r.tx.send(Event::Error(msg.to_string()));
    }
}

enum Command {
    Generate { request: GenerateRequest, streams: Vec<mpsc::UnboundedSender<Event>> },
}

/// Submits requests to an engine thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    model_cfg: Arc<Config>,
}

impl EngineHandle {
    /// Validates `req` here (errors are the client's) and queues it without waiting; a full
    /// queue is [`LlmError::Overloaded`].
    pub fn try_submit(&self, req: GenerateRequest) -> Result<Vec<EventStream>, LlmError> {
        let (cmd, rxs) = self.command(req)?;
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LlmError::Overloaded("the generation queue is full".into()),
            mpsc::error::TrySendError::Closed(_) => LlmError::EngineStopped,
        })?;
        Ok(rxs)
    }

    /// Like [`Self::try_submit`] but waits for room in the queue.
    pub async fn submit(&self, req: GenerateRequest) -> Result<Vec<EventStream>, LlmError> {
        let (cmd, rxs) = self.command(req)?;
        self.tx.send(cmd).await.map_err(|_| LlmError::EngineStopped)?;
        Ok(rxs)
    }

    /// The model configuration requests are validated against.
    pub fn model_config(&self) -> &Config {
        &self.model_cfg
    }

    fn command(&self, req: GenerateRequest) -> Result<(Command, Vec<EventStream>), LlmError> {
        validate_request(&self.model_cfg, &req)?;
        let (txs, rxs): (Vec<_>, Vec<_>) = req.questions.iter().map(|_| mpsc::unbounded_channel()).unzip();
        Ok((Command::Generate { request: req, streams: txs }, rxs))
    }
}
