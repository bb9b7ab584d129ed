//! Continuous batching over a pool of decode workers.
//!
//! Each worker is an OS thread owning one decoder (decoding is CPU-bound and blocking, so it
//! stays off the async runtime). Between two decode steps a worker admits queued requests into
//! free batch slots and drops sequences whose client went away or whose deadline passed, so
//! requests join and leave the shared batch without waiting for each other. The queue is
//! bounded: a submit that would overflow it is refused and the HTTP layer answers 429.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::{DecodeBackend, Finish, Sampling, SeqId, ServedModel};
use crate::error::{InferenceError, Result};
use crate::stop::StopMatcher;

/// The choices of one request: `n` samples of one prompt, admitted together so that they share
/// one prefill.
#[derive(Debug, Clone)]
pub struct Job {
    /// Index (in the response) of the first of these choices.
    pub first_choice: usize,
    /// How many choices.
    pub n: usize,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Sampling settings (max_tokens included).
    pub sampling: Sampling,
    /// Stop strings, matched on the text.
    pub stop: Vec<String>,
    /// Give up after this instant.
    pub deadline: Instant,
}

/// Progress of one choice, sent from a worker to the request handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text to append (never empty).
    Delta(String),
    /// The choice is complete.
    Done {
        /// Why it stopped.
        finish: Finish,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The choice failed.
    Failed(JobFailure),
}

/// Why a choice failed.
#[derive(Debug, Clone, PartialEq)]
pub enum JobFailure {
    /// The deadline passed (while queued or decoding).
    Timeout,
    /// The decoder refused the prompt.
    Rejected(String),
    /// The decoder broke.
    Backend(String),
}

/// Events tagged with their choice index.
pub type EventReceiver = mpsc::UnboundedReceiver<(usize, Event)>;
type EventSender = mpsc::UnboundedSender<(usize, Event)>;

/// Why a submit was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue has no room for all the request's choices.
    QueueFull {
        /// Configured capacity.
        capacity: usize,
    },
    /// The scheduler is shutting down.
    ShuttingDown,
}

struct Queued {
    job: Job,
    tx: EventSender,
}

struct Shared {
    queue: Mutex<VecDeque<Queued>>,
    wake: Condvar,
    capacity: usize,
    shutdown: AtomicBool,
    workers: Vec<WorkerCounters>,
    cancelled: AtomicU64,
    timeouts: AtomicU64,
}

#[derive(Default)]
struct WorkerCounters {
    active: AtomicUsize,
    steps: AtomicU64,
    tokens: AtomicU64,
    admitted: AtomicU64,
    ready: AtomicBool,
}

/// Load figures for /stats.
#[derive(Debug, Clone, Serialize)]
pub struct SchedulerStats {
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    /// Queue bound.
    pub queue_capacity: usize,
    /// Sequences dropped because their client disconnected.
    pub cancelled: u64,
    /// Sequences that hit the per-request deadline.
    pub timeouts: u64,
    /// Per worker.
    pub workers: Vec<WorkerStats>,
}

/// One worker's load.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    /// Worker index.
    pub id: usize,
    /// Whether its decoder loaded.
    pub ready: bool,
    /// Sequences in its batch now.
    pub active: usize,
    /// Batch size bound.
    pub max_batch: usize,
    /// Decode steps run.
    pub steps: u64,
    /// Tokens generated.
    pub tokens: u64,
    /// Sequences admitted.
    pub admitted: u64,
}

