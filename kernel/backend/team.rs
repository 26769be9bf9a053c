//! A small team of threads that stays awake between the many short ops of a
//! decoding step. Rayon's workers fall asleep in the gaps between one matrix
//! product and the next (norms, RoPE, attention run in between) and waking
//! them costs about as much as a 576-wide product; llama.cpp's threads spin
//! on a barrier for the same reason. Helpers spin for a while after each
//! job, then sleep until the next one, so an idle server burns no CPU.
//!
//! A job is a number of chunks, and whoever runs takes the next unclaimed
//! one: the caller works through the job itself and waits only for chunks a
//! helper has already started. A team that split each job statically, one
//! share per member, waited for every member, and on cores shared with
//! other processes a descheduled member stalled the whole step (a greedy
//! Generate went from under 1 s to 10 s when another process was busy).

use std::{
    any::Any,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a helper spins for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Chunks per member in a job of many units: enough that a member the
/// kernel deschedules holds up one small chunk at most.
const CHUNKS_PER_MEMBER: usize = 4;
/// The claim word: the job's number above, the next unclaimed chunk below.
const CHUNK_BITS: u32 = 24;
const CHUNK_MASK: u64 = (1 << CHUNK_BITS) - 1;
/// The caller's spins on chunks in progress before it yields its core to
/// them (a helper it waits for may need that very core).
const WAIT_SPINS: u32 = 2_048;

/// A job: called once per chunk with the chunk's index.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for each job; helpers watch it.
    generation: AtomicU64,
    /// `generation << CHUNK_BITS | next chunk`: a chunk is claimed by
    /// raising it while the job's number is still there, so a helper that
    /// wakes late, even jobs later, never runs a chunk of a finished job.
    claim: AtomicU64,
    /// Chunks of the current job that have returned.
    done: AtomicUsize,
    /// The first panic of the current job's chunks; the caller re-raises it.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The current job (its number, chunks, the job), lifetime erased;
    /// valid while `run` waits for it.
    job: Mutex<Option<(u64, usize, Job<'static>)>>,
    wake: Condvar,
    sleeping: Mutex<usize>,
}

impl Shared {
    /// Claims and runs chunks of job `number` until none is left.
    fn work(&self, number: u64, chunks: usize, job: Job<'_>) {
        loop {
            let state = self.claim.load(Ordering::Acquire);
            let next = (state & CHUNK_MASK) as usize;
            if state >> CHUNK_BITS != number || next >= chunks {
                return;
            }
            if self.claim.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            // A panicking chunk still counts as done, or the caller would
            // wait forever; the caller re-raises it.
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(next))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// One job at a time; a concurrent caller runs its job alone.
    running: Mutex<()>,
}

/// Threads compute may use, set once by [`set_compute_threads`]; 0: one per core.
static COMPUTE_THREADS: AtomicUsize = AtomicUsize::new(0);

/// The compute budget: the encoder, the cross-encoder and the decoder run
/// their products on one rayon pool and one team, both of `threads` members
/// (0: one per core), instead of a pool per engine. Call it before anything
/// computes; once the pool exists its size cannot change.
pub fn set_compute_threads(threads: usize) -> Result<(), String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = if threads == 0 { cores } else { threads };
    COMPUTE_THREADS.store(threads, Ordering::Relaxed);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("aitl-compute-{i}"))
        .build_global()
        .map_err(|e| format!("compute.threads = {threads}: the compute pool already runs ({e})"))?;
    let team = Team::global();
    if team.size() != threads {
        return Err(format!("compute.threads = {threads}: the compute team already runs with {}", team.size()));
    }
    Ok(())
}

