//! The engine workers: one thread per device (`device = [...]`), each with
//! its own engine and model cache, running jobs in order.
//!
//! The engine is synchronous and CPU-heavy, so it runs on its own OS thread
//! (never on the async runtime); the thread reaches the store through the
//! runtime's handle. All workers, of this process and of any other on the
//! same database (`easel worker`), claim from the one queue in the store
//! under a lease (`store/leases.rs`), so a job runs on one worker at a time.
//! For each job:
//!
//! 1. reclaim jobs whose worker's lease expired (it died), then claim the
//!    next job in one transaction: the oldest queued one, unless a later
//!    one is for a model already loaded and the oldest has not been passed
//!    over `fair_skip_limit` times in a row; it is marked running
//!    (attempts + 1) under this worker's lease;
//! 2. register its cancel token and start its heartbeat: every second the
//!    lease is renewed and a cancel asked through any API node (the
//!    store's `cancel_requested`) stops the engine at its next step; a
//!    worker that lost its lease stops too and writes nothing more;
//! 3. group its pending image definitions by model (loaded once, its
//!    `ModelDefaults` returned); build each definition's engine job with
//!    the one builder, `JobRequest::build` (`worker/plan.rs`): one engine
//!    call of its `batchSize` images (seeds `seed + j`), exactly what
//!    `easel generate` runs. With `batch_definitions` on, jobs with equal
//!    settings (size, steps, guidance, scheduler, strength, batch size,
//!    LoRAs, inputs, tiling: `Job::batches_with`) run as one batch instead
//!    (`Job::append`): prompt `i` with seeds `seed_i + j` (faster, not
//!    bit-exact against separate runs on the CPU);
//! 4. encode each image, write it by hash (atomically), then record the
//!    definition's assets and resolved parameters in one transaction;
//! 5. finish the job (succeeded, failed, canceled) with refunds of
//!    definitions that made no images, and queue its webhooks.
//!
//! Definitions finished before a crash keep their images: when the dead
//! worker's lease expires the job is queued again and only its pending
//! definitions run, on whichever worker claims it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use easel_core::{decode_image, encode_image, ImageMetadata, RgbImageRef};
use tokio::runtime::Handle;

use easel_diffusion::pipelines::{ImageInput, MaskInput};

use crate::engine::{CancelToken, Engine, EngineError, Job, ModelDefaults};
use crate::inputs::mask_luma;
use crate::job::{InputRef, ItemResult, ItemSpec, JobError, JobStatus, Progress};
use crate::jobs;
use crate::metrics::Metrics;
use crate::store::{AssetRow, Claim, ItemRow, StoreError};
use crate::util::{new_id, now_ms};
use crate::{AppState, JobEvent};

mod handle;
mod plan;
mod schedule;

pub use handle::WorkerShared;
use plan::{plan, resolved};
pub use schedule::choose;

/// Start worker `index` (its slot in [`WorkerShared`]) on its own thread,
/// driving `engine` (built for that worker's device).
///
/// # Errors
/// When the OS refuses a new thread.
pub fn spawn(
    state: AppState,
    index: usize,
    engine: Box<dyn Engine>,
    rt: Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let device = state.worker().device(index).to_string();
    std::thread::Builder::new()
        .name(format!("easel-worker-{index}"))
        .spawn(move || {
            let seen = state.worker().wakes();
            Worker {
                ctx: Ctx {
                    owner: owner_id(&device),
                    state,
                    rt,
                    last_progress: std::cell::Cell::new(None),
                },
                engine,
                index,
                device,
                seen,
                skips: 0,
            }
            .run()
        })
}

struct Worker {
    ctx: Ctx,
    engine: Box<dyn Engine>,
    /// This worker's slot in [`WorkerShared`].
    index: usize,
    /// Its device's name (`cpu`, `cuda:0`), recorded with each result.
    device: String,
    /// The last wake this worker saw.
    seen: u64,
    /// Times in a row the oldest job was passed over for a loaded model.
    skips: u32,
}

