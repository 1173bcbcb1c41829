//! The skeleton every model worker (vision, SAM) is built on: one model thread fed by a bounded
//! queue that takes what is waiting up to a batch limit, [`ModelQueue::ask`] to hand it a job and
//! await the answer within the request's deadline, and [`serve_worker`] / [`main`] for the life of
//! the process (warm up, report SERVING, serve, drain on SIGTERM).
//!
//! A worker supplies its model as a [`Model`]: a job type (usually an enum with one variant per
//! RPC, each holding a [`Reply`]), which jobs may share a batch, and how a batch runs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tracing::{Instrument, Span};

use crate::ServiceError;
use crate::error::respond;
use crate::grpc::{Admission, serve, shutdown_signal, standard_routes};
use crate::image::RgbImage;
use crate::telemetry::{TelemetryArgs, init_telemetry};

/// A model that runs on its own thread, one batch of jobs at a time.
pub trait Model: Send + 'static {
    type Job: Send + 'static;

    /// Whether `next` may run in the same batch as `first` (e.g. both are encodes).
    fn batches_with(first: &Self::Job, next: &Self::Job) -> bool;

    /// Whether the job's caller has gone, so its work can be skipped.
    fn abandoned(job: &Self::Job) -> bool;

    /// Runs jobs taken together (at least one); each job answers its own [`Reply`].
    fn run(&mut self, batch: Vec<Self::Job>);
}

/// Where a job's answer goes, with the span of the request that asked (entered while it runs).
pub struct Reply<T> {
    sender: oneshot::Sender<Result<T, ServiceError>>,
    span: Span,
}

impl<T> Reply<T> {
    /// A reply and the receiver of its answer, to drive a [`Model`] directly (tests, benchmarks);
    /// [`ModelQueue::ask`] makes its own.
    pub fn new() -> (Self, oneshot::Receiver<Result<T, ServiceError>>) {
        let (sender, receiver) = oneshot::channel();
        (Self { sender, span: Span::current() }, receiver)
    }

    /// Whether the request has gone (its deadline passed or its client hung up).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// The asking request's span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Answers the request; an answer nobody waits for any more is dropped.
    pub fn send(self, result: Result<T, ServiceError>) {
        let _ = self.sender.send(result);
    }
}

/// The sending side of a model thread's queue.
pub struct ModelQueue<J> {
    jobs: mpsc::Sender<J>,
    worker: &'static str,
}

impl<J: Send + 'static> ModelQueue<J> {
    /// Starts `model` on a thread named `thread_name`. The queue holds at most `capacity` jobs;
    /// the thread takes up to `max_batch_size` of those waiting at once.
    pub fn start<M: Model<Job = J>>(
        worker: &'static str,
        thread_name: &str,
        model: M,
        capacity: usize,
        max_batch_size: usize,
    ) -> Self {
        let (jobs, receiver) = mpsc::channel(capacity.max(1));
        let max_batch_size = max_batch_size.max(1);
        std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || model_thread(model, receiver, max_batch_size))
            .expect("spawning the model thread");
        Self { jobs, worker }
    }

    /// Queues the job `make` builds around a [`Reply`] and awaits its answer until `deadline`.
    /// A full queue is refused at once (RESOURCE_EXHAUSTED, with a retry hint), never waited on.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> J,
        deadline: Option<Instant>,
    ) -> Result<T, ServiceError> {
        let (reply, receiver) = Reply::new();
        let job = make(reply);
        self.jobs.try_send(job).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => ServiceError::Overloaded(format!(
                "the {} model queue is full; retry later or on another replica",
                self.worker
            )),
            mpsc::error::TrySendError::Closed(_) => {
                ServiceError::Unavailable(format!("the {} model thread has stopped", self.worker))
            }
        })?;
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), receiver).await.map_err(|_| {
                ServiceError::DeadlineExceeded(format!(
                    "the request's deadline passed while the {} model worked on it",
                    self.worker
                ))
            })?,
            None => receiver.await,
        };
        answer.map_err(|_| {
            ServiceError::Internal(format!("the {} model thread dropped the request", self.worker))
        })?
    }
}