/// The worker pool.
pub struct Scheduler {
    shared: Arc<Shared>,
    max_batch: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-update leaves only a VecDeque behind; it is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    /// Start `workers` threads, each building its decoder with `model.new_decoder(max_batch)`.
    /// Fails if any decoder cannot be built.
    pub fn start(
        model: Arc<dyn ServedModel>,
        workers: usize,
        max_batch: usize,
        queue_capacity: usize,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity: queue_capacity,
            shutdown: AtomicBool::new(false),
            workers: (0..workers).map(|_| WorkerCounters::default()).collect(),
            cancelled: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        for w in 0..workers {
            let shared = shared.clone();
            let model = model.clone();
            let ready_tx = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("decode-{w}"))
                .spawn(move || match model.new_decoder(max_batch) {
                    Ok(decoder) => {
                        shared.workers[w].ready.store(true, Ordering::Release);
                        let _ = ready_tx.send(Ok(()));
                        drop(ready_tx);
                        Worker {
                            id: w,
                            shared,
                            decoder,
                            max_batch,
                            active: HashMap::new(),
                        }
                        .run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(|e| InferenceError::Model(format!("cannot spawn decode worker: {e}")))?;
            threads.push(handle);
        }
        drop(ready_tx);
        let scheduler = Self {
            shared,
            max_batch,
            threads: Mutex::new(threads),
        };
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    scheduler.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    scheduler.shutdown();
                    return Err(InferenceError::Model(
                        "a decode worker died while starting".into(),
                    ));
                }
            }
        }
        Ok(scheduler)
    }

    /// Queue all choices of one request, or none of them. Events arrive on the receiver;
    /// dropping it cancels every choice at the next step boundary.
    ///
    /// The choices enter one worker's batch together (one shared prefill). A request with more
    /// choices than a batch holds is split into batch-sized groups; a later group's seed is
    /// offset by its first choice index so that no two choices sample alike.
    pub fn submit(&self, job: Job) -> std::result::Result<EventReceiver, SubmitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let groups: Vec<Job> = (0..job.n)
            .step_by(self.max_batch)
            .map(|start| {
                let mut g = job.clone();
                g.first_choice = job.first_choice + start;
                g.n = self.max_batch.min(job.n - start);
                g.sampling.seed = job.sampling.seed.map(|s| s.wrapping_add(start as u64));
                g
            })
            .collect();
        {
            let mut q = lock(&self.shared.queue);
            if self.shared.shutdown.load(Ordering::Acquire) {
                return Err(SubmitError::ShuttingDown);
            }
            if queued_choices(&q) + job.n > self.shared.capacity {
                return Err(SubmitError::QueueFull {
                    capacity: self.shared.capacity,
                });
            }
            q.extend(groups.into_iter().map(|job| Queued {
                job,
                tx: tx.clone(),
            }));
        }
        self.shared.wake.notify_all();
        Ok(rx)
    }

    /// Current load.
    pub fn stats(&self) -> SchedulerStats {
        let queue_depth = queued_choices(&lock(&self.shared.queue));
        SchedulerStats {
            queue_depth,
            queue_capacity: self.shared.capacity,
            cancelled: self.shared.cancelled.load(Ordering::Relaxed),
            timeouts: self.shared.timeouts.load(Ordering::Relaxed),
            workers: self
                .shared
                .workers
                .iter()
                .enumerate()
                .map(|(id, c)| WorkerStats {
                    id,
                    ready: c.ready.load(Ordering::Acquire),
                    active: c.active.load(Ordering::Relaxed),
                    max_batch: self.max_batch,
                    steps: c.steps.load(Ordering::Relaxed),
                    tokens: c.tokens.load(Ordering::Relaxed),
                    admitted: c.admitted.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Total sequences decoding now over all workers.
    pub fn active(&self) -> usize {
        self.shared
            .workers
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Stop the workers (queued jobs are dropped, which their clients see as a closed stream).
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        lock(&self.shared.queue).clear();
        self.shared.wake.notify_all();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Choices waiting in the queue (what its capacity bounds).
fn queued_choices(q: &VecDeque<Queued>) -> usize {
    q.iter().map(|e| e.job.n).sum()
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Active {
    choice: usize,
    tx: EventSender,
    stop: StopMatcher,
    tokens: usize,
    max_tokens: usize,
    deadline: Instant,
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    decoder: Box<dyn DecodeBackend>,
    max_batch: usize,
    active: HashMap<SeqId, Active>,
}

impl Worker {
    fn counters(&self) -> &WorkerCounters {
        &self.shared.workers[self.id]
    }

    fn run(mut self) {
        loop {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            self.admit();
            if self.active.is_empty() {
                continue;
            }
            self.prune();
            if self.active.is_empty() {
                continue;
            }
            self.step();
        }
    }

    /// Fill free slots from the queue; sleep on the condvar when there is nothing to do.
    fn admit(&mut self) {
        let shared = self.shared.clone();
        let mut q = lock(&shared.queue);
        // Requests whose client went away while queued leave the queue now, not when a slot
        // frees (the queue is bounded, so this sweep is cheap next to a decode step).
        let before = queued_choices(&q);
        q.retain(|e| !e.tx.is_closed());
        let swept = before - queued_choices(&q);
        if swept > 0 {
            shared.cancelled.fetch_add(swept as u64, Ordering::Relaxed);
        }
        loop {
            // First come, first served: a request waits for enough free rows for all its
            // choices rather than being overtaken by smaller ones.
            while self.should_take_more() {
                let fits = q
                    .front()
                    .is_some_and(|e| self.active.len() + e.job.n <= self.max_batch);
                if !fits {
                    break;
                }
                let Some(Queued { job, tx }) = q.pop_front() else {
                    break;
                };
                self.start(job, tx);
            }
            if !self.active.is_empty() || self.shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            // Idle: wait for a submit (the timeout only bounds how long a shutdown can go unseen).
            q = shared
                .wake
                .wait_timeout(q, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Spread load: take a new sequence only if no other worker is emptier than this one.
    fn should_take_more(&self) -> bool {
        let mine = self.active.len();
        self.shared.workers.iter().enumerate().all(|(i, c)| {
            i == self.id
                || !c.ready.load(Ordering::Acquire)
                || c.active.load(Ordering::Relaxed) >= mine
        })
    }

    fn start(&mut self, job: Job, tx: EventSender) {
        let choices = job.first_choice..job.first_choice + job.n;
        if tx.is_closed() {
            self.shared
                .cancelled
                .fetch_add(job.n as u64, Ordering::Relaxed);
            return;
        }
        if Instant::now() >= job.deadline {
            self.shared
                .timeouts
                .fetch_add(job.n as u64, Ordering::Relaxed);
            for c in choices {
                let _ = tx.send((c, Event::Failed(JobFailure::Timeout)));
            }
            return;
        }
        let max_tokens = job.sampling.max_tokens;
        match self.decoder.add_samples(job.prompt, job.sampling, job.n) {
            Ok(ids) => {
                for (id, choice) in ids.into_iter().zip(choices) {
                    self.active.insert(
                        id,
                        Active {
                            choice,
                            tx: tx.clone(),
                            stop: StopMatcher::new(&job.stop),
                            tokens: 0,
                            max_tokens,
                            deadline: job.deadline,
                        },
                    );
                }
                self.counters()
                    .admitted
                    .fetch_add(job.n as u64, Ordering::Relaxed);
                self.publish_active();
            }
            Err(e) => {
                for c in choices {
                    let _ = tx.send((c, Event::Failed(JobFailure::Rejected(e.to_string()))));
                }
            }
        }
    }

    fn publish_active(&self) {
        self.counters()
            .active
            .store(self.active.len(), Ordering::Relaxed);
    }

    /// Drop sequences whose client hung up or whose time is up, freeing their slots now.
    fn prune(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, a) in &self.active {
            if a.tx.is_closed() {
                self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
                gone.push(id);
            } else if now >= a.deadline {
                self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
                let _ = a.tx.send((a.choice, Event::Failed(JobFailure::Timeout)));
                gone.push(id);
            }
        }
        for id in gone {
            self.decoder.cancel(id);
            self.active.remove(&id);
        }
        self.publish_active();
    }

    fn step(&mut self) {
        let outputs = match self.decoder.step() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(worker = self.id, error = %e, "decode step failed; failing its batch");
                for (id, a) in self.active.drain() {
                    self.decoder.cancel(id);
                    let _ =
                        a.tx.send((a.choice, Event::Failed(JobFailure::Backend(e.to_string()))));
                }
                self.publish_active();
                return;
            }
        };
        self.counters().steps.fetch_add(1, Ordering::Relaxed);
        let mut produced = 0u64;
        for out in outputs {
            let Some(a) = self.active.get_mut(&out.id) else {
                continue;
            };
            let mut finish = out.finished;
            if let Some((_, text)) = &out.token {
                // The end-of-turn token comes with empty text and a Stop; it is not content.
                if out.finished != Some(Finish::Stop) || !text.is_empty() {
                    a.tokens += 1;
                    produced += 1;
                }
                let (emit, hit) = a.stop.push(text);
                if !emit.is_empty() {
                    let _ = a.tx.send((a.choice, Event::Delta(emit)));
                }
                if hit {
                    finish = Some(Finish::Stop);
                } else if finish.is_none() && a.tokens >= a.max_tokens {
                    finish = Some(Finish::Length);
                }
            }
            if let Some(finish) = finish {
                // Text held back as a possible stop-string prefix is real content after all.
                let rest = a.stop.flush();
                if !rest.is_empty() {
                    let _ = a.tx.send((a.choice, Event::Delta(rest)));
                }
                let _ = a.tx.send((
                    a.choice,
                    Event::Done {
                        finish,
                        completion_tokens: a.tokens,
                    },
                ));
                if out.finished.is_none() {
                    self.decoder.cancel(out.id);
                }
                self.active.remove(&out.id);
            }
        }
        self.counters()
            .tokens
            .fetch_add(produced, Ordering::Relaxed);
        self.publish_active();
    }
}