/// What the worker uses besides the engine (so progress callbacks can
/// borrow it while the engine runs).
struct Ctx {
    /// This worker's name on the leases it holds: host, process id,
    /// device and a random suffix (a restarted process is a new owner).
    owner: String,
    state: AppState,
    rt: Handle,
    last_progress: std::cell::Cell<Option<Instant>>,
}

impl Ctx {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Record and broadcast progress (stored at most every 250 ms unless `force`).
    fn progress(&self, id: &str, progress: Progress, force: bool) {
        let due = force
            || self
                .last_progress
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
        if due {
            self.last_progress.set(Some(Instant::now()));
            let store = self.state.store();
            if let Err(e) = self.block(store.set_progress(id, &self.owner, &progress)) {
                tracing::warn!("job {id}: recording progress: {e}");
            }
        }
        self.state.emit(JobEvent::Progress {
            id: id.into(),
            progress,
        });
    }

    fn webhook(&self, id: &str, event: &str) {
        if let Err(e) = self.block(crate::jobs::queue_webhook(&self.state, id, event)) {
            tracing::warn!("job {id}: queueing webhook {event}: {e}");
        }
    }
}

/// Image definitions that run as one engine call: their rows, in order,
/// and the job that runs them all (each definition's job, built by
/// [`plan`], [appended](Job::append) to the first's).
struct Batch {
    rows: Vec<(ItemRow, Job)>,
    job: Job,
    defaults: ModelDefaults,
}

/// The decoded inputs of one model group, by asset hash (an input shared
/// by several definitions is read and decoded once).
#[derive(Default)]
struct Inputs {
    images: HashMap<String, ImageInput>,
    masks: HashMap<String, MaskInput>,
}

