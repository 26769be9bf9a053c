//! A small team of threads that stays awake between the many short ops of a
//! decoding step. Rayon's workers fall asleep in the gaps between one matrix
//! product and the next (norms, RoPE, attention run in between) and waking
//! them costs about as much as a 576-wide product; llama.cpp's threads spin
//! on a barrier for the same reason. Helpers spin for a while after each
//! job, then sleep until the next one, so an idle server burns no CPU.

use std::{
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a helper spins for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// A job: called once per member with the member's index.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicU64,
    finished: AtomicUsize,
    /// A helper's job panicked this round; the caller re-raises it.
    panicked: std::sync::atomic::AtomicBool,
    /// The current job, lifetime erased; valid while `run` waits for it.
    job: Mutex<Option<Job<'static>>>,
    wake: Condvar,
    sleeping: Mutex<usize>,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// One job at a time; a concurrent caller runs its job alone.
    running: Mutex<()>,
}

impl Team {
    /// The process-wide team: one member per core.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let members = std::thread::available_parallelism().map_or(1, usize::from);
            Team::new(members.saturating_sub(1))
        })
    }

    fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            panicked: std::sync::atomic::AtomicBool::new(false),
            job: Mutex::new(None),
            wake: Condvar::new(),
            sleeping: Mutex::new(0),
        });
        let mut started = 0;
        for index in 1..=helpers {
            let shared = shared.clone();
            let spawned =
                std::thread::Builder::new().name(format!("aitl-team-{index}")).spawn(move || helper(&shared, index));
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

    /// Runs `job(i)` for every member `i` (the caller is member 0) and
    /// returns when all are done.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        // A guard poisoned by an earlier panicking job is still a turn.
        let _turn = match self.running.try_lock() {
            Ok(turn) => turn,
            Err(std::sync::TryLockError::Poisoned(turn)) => turn.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..self.size()).for_each(job);
                return;
            }
        };
        if self.helpers == 0 {
            job(0);
            return;
        }
        // SAFETY: helpers use the erased reference only between the
        // generation bump below and their `finished` increment, and this
        // function returns only after every helper has incremented it.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(erased);
        self.shared.finished.store(0, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        if *self.shared.sleeping.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            self.shared.wake.notify_all();
        }
        // The caller's own part may panic too: wait for the helpers (which
        // still hold the job) before unwinding.
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        while self.shared.finished.load(Ordering::Acquire) < self.helpers {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(panic) = own {
            std::panic::resume_unwind(panic);
        }
        if self.shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a compute team member panicked in this job");
        }
    }
}

fn helper(shared: &Shared, index: usize) {
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
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // A panicking job must still count as finished, or the caller
            // would spin forever; the caller re-raises it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.finished.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_each_job_once_awake_or_asleep() {
        let team = Team::new(3);
        for round in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..team.size()).map(|_| AtomicUsize::new(0)).collect();
            team.run(&|i| {
                hits[i].fetch_add(round + 1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1), "round {round}");
            if round % 250 == 0 {
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn a_panicking_helper_job_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(1);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|i| assert_eq!(i, 0, "helper fails"));
        }));
        assert!(outcome.is_err(), "the helper's panic is re-raised in the caller");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|i| assert_eq!(i, 1, "caller fails"));
        }));
        assert!(outcome.is_err(), "the caller's own panic unwinds after the helpers finish");
        let hits = AtomicUsize::new(0);
        team.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