/// Members of the compute team and pool.
fn compute_threads() -> usize {
    match COMPUTE_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

impl Team {
    /// The process-wide team: [`compute_threads`] members, the caller among them.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(compute_threads().saturating_sub(1)))
    }

    fn new(helpers: usize) -> Team {
        Team::with_helpers(helpers, |index, shared| helper(&shared, index))
    }

    fn with_helpers(helpers: usize, body: impl Fn(usize, Arc<Shared>) + Send + Clone + 'static) -> Team {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            job: Mutex::new(None),
            wake: Condvar::new(),
            sleeping: Mutex::new(0),
        });
        let mut started = 0;
        for index in 1..=helpers {
            let (shared, body) = (shared.clone(), body.clone());
            let spawned =
                std::thread::Builder::new().name(format!("aitl-team-{index}")).spawn(move || body(index, shared));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Team { shared, helpers: started, running: Mutex::new(()) }
    }

    /// Members, the caller included.
    pub fn size(&self) -> usize {
        self.helpers + 1
    }

    /// How many chunks to cut `units` of independent work into.
    pub fn chunks_for(&self, units: usize) -> usize {
        units.min(self.size() * CHUNKS_PER_MEMBER).max(1)
    }

    /// Runs `job(c)` once for every chunk `c < chunks`, on whichever members
    /// claim them, the caller included, and returns when all have returned.
    /// Which member runs a chunk is not fixed, so chunks must not depend on it.
    pub fn run(&self, chunks: usize, job: &(dyn Fn(usize) + Sync)) {
        // A guard poisoned by an earlier panicking job is still a turn.
        let turn = match self.running.try_lock() {
            Ok(turn) => Some(turn),
            Err(std::sync::TryLockError::Poisoned(turn)) => Some(turn.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if turn.is_none() || self.helpers == 0 || chunks <= 1 || chunks as u64 > CHUNK_MASK {
            (0..chunks).for_each(job);
            return;
        }
        let shared = &self.shared;
        // Job numbers wrap within the claim word's upper bits (after 2^40 jobs).
        let number = ((shared.generation.load(Ordering::Acquire) + 1) & (u64::MAX >> CHUNK_BITS)).max(1);
        // SAFETY: a helper calls the erased reference only for a chunk it
        // claimed under this job's number (`Shared::work`), each of the
        // `chunks` claims is counted in `done` after its call returns, and
        // this function returns only once `done` has reached `chunks`; no
        // claim under this number succeeds after that.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some((number, chunks, erased));
        shared.done.store(0, Ordering::Release);
        shared.claim.store(number << CHUNK_BITS, Ordering::Release);
        shared.generation.store(number, Ordering::Release);
        if *shared.sleeping.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            shared.wake.notify_all();
        }
        shared.work(number, chunks, job);
        let mut spins = 0u32;
        while shared.done.load(Ordering::Acquire) < chunks {
            if spins < WAIT_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let panic = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(turn);
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }
}

fn helper(shared: &Shared, _index: usize) {
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        while shared.generation.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a spin: look every 1,024.
            if !spins.is_multiple_of(1024) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleeping = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            *sleeping += 1;
            while shared.generation.load(Ordering::Acquire) == seen {
                sleeping =
                    shared.wake.wait_timeout(sleeping, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
            }
            *sleeping -= 1;
        }
        seen = shared.generation.load(Ordering::Acquire);
        let current = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((number, chunks, job)) = current {
            shared.work(number, chunks, job);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Each chunk runs once per job, whether the helpers are awake, asleep
    /// or late; the chunks' combined result is the serial one, bit for bit.
    #[test]
    fn every_chunk_runs_once_and_the_result_is_the_serial_one() {
        let team = Team::new(3);
        let value = |round: usize, c: usize| ((round * 31 + c) as f32).sqrt().sin();
        for round in 0..1000 {
            let chunks = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            let results: Vec<Mutex<f32>> = (0..chunks).map(|_| Mutex::new(0.0)).collect();
            team.run(chunks, &|c| {
                hits[c].fetch_add(1, Ordering::Relaxed);
                *results[c].lock().unwrap() = value(round, c);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "round {round}");
            let parallel: Vec<u32> = results.iter().map(|r| r.lock().unwrap().to_bits()).collect();
            let serial: Vec<u32> = (0..chunks).map(|c| value(round, c).to_bits()).collect();
            assert_eq!(parallel, serial, "round {round}");
            if round % 250 == 0 {
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    /// A helper that never gets to run (a member the kernel descheduled, or
    /// a stopped thread): the caller does every chunk and returns. The
    /// static split this replaced waited for it forever.
    #[test]
    fn a_job_finishes_while_a_helper_never_runs() {
        let (release, stalled) = mpsc::channel::<()>();
        let stalled = Arc::new(Mutex::new(stalled));
        let team = Team::with_helpers(2, move |index, shared| {
            if index == 2 {
                // Stopped until the test ends.
                let _ = stalled.lock().unwrap().recv();
                return;
            }
            helper(&shared, index);
        });
        let (finished, done) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..200 {
                    let sum = AtomicUsize::new(0);
                    team.run(16, &|c| {
                        sum.fetch_add(c + 1, Ordering::Relaxed);
                    });
                    assert_eq!(sum.load(Ordering::Relaxed), 16 * 17 / 2, "round {round}");
                }
                finished.send(()).unwrap();
            });
            let outcome = done.recv_timeout(Duration::from_secs(20));
            drop(release);
            assert!(outcome.is_ok(), "the jobs did not finish with a helper that never runs");
        });
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(1);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(8, &|c| assert_ne!(c, 5, "chunk 5 fails"));
        }));
        let message = outcome.expect_err("the chunk's panic is re-raised in the caller");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("chunk 5 fails"), "{text}");
        let hits = AtomicUsize::new(0);
        team.run(8, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 8);
    }
}