fn job_error_for(e: &EngineError, item_field: &str) -> JobError {
    let camel = |f: &str| -> String {
        let mut out = String::new();
        let mut upper = false;
        for c in f.chars() {
            if c == '_' {
                upper = true;
            } else if upper {
                out.push(c.to_ascii_uppercase());
                upper = false;
            } else {
                out.push(c);
            }
        }
        out
    };
    match e {
        EngineError::Canceled => JobError::new("canceled", "canceled by the client"),
        EngineError::ModelLoad(m) => JobError {
            code: "model_load_failed".into(),
            message: m.clone(),
            field: Some(format!("{item_field}.baseModel")),
        },
        EngineError::Invalid { field, message } => JobError {
            code: "invalid_value".into(),
            message: message.clone(),
            field: Some(format!("{item_field}.{}", camel(field))),
        },
        EngineError::Unsupported(m) => JobError {
            code: "unsupported".into(),
            message: m.clone(),
            field: None,
        },
        EngineError::Failed(m) => JobError::new("engine_error", m.clone()),
    }
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.ctx.state.is_shutting_down() || self.ctx.state.worker().is_stopping() {
                return;
            }
            let loaded: Vec<String> = self.engine.loaded().into_iter().map(|m| m.load).collect();
            let state = self.ctx.state.clone();
            let store = state.store();
            let config = state.config();
            match self.ctx.block(store.reclaim_expired(config.max_attempts)) {
                Ok(reclaimed) => {
                    if reclaimed.requeued > 0 {
                        tracing::warn!(
                            "worker {}: {} jobs whose worker stopped are queued again",
                            self.device,
                            reclaimed.requeued
                        );
                    }
                    for (id, status) in reclaimed.finished {
                        if let Err(e) = self.ctx.block(jobs::announce_finished(&state, &id, status))
                        {
                            tracing::warn!("job {id}: queueing webhook completed: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("worker {}: reclaiming expired leases: {e}", self.device),
            }
            let limit = config.fair_skip_limit;
            let skips = &mut self.skips;
            let claim = self
                .ctx
                .block(store.claim(&self.ctx.owner, config.lease(), 64, |queue| {
                    choose(queue, &loaded, skips, limit)
                }));
            match claim {
                Ok(Some(claim)) => {
                    let id = claim.id.clone();
                    match self.process(claim) {
                        Ok(()) => {}
                        Err(StoreError::LeaseLost(_)) => tracing::warn!(
                            "job {id}: worker {} lost its lease (the job was reclaimed or \
                             finished meanwhile); its results from here on were not kept",
                            self.device
                        ),
                        Err(e) => tracing::error!("worker {}: job {id}: {e}", self.device),
                    }
                }
                Ok(None) => self
                    .ctx
                    .state
                    .worker()
                    .wait(&mut self.seen, Duration::from_millis(500)),
                Err(e) => {
                    tracing::error!("worker {}: claiming a job: {e}", self.device);
                    self.ctx
                        .state
                        .worker()
                        .wait(&mut self.seen, Duration::from_secs(1));
                }
            }
        }
    }

    fn process(&mut self, claim: Claim) -> Result<(), StoreError> {
        let state = self.ctx.state.clone();
        let store = state.store();
        let owner = self.ctx.owner.clone();
        let Claim { id, attempt } = claim;
        let id = id.as_str();
        let started = Instant::now();
        let token = CancelToken::new();
        state
            .worker()
            .set_running(self.index, Some((id.to_string(), token.clone())));
        let heartbeat = Heartbeat::start(&self.ctx, id, &token);
        let Some(job) = self.ctx.block(store.generation(id))? else {
            state.worker().set_running(self.index, None);
            return Ok(());
        };
        if job.cancel_requested {
            token.cancel();
        }
        tracing::info!("job {id}: running on {} (attempt {attempt})", self.device);
        if let Err(e) = self.ctx.block(jobs::announce_started(&state, id)) {
            tracing::warn!("job {id}: queueing webhook start: {e}");
        }

        let items = self.ctx.block(store.items(id))?;
        let images_total: u32 = items.iter().map(|i| i.spec.batch_size).sum();
        let mut images_done: u32 = items
            .iter()
            .filter(|i| i.status == crate::job::ItemStatus::Succeeded)
            .map(|i| i.spec.batch_size)
            .sum();
        // Image offsets of each definition in job order.
        let mut offsets = HashMap::new();
        let mut offset = 0;
        for item in &items {
            offsets.insert(item.idx, offset);
            offset += item.spec.batch_size;
        }
        let pending: Vec<ItemRow> = items
            .into_iter()
            .filter(|i| i.status == crate::job::ItemStatus::Pending)
            .collect();
        // LoRAs given by URL: download the missing ones now (this thread is
        // not the async runtime); a failed download fails only its item,
        // which is refunded like any failed item.
        let mut ready = Vec::with_capacity(pending.len());
        for mut item in pending {
            match self.fetch_loras(&mut item) {
                Ok(()) => ready.push(item),
                Err(error) => {
                    tracing::warn!("job {id}: {}: {}", item.spec.field, error.message);
                    self.ctx
                        .block(store.fail_items(id, &owner, &[item.idx], &error))?;
                }
            }
        }
        let pending = ready;

        // Group by model, in order of first appearance.
        let mut by_model: Vec<(String, Vec<ItemRow>)> = Vec::new();
        for item in pending {
            match by_model
                .iter_mut()
                .find(|(m, _)| *m == item.spec.model.load)
            {
                Some((_, list)) => list.push(item),
                None => by_model.push((item.spec.model.load.clone(), vec![item])),
            }
        }
        let mut interrupted = false;
        'models: for (_, rows) in by_model {
            if token.is_canceled() {
                break;
            }
            let model = rows[0].spec.model.clone();
            self.ctx.progress(
                id,
                Progress {
                    stage: "loading".into(),
                    images_done,
                    images_total,
                    first_image: offsets.get(&rows[0].idx).copied().unwrap_or(0),
                    batch_images: 0,
                    step: 0,
                    steps: 0,
                },
                true,
            );
            let defaults = match self.engine.prepare(&model) {
                Ok(d) => d,
                Err(e) => {
                    let idxs: Vec<i64> = rows.iter().map(|r| r.idx).collect();
                    let error = job_error_for(&e, &rows[0].spec.field);
                    self.ctx
                        .block(store.fail_items(id, &owner, &idxs, &error))?;
                    continue;
                }
            };
            state.worker().set_loaded(self.index, self.engine.loaded());
            // Each definition's job, built against the model's defaults;
            // with `batch_definitions`, jobs with equal settings run as one.
            let batch_definitions = state.config().batch_definitions;
            let mut inputs = Inputs::default();
            let mut batches: Vec<Batch> = Vec::new();
            for row in rows {
                let job = match self
                    .read_inputs(&row.spec, &mut inputs)
                    .and_then(|(image, mask)| plan(&row.spec, image, mask, &defaults))
                {
                    Ok(job) => job,
                    Err(e) => {
                        let error = job_error_for(&e, &row.spec.field);
                        tracing::warn!("job {id}: {}: {e}", row.spec.field);
                        self.ctx
                            .block(store.fail_items(id, &owner, &[row.idx], &error))?;
                        continue;
                    }
                };
                let joins = batch_definitions
                    .then(|| batches.iter().position(|b| b.job.batches_with(&job)))
                    .flatten();
                match joins {
                    Some(i) if batches[i].job.append(&job) => batches[i].rows.push((row, job)),
                    _ => batches.push(Batch {
                        job: job.clone(),
                        rows: vec![(row, job)],
                        defaults: defaults.clone(),
                    }),
                }
            }
            for batch in batches {
                if token.is_canceled() {
                    break 'models;
                }
                match self.run_batch(id, &batch, &token, images_done, images_total, &offsets) {
                    Ok(made) => images_done += made,
                    Err(BatchFailure::Canceled) => {
                        interrupted = true;
                        break 'models;
                    }
                    Err(BatchFailure::Engine(e)) => {
                        let idxs: Vec<i64> = batch.rows.iter().map(|(r, _)| r.idx).collect();
                        let error = job_error_for(&e, &batch.rows[0].0.spec.field);
                        tracing::warn!("job {id}: batch failed: {e}");
                        self.ctx
                            .block(store.fail_items(id, &owner, &idxs, &error))?;
                    }
                    Err(BatchFailure::Store(e)) => return Err(e),
                }
            }
        }

        heartbeat.stop();
        if heartbeat.lost() {
            state.worker().set_running(self.index, None);
            return Err(StoreError::LeaseLost(id.to_string()));
        }
        // Shutting down: back to the queue, this attempt not counted.
        if (interrupted || token.is_canceled()) && state.worker().is_stopping() {
            self.ctx.block(store.release(id, &owner))?;
            state.worker().set_running(self.index, None);
            tracing::info!("job {id}: re-queued (shutting down)");
            return Ok(());
        }
        let items = self.ctx.block(store.items(id))?;
        let (status, error) = if token.is_canceled() {
            (
                JobStatus::Canceled,
                Some(JobError::new("canceled", "canceled by the client")),
            )
        } else if let Some(failed) = items
            .iter()
            .find(|i| i.status == crate::job::ItemStatus::Failed)
        {
            let n = items
                .iter()
                .filter(|i| i.status == crate::job::ItemStatus::Failed)
                .count();
            let mut e = failed
                .error
                .clone()
                .unwrap_or_else(|| JobError::new("engine_error", "failed"));
            if n > 1 {
                e.message = format!(
                    "{} (and {} more image definitions failed)",
                    e.message,
                    n - 1
                );
            }
            (JobStatus::Failed, Some(e))
        } else {
            (JobStatus::Succeeded, None)
        };
        let finished = self
            .ctx
            .block(store.finish_held(id, &owner, status, error.as_ref()))?;
        state.worker().set_running(self.index, None);
        if !finished {
            return Err(StoreError::LeaseLost(id.to_string()));
        }
        state
            .metrics()
            .observe_job_duration(started.elapsed().as_secs_f64());
        tracing::info!(
            "job {id}: {} in {:.2}s",
            status.as_str(),
            started.elapsed().as_secs_f64()
        );
        if let Err(e) = self.ctx.block(jobs::announce_finished(&state, id, status)) {
            tracing::warn!("job {id}: queueing webhook completed: {e}");
        }
        Ok(())
    }

    /// Download the `loras[].url` files of `item` that are not in the LoRA
    /// cache yet, and point trainings at a local file of theirs (the asset
    /// store's, or its local copy of a remote one). The error names the
    /// field and tells a fetch failure (one text for all, see `fetch.rs`)
    /// from a file that is not a LoRA.
    fn fetch_loras(&self, item: &mut ItemRow) -> Result<(), JobError> {
        let config = self.ctx.state.config();
        for lora in &mut item.spec.loras {
            let Some(hash) = &lora.training else { continue };
            let local = self
                .ctx
                .block(self.ctx.state.trainings().local_file(hash, "safetensors"));
            match local {
                Ok(path) => lora.path = path,
                Err(e) => {
                    // The detail (store address, its error) is for the log.
                    tracing::warn!("LoRA {}: {e}", lora.source);
                    let id = lora.source.strip_prefix("training:").unwrap_or_default();
                    let index = item
                        .spec
                        .definition
                        .loras
                        .as_ref()
                        .and_then(|refs| refs.iter().position(|r| r.id.as_deref() == Some(id)));
                    let mut error = JobError::new(
                        "lora_fetch_failed",
                        format!(
                            "LoRA `{}` could not be used: its file could not be read \
                             from the asset store",
                            lora.source
                        ),
                    );
                    error.field = Some(match index {
                        Some(i) => format!("{}.loras[{i}].id", item.spec.field),
                        None => format!("{}.trainingId", item.spec.field),
                    });
                    return Err(error);
                }
            }
        }
        for (j, lora) in item.spec.loras.iter().enumerate() {
            let Some(url) = &lora.url else { continue };
            if lora.path.is_file() {
                continue;
            }
            let result = crate::lora_cache::download(
                self.ctx.state.fetcher(),
                &config.data_dir,
                url,
                config.max_lora_bytes,
                Duration::from_secs(config.lora_fetch_timeout_seconds),
            );
            if let Err(e) = result {
                if let crate::lora_cache::DownloadError::Fetch(f) = &e {
                    tracing::info!("LoRA {url}: {}", f.detail);
                }
                let index = item.spec.definition.loras.as_ref().and_then(|refs| {
                    refs.iter()
                        .position(|r| r.url.as_deref() == Some(&lora.source))
                });
                let field = match index {
                    Some(i) => format!("{}.loras[{i}].url", item.spec.field),
                    None => format!("{}.loras[{j}].url", item.spec.field),
                };
                let mut error = JobError::new(
                    "lora_fetch_failed",
                    format!("LoRA `{}` could not be used: {e}", lora.source),
                );
                error.field = Some(field);
                return Err(error);
            }
        }
        Ok(())
    }

    fn run_batch(
        &mut self,
        id: &str,
        batch: &Batch,
        token: &CancelToken,
        images_done: u32,
        images_total: u32,
        offsets: &HashMap<i64, u32>,
    ) -> Result<u32, BatchFailure> {
        let first = &batch.rows[0].0;
        let job = &batch.job;
        let steps = job.request.num_inference_steps as u32;
        let batch_images = job.seeds.len() as u32;
        let first_image = offsets.get(&first.idx).copied().unwrap_or(0);
        let base = Progress {
            stage: "denoising".into(),
            images_done,
            images_total,
            first_image,
            batch_images,
            step: 0,
            steps,
        };
        self.ctx.progress(id, base.clone(), true);
        let state = self.ctx.state.clone();
        let mut last_hook = Instant::now();
        let hook_progress = self
            .ctx
            .block(state.store().generation(id))
            .ok()
            .flatten()
            .is_some_and(|g| {
                g.webhook_url.is_some() && g.webhook_events.iter().any(|e| e == "progress")
            });
        let ctx = &self.ctx;
        let mut on_step = |step: u32, total: u32| {
            let p = Progress {
                step,
                steps: total,
                ..base.clone()
            };
            ctx.progress(id, p, step == total);
            if hook_progress && (last_hook.elapsed() >= Duration::from_secs(1) || step == total) {
                last_hook = Instant::now();
                ctx.webhook(id, "progress");
            }
        };
        let output = self.engine.run(job, &mut on_step, token);
        Metrics::inc(&state.metrics().batches);
        let output = match output {
            Ok(o) => o,
            Err(EngineError::Canceled) => return Err(BatchFailure::Canceled),
            Err(e) => return Err(BatchFailure::Engine(e)),
        };
        if output.images.len() != job.seeds.len() {
            return Err(BatchFailure::Engine(EngineError::Failed(format!(
                "the engine returned {} images for {} seeds",
                output.images.len(),
                job.seeds.len()
            ))));
        }
        self.ctx.progress(
            id,
            Progress {
                stage: "saving".into(),
                step: steps,
                ..base.clone()
            },
            true,
        );

        // Encode and store each definition's images, then record them.
        let mut made = 0;
        let mut images = output.images.iter();
        for (row, job) in &batch.rows {
            let spec = &row.spec;
            let (width, height) = (job.request.width as u32, job.request.height as u32);
            let format = spec.output_format();
            let quality = spec.output_quality();
            let mut assets = Vec::new();
            for (j, seed) in spec.seeds().into_iter().enumerate() {
                let pixels = images.next().ok_or_else(|| {
                    BatchFailure::Engine(EngineError::Failed("missing image".into()))
                })?;
                let metadata = ImageMetadata {
                    prompt: spec.definition.prompt.clone().unwrap_or_default(),
                    negative_prompt: spec.definition.negative_prompt.clone(),
                    steps,
                    scheduler: output.scheduler.clone(),
                    sigma_schedule: output.sigma_schedule.clone(),
                    guidance_scale: job.request.guidance_scale,
                    seed,
                    width,
                    height,
                    model: spec.model.reference.clone(),
                    extra: [
                        ("easel".to_string(), env!("CARGO_PKG_VERSION").to_string()),
                        ("generation".to_string(), id.to_string()),
                    ]
                    .into(),
                };
                let image = RgbImageRef::new(width, height, pixels)
                    .map_err(|e| BatchFailure::Engine(EngineError::Failed(e.to_string())))?;
                let bytes = encode_image(&image, format, quality, &metadata)
                    .map_err(|e| BatchFailure::Engine(EngineError::Failed(e.to_string())))?;
                // The asset store is async (S3); this thread is not the
                // runtime, so it waits as it does for the job store.
                let stored = self
                    .ctx
                    .block(state.assets().put(bytes, format.extension()))
                    .map_err(|e| {
                        BatchFailure::Engine(EngineError::Failed(format!("storing an image: {e}")))
                    })?;
                assets.push(AssetRow {
                    id: new_id(),
                    key_id: String::new(),
                    kind: "output".into(),
                    hash: stored.hash,
                    extension: format.extension().into(),
                    file_name: format!(
                        "easel-{}-{}-{j}-{seed}.{}",
                        &id[..8],
                        row.idx,
                        format.extension()
                    ),
                    file_size: stored.size as i64,
                    file_type: format.mime_type().into(),
                    width: Some(i64::from(width)),
                    height: Some(i64::from(height)),
                    seed: Some(seed),
                    generation_id: Some(id.into()),
                    item_idx: Some(row.idx),
                    image_idx: Some(j as i64),
                    created_at: now_ms(),
                });
            }
            let result = ItemResult {
                parameters: resolved(
                    spec,
                    job,
                    &batch.defaults,
                    &output.scheduler,
                    output.compute_precision,
                    &self.device,
                ),
                warnings: output.warnings.clone(),
            };
            let key_id = self
                .ctx
                .block(state.store().generation(id))
                .map_err(BatchFailure::Store)?
                .map(|g| g.key_id)
                .unwrap_or_default();
            for a in &mut assets {
                a.key_id = key_id.clone();
            }
            self.ctx
                .block(
                    state
                        .store()
                        .complete_item(id, &self.ctx.owner, row.idx, &assets, &result),
                )
                .map_err(BatchFailure::Store)?;
            made += assets.len() as u32;
            for _ in &assets {
                Metrics::inc(&state.metrics().images_generated);
            }
        }
        Ok(made)
    }

    fn read_input(&self, input: &InputRef) -> Result<easel_core::DecodedImage, EngineError> {
        let bytes = self
            .ctx
            .block(self.ctx.state.assets().get(&input.hash, &input.extension))
            .map_err(|e| EngineError::Failed(format!("reading input {}: {e}", input.hash)))?
            .ok_or_else(|| EngineError::Failed(format!("input {} is gone", input.hash)))?;
        decode_image(&bytes).map_err(|e| EngineError::Failed(e.to_string()))
    }

    /// The decoded init image and mask of `spec`, from `inputs` or read
    /// into it.
    fn read_inputs(
        &self,
        spec: &ItemSpec,
        inputs: &mut Inputs,
    ) -> Result<(Option<ImageInput>, Option<MaskInput>), EngineError> {
        let image = match &spec.image {
            Some(input) => Some(match inputs.images.get(&input.hash) {
                Some(image) => image.clone(),
                None => {
                    let decoded = self.read_input(input)?;
                    let image = ImageInput {
                        width: decoded.width as usize,
                        height: decoded.height as usize,
                        rgb: decoded.into_rgb8(),
                    };
                    inputs.images.insert(input.hash.clone(), image.clone());
                    image
                }
            }),
            None => None,
        };
        let mask = match &spec.mask {
            Some(input) => Some(match inputs.masks.get(&input.hash) {
                Some(mask) => mask.clone(),
                None => {
                    let decoded = self.read_input(input)?;
                    let mask = MaskInput {
                        width: decoded.width as usize,
                        height: decoded.height as usize,
                        luma: mask_luma(decoded),
                    };
                    inputs.masks.insert(input.hash.clone(), mask.clone());
                    mask
                }
            }),
            None => None,
        };
        Ok((image, mask))
    }
}

enum BatchFailure {
    Canceled,
    Engine(EngineError),
    Store(StoreError),
}

impl From<StoreError> for BatchFailure {
    fn from(e: StoreError) -> Self {
        BatchFailure::Store(e)
    }
}

/// The name a worker's leases carry: host, process id, device, and a
/// random suffix so a restarted process (or a reused pid) is a new owner.
fn owner_id(device: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "host".into());
    let suffix: String = new_id().chars().take(8).collect();
    format!("{host}/{}/{device}/{suffix}", std::process::id())
}