/// Runs batches until every sender is gone. A job that cannot join the current batch starts the
/// next one; jobs whose caller has gone are dropped before any compute.
fn model_thread<M: Model>(mut model: M, mut jobs: mpsc::Receiver<M::Job>, max_batch_size: usize) {
    let mut deferred: Option<M::Job> = None;
    loop {
        let Some(first) = deferred.take().or_else(|| jobs.blocking_recv()) else { return };
        let mut batch = vec![first];
        while batch.len() < max_batch_size {
            match jobs.try_recv() {
                Ok(job) if M::batches_with(&batch[0], &job) => batch.push(job),
                Ok(job) => {
                    deferred = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        batch.retain(|job| !M::abandoned(job));
        if !batch.is_empty() {
            model.run(batch);
        }
    }
}

/// The deadline a caller set with the `grpc-timeout` header, if any.
pub fn request_deadline(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Instant::now().checked_add(timeout)
}

/// A `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The edge of every worker RPC: admission (a full worker refuses at once), the handler, and the
/// answer, failures counted by code in one place ([`respond`]).
pub async fn handle<T>(
    admission: &Admission,
    handler: impl Future<Output = Result<T, ServiceError>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let result = match admission.admit() {
        Ok(_permit) => handler.await,
        Err(refused) => Err(refused),
    };
    respond(result)
}

/// Pixels sent to a worker, checked against its size limit.
pub fn image_from_proto(
    image: osprey_proto::worker::v1::RgbImage,
    max_pixels: u64,
) -> Result<RgbImage, ServiceError> {
    if image.width as u64 * image.height as u64 > max_pixels {
        return Err(ServiceError::invalid("image", format!("over the limit of {max_pixels} pixels")));
    }
    RgbImage::from_raw(image.width, image.height, image.rgb).map_err(|e| ServiceError::invalid("image", e))
}

/// Nanoseconds since `start`, for the `Timing` of a response.
pub fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Serves a worker whose model is loaded: `warm_up` runs the model once (health still says
/// NOT_SERVING, so no balancer sends traffic to a cold replica), `add_service` adds the worker's
/// gRPC service to the standard routes (health, reflection); then SERVING until `shutdown`
/// completes, when the worker reports NOT_SERVING, stops accepting and lets requests in flight
/// finish.
pub async fn serve_worker(
    service_name: &'static str,
    listener: TcpListener,
    tls: &crate::grpc::ServerTlsArgs,
    shutdown: impl Future<Output = ()> + Send,
    warm_up: impl Future<Output = anyhow::Result<()>>,
    add_service: impl FnOnce(Routes) -> Routes,
) -> anyhow::Result<()> {
    let tls = tls.config()?;
    let start = Instant::now();
    warm_up.instrument(tracing::info_span!("warm_up")).await?;
    tracing::info!(seconds = start.elapsed().as_secs_f64(), "warmed up");
    let (routes, health) = standard_routes(&[service_name]).await;
    let routes = add_service(routes);
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "serving");
    serve(listener, routes, &health, tls, shutdown).await?;
    tracing::info!("drained");
    Ok(())
}

/// A worker binary's `serve`: telemetry, the listener on `listen`, then `run` until SIGTERM or
/// ctrl-c.
pub async fn main<F, Fut>(
    binary: &'static str,
    telemetry: &TelemetryArgs,
    listen: SocketAddr,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let _telemetry = init_telemetry(telemetry, binary)?;
    let listener = TcpListener::bind(listen).await?;
    run(listener, Box::pin(shutdown_signal())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds numbers; records the batches it ran.
    struct Adder {
        batches: std::sync::mpsc::Sender<Vec<u32>>,
    }

    enum AdderJob {
        Add(u32, Reply<u32>),
        Fail(Reply<u32>),
    }

    impl Model for Adder {
        type Job = AdderJob;

        fn batches_with(first: &AdderJob, next: &AdderJob) -> bool {
            matches!((first, next), (AdderJob::Add(..), AdderJob::Add(..)))
        }

        fn abandoned(job: &AdderJob) -> bool {
            match job {
                AdderJob::Add(_, reply) | AdderJob::Fail(reply) => reply.is_closed(),
            }
        }

        fn run(&mut self, batch: Vec<AdderJob>) {
            // Record the batch before answering: a test that has every answer must also see
            // every batch.
            let seen = batch
                .iter()
                .filter_map(|job| match job {
                    AdderJob::Add(n, _) => Some(*n),
                    AdderJob::Fail(_) => None,
                })
                .collect();
            let _ = self.batches.send(seen);
            for job in batch {
                match job {
                    AdderJob::Add(n, reply) => reply.send(Ok(n + 1)),
                    AdderJob::Fail(reply) => reply.send(Err(ServiceError::Internal("failed".into()))),
                }
            }
        }
    }

    /// An [`Adder`] that says when it starts a batch and then waits for the gate to open.
    struct Gated {
        adder: Adder,
        started: std::sync::mpsc::Sender<()>,
        gate: std::sync::mpsc::Receiver<()>,
    }

    impl Model for Gated {
        type Job = AdderJob;
        fn batches_with(first: &AdderJob, next: &AdderJob) -> bool {
            Adder::batches_with(first, next)
        }
        fn abandoned(job: &AdderJob) -> bool {
            Adder::abandoned(job)
        }
        fn run(&mut self, batch: Vec<AdderJob>) {
            let _ = self.started.send(());
            let _ = self.gate.recv();
            self.adder.run(batch)
        }
    }

    #[tokio::test]
    async fn jobs_waiting_together_run_as_one_batch() {
        let (batches, ran) = std::sync::mpsc::channel();
        let (started, batch_started) = std::sync::mpsc::channel();
        let (gate, gate_receiver) = std::sync::mpsc::channel();
        let model = Gated { adder: Adder { batches }, started, gate: gate_receiver };
        let queue = std::sync::Arc::new(ModelQueue::start("test", "test-model", model, 16, 3));
        let ask = |n: u32| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.ask(|reply| AdderJob::Add(n, reply), None).await })
        };
        // The thread takes the first job alone and holds it while four more queue up.
        let first = ask(0);
        tokio::task::spawn_blocking(move || {
            batch_started.recv().unwrap();
            batch_started
        })
        .await
        .unwrap();
        let rest: Vec<_> = (1..=4).map(ask).collect();
        while queue.jobs.capacity() > 16 - 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..3 {
            gate.send(()).unwrap();
        }
        assert_eq!(first.await.unwrap().unwrap(), 1);
        for (n, answer) in (1..=4).zip(rest) {
            assert_eq!(answer.await.unwrap().unwrap(), n + 1);
        }
        let batches: Vec<Vec<u32>> = ran.try_iter().collect();
        assert_eq!(batches, [vec![0], vec![1, 2, 3], vec![4]]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_failure_keeps_its_code() {
        let (batches, _ran) = std::sync::mpsc::channel();
        let queue = ModelQueue::start("test", "test-model", Adder { batches }, 1, 1);
        let err = queue.ask(AdderJob::Fail, None).await.unwrap_err();
        assert_eq!(err, ServiceError::Internal("failed".into()));

        // Fill the queue with a job whose sender the thread cannot drain quickly enough: a full
        // queue answers RESOURCE_EXHAUSTED instead of waiting.
        let (sender, _receiver) = mpsc::channel::<u32>(1);
        sender.try_send(1).unwrap();
        let full = ModelQueue { jobs: sender, worker: "test" };
        let err = full.ask(|_: Reply<u32>| 2, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    }

    #[tokio::test]
    async fn an_answer_past_the_deadline_is_deadline_exceeded() {
        let (sender, _receiver) = mpsc::channel::<Reply<u32>>(4);
        let stalled = ModelQueue { jobs: sender, worker: "test" };
        let deadline = Instant::now() + Duration::from_millis(20);
        let err = stalled.ask(|reply| reply, Some(deadline)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("90000000u"), Some(Duration::from_secs(90)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
