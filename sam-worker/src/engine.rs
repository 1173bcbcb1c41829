//! The SAM model thread ([`SamEngine`], a [`Model`] of the shared worker skeleton): image
//! embeddings, prompt decoding and automatic mask generation on one thread. Predict requests
//! waiting together are decoded together: the prompts of every request on the same image go
//! through the mask decoder in one batched call.

use std::sync::Arc;

use osprey_common::ServiceError;
use osprey_common::image::RgbImage;
use osprey_common::worker::{Model, Reply};

use crate::amg::{AmgParams, GeneratedMask, generate};
use crate::error::SamError;
use crate::predictor::{ImageEmbedding, Prediction, SamPredictor};
use crate::prompt::Prompt;

/// What the model thread is asked to do.
pub enum SamJob {
    Embed(EmbedJob),
    Predict(PredictJob),
    Everything(EverythingJob),
}

pub struct EmbedJob {
    pub image: RgbImage,
    pub reply: Reply<Arc<ImageEmbedding>>,
}

pub struct PredictJob {
    pub embedding: Arc<ImageEmbedding>,
    pub prompts: Vec<Prompt>,
    pub reply: Reply<Vec<Prediction>>,
}

/// The masks, and the whole-image embedding when one was computed or used (to keep resident).
pub type EverythingOutput = (Vec<GeneratedMask>, Option<Arc<ImageEmbedding>>);

pub struct EverythingJob {
    pub image: Option<RgbImage>,
    pub embedding: Option<Arc<ImageEmbedding>>,
    pub params: AmgParams,
    pub reply: Reply<EverythingOutput>,
}

/// The SAM predictor on its model thread.
pub struct SamEngine {
    predictor: SamPredictor,
}

impl SamEngine {
    pub fn new(predictor: SamPredictor) -> Self {
        Self { predictor }
    }

    fn embed(&self, image: &RgbImage) -> Result<ImageEmbedding, SamError> {
        metrics::counter!("osprey_sam_encoder_runs_total").increment(1);
        self.predictor.embed(image)
    }

    fn everything(
        &self,
        image: Option<RgbImage>,
        embedding: Option<Arc<ImageEmbedding>>,
        params: &AmgParams,
    ) -> Result<EverythingOutput, SamError> {
        // The whole-image embedding is computed once here so the service can keep it.
        let embedding = match (embedding, &image) {
            (Some(e), _) => Some(e),
            (None, Some(image)) => Some(Arc::new(self.embed(image)?)),
            (None, None) => None,
        };
        let masks = generate(&self.predictor, image.as_ref(), embedding.as_deref(), params)?;
        Ok((masks, embedding))
    }

    /// Decodes the prompts of every job on one image in one `predict_batch` call and hands each
    /// job its share. When that call fails, each job runs alone so that a failure is answered
    /// to the request that caused it.
    fn predict_together(&self, jobs: Vec<PredictJob>) {
        if jobs.len() > 1 {
            let prompts: Vec<Prompt> = jobs.iter().flat_map(|job| job.prompts.iter().cloned()).collect();
            let span = jobs[0].reply.span().clone();
            if let Ok(mut predictions) =
                span.in_scope(|| self.predictor.predict_batch(&jobs[0].embedding, &prompts))
            {
                // Split from the back so each job's predictions come off the end in order.
                for job in jobs.into_iter().rev() {
                    let share = predictions.split_off(predictions.len() - job.prompts.len());
                    job.reply.send(Ok(share));
                }
                return;
            }
        }
        for job in jobs {
            let _enter = job.reply.span().clone().entered();
            let result = self.predictor.predict_batch(&job.embedding, &job.prompts);
            job.reply.send(result.map_err(ServiceError::from));
        }
    }
}

impl Model for SamEngine {
    type Job = SamJob;

    fn batches_with(first: &SamJob, next: &SamJob) -> bool {
        matches!((first, next), (SamJob::Predict(_), SamJob::Predict(_)))
    }

    fn abandoned(job: &SamJob) -> bool {
        match job {
            SamJob::Embed(job) => job.reply.is_closed(),
            SamJob::Predict(job) => job.reply.is_closed(),
            SamJob::Everything(job) => job.reply.is_closed(),
        }
    }

    fn run(&mut self, batch: Vec<SamJob>) {
        let mut predicts = Vec::with_capacity(batch.len());
        for job in batch {
            match job {
                SamJob::Embed(job) => {
                    let _enter = job.reply.span().clone().entered();
                    let result = self.embed(&job.image).map(Arc::new).map_err(ServiceError::from);
                    job.reply.send(result);
                }
                SamJob::Everything(EverythingJob { image, embedding, params, reply }) => {
                    let _enter = reply.span().clone().entered();
                    let result = self.everything(image, embedding, &params);
                    reply.send(result.map_err(ServiceError::from));
                }
                SamJob::Predict(job) => predicts.push(job),
            }
        }
        if predicts.is_empty() {
            return;
        }
        metrics::histogram!("osprey_sam_predict_batch_size").record(predicts.len() as f64);
        // Requests on the same image share the decoder call, in order of first appearance.
        let mut by_image: Vec<Vec<PredictJob>> = Vec::new();
        for job in predicts {
            match by_image.iter_mut().find(|group| Arc::ptr_eq(&group[0].embedding, &job.embedding)) {
                Some(group) => group.push(job),
                None => by_image.push(vec![job]),
            }
        }
        for group in by_image {
            self.predict_together(group);
        }
    }
}