/// A running job's heartbeat: a task on the runtime that renews the
/// worker's lease every second (a tenth of the shortest lease), cancels the
/// job when a cancel was asked through any API node, and cancels it as
/// lost when the lease is gone. Stopped by [`Heartbeat::stop`] or on drop.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

impl Heartbeat {
    fn start(ctx: &Ctx, id: &str, token: &CancelToken) -> Heartbeat {
        let lost = Arc::new(AtomicBool::new(false));
        let (state, owner, id, token, flag) = (
            ctx.state.clone(),
            ctx.owner.clone(),
            id.to_string(),
            token.clone(),
            lost.clone(),
        );
        let task = ctx.rt.spawn(async move {
            let lease = state.config().lease();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match state.store().renew_lease(&id, &owner, lease).await {
                    Ok(Some(cancel_requested)) => {
                        if cancel_requested {
                            token.cancel();
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("job {id}: lease lost; stopping it on this worker");
                        flag.store(true, Ordering::SeqCst);
                        token.cancel();
                        return;
                    }
                    // The database is unreachable: keep running and keep
                    // trying; if the lease expires meanwhile the next
                    // renewal (or write) finds it lost.
                    Err(e) => tracing::warn!("job {id}: renewing its lease: {e}"),
                }
            }
        });
        Heartbeat { task, lost }
    }

    /// Whether the lease was found lost.
    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
