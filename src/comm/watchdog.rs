//! The process watchdog: a deadline on the waits that cannot be polled.
//!
//! Collectives poll their requests against the communicator's timeout and name the ranks that
//! did not arrive. Some waits cannot be polled: `MPI_Init` and `MPI_Finalize` wait in the
//! launcher's fence for every process of the job, `MPI_Comm_split` and NCCL's communicator
//! set-up block until every member calls them. A peer stopped there (SIGSTOP, a debugger, a
//! hung file system) would keep this process waiting forever, and a stopped process cannot
//! act: its live peers must end the job. The watchdog is a thread that watches the waits in
//! progress; when one outlives its limit it calls its handler, which for a job reports the
//! phase on stderr and ends the process ([`arm`]; the launcher then ends the job: Open MPI's
//! `mpirun` kills every other process, stopped ones included, once one exits without
//! `MPI_Finalize`).
//!
//! The deadline logic is here, apart from any transport, and tested with a recording handler.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How often the watchdog looks at the waits: a watch costs a lock, never a wake-up.
const TICK: Duration = Duration::from_millis(50);

/// A wait that outlived its limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overrun {
    /// The phase named when the wait began.
    pub phase: String,
    /// Its limit.
    pub limit: Duration,
    /// `Some(gap)` when the limit passed while this process itself did not run for `gap`
    /// (stopped by SIGSTOP or a debugger): then it is the one the others gave up on.
    pub frozen: Option<Duration>,
}

type Handler = Box<dyn Fn(&Overrun) + Send + Sync>;

struct Entry {
    id: u64,
    phase: String,
    limit: Duration,
    /// `None`: a limit too large to add to the clock, never reached.
    deadline: Option<Instant>,
    since: Instant,
    /// The longest time this process did not run while the wait lasted.
    longest_gap: Duration,
}

#[derive(Default)]
struct State {
    waits: Vec<Entry>,
    next_id: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thread that calls a handler for every wait that outlives its limit.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// One wait in progress; dropping it ends the wait.
#[must_use = "the wait is watched until this guard is dropped"]
pub struct Watch<'a> {
    dog: &'a Watchdog,
    id: u64,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        lock(&self.dog.shared.state)
            .waits
            .retain(|e| e.id != self.id);
    }
}

impl Watchdog {
    /// Starts the watchdog thread. `on_overrun` runs on that thread, once per overrun wait
    /// (which is then no longer watched); a job's handler ends the process.
    pub fn start(on_overrun: impl Fn(&Overrun) + Send + Sync + 'static) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let handler: Handler = Box::new(on_overrun);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("safeshard-watchdog".into())
            .spawn(move || run(&s, &handler))
            .map_err(|e| Error::comm("watchdog", format!("cannot start its thread: {e}")))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Watches a wait of at most `limit` in `phase` until the returned guard is dropped.
    pub fn watch(&self, phase: &str, limit: Duration) -> Watch<'_> {
        let mut st = lock(&self.shared.state);
        let id = st.next_id;
        st.next_id += 1;
        let now = Instant::now();
        st.waits.push(Entry {
            id,
            phase: phase.to_string(),
            limit,
            deadline: now.checked_add(limit),
            since: now,
            longest_gap: Duration::ZERO,
        });
        Watch { dog: self, id }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, handler: &Handler) {
    let mut st = lock(&shared.state);
    let mut last = Instant::now();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        // A tick much later than due: this process did not run in between.
        let gap = now.saturating_duration_since(last);
        last = now;
        for e in &mut st.waits {
            let within = gap.min(now.saturating_duration_since(e.since));
            e.longest_gap = e.longest_gap.max(within);
        }
        if let Some(i) = st
            .waits
            .iter()
            .position(|e| e.deadline.is_some_and(|d| d <= now))
        {
            let e = st.waits.swap_remove(i);
            let frozen = super::deadline::frozen(e.limit, e.longest_gap).then_some(e.longest_gap);
            drop(st);
            handler(&Overrun {
                phase: e.phase,
                limit: e.limit,
                frozen,
            });
            st = lock(&shared.state);
            last = Instant::now();
            continue;
        }
        st = shared
            .wake
            .wait_timeout(st, TICK)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

static GLOBAL: OnceLock<Watchdog> = OnceLock::new();

/// The process's job watchdog, once [`arm`] has started it.
pub fn global() -> Option<&'static Watchdog> {
    GLOBAL.get()
}

/// Watches a wait on the process's job watchdog, if one is armed and `limit` is finite.
pub fn watch(phase: &str, limit: Option<Duration>) -> Option<Watch<'static>> {
    Some(global()?.watch(phase, limit?))
}

/// Arms the process's job watchdog (once; later calls return the same one): a wait that
/// outlives its limit prints one line on stderr, `error: rank R: timed out after T in phase
/// P: ...` naming the ranks of this node that are stopped (the only peers a process can see
/// before MPI is up, see [`super::launch::stalled_local_ranks`]), and ends the process with
/// exit code 1, whatever the main thread is blocked in.
pub fn arm() -> Result<&'static Watchdog> {
    if let Some(w) = GLOBAL.get() {
        return Ok(w);
    }
    let launched = super::launch::detect_env().ok().flatten();
    let dog = Watchdog::start(move |o| {
        let stalled = launched
            .as_ref()
            .map(|l| super::launch::stalled_local_ranks(l.launcher, l.rank))
            .unwrap_or_default();
        let line = overrun_line(launched.as_ref().map(|l| l.rank), o, &stalled);
        exit_with_line(&line)
    })?;
    // A lost race leaves the other thread's watchdog in place; this one stops when dropped.
    let _ = GLOBAL.set(dog);
    GLOBAL
        .get()
        .ok_or_else(|| Error::comm("watchdog", "could not be installed"))
}

/// The line of an overrun wait: `error: rank 0: timed out after 3s in phase "MPI start-up":
/// rank 2 did not arrive (stopped on this node)`.
pub fn overrun_line(
    rank: Option<usize>,
    o: &Overrun,
    stalled: &[(usize, super::launch::Stall)],
) -> String {
    if let (Some(gap), Some(r)) = (o.frozen, rank) {
        let e = super::deadline::stopped_error(r, &o.phase, o.limit, gap);
        return format!("error: {e}");
    }
    let who = rank.map_or_else(|| "this rank".to_string(), |r| format!("rank {r}"));
    let mut parts = Vec::new();
    for kind in [
        super::launch::Stall::Stopped,
        super::launch::Stall::Traced,
        super::launch::Stall::Uninterruptible,
    ] {
        let ranks: Vec<usize> = stalled
            .iter()
            .filter(|(_, s)| *s == kind)
            .map(|(r, _)| *r)
            .collect();
        if !ranks.is_empty() {
            parts.push(format!(
                "rank {} did not arrive ({} on this node)",
                super::rank_list(&ranks),
                kind.describe()
            ));
        }
    }
    if parts.is_empty() {
        parts.push(
            "the other ranks did not all arrive (no rank on this node is stopped; ranks on \
             other nodes cannot be named in this phase: look at them)"
                .into(),
        );
    }
    format!(
        "error: {who}: timed out after {} in phase {:?}: {}",
        super::human_duration(o.limit),
        o.phase,
        parts.join("; ")
    )
}

/// Writes `line` to stderr without locks or allocation and ends the process with code 1.
fn exit_with_line(line: &str) -> ! {
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(b'\n');
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        // SAFETY: writes from a live buffer of `rest.len()` bytes to fd 2.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            break;
        }
        rest = rest.get(n as usize..).unwrap_or(&[]);
    }
    // SAFETY: _exit ends the process at once: no destructors or atexit handlers run while
    // another thread is blocked inside MPI or NCCL.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn recording() -> (Watchdog, mpsc::Receiver<(Overrun, Instant)>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let dog = Watchdog::start(move |o| {
            let _ = lock_tx(&tx).send((o.clone(), Instant::now()));
        })
        .unwrap();
        (dog, rx)
    }

    fn lock_tx<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn a_wait_past_its_limit_is_reported_once_with_its_phase() {
        let (dog, rx) = recording();
        let start = Instant::now();
        let w = dog.watch("MPI start-up", Duration::from_millis(200));
        let (o, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(o.phase, "MPI start-up");
        assert_eq!(o.limit, Duration::from_millis(200));
        let waited = at - start;
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        // Reported once, not every tick.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(w);
    }

    #[test]
    fn a_wait_that_ends_in_time_is_not_reported() {
        let (dog, rx) = recording();
        for _ in 0..100 {
            let _w = dog.watch("collective", Duration::from_millis(300));
        }
        {
            let _w = dog.watch("finalize", Duration::from_millis(300));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(rx.recv_timeout(Duration::from_millis(600)).is_err());
    }

    #[test]
    fn the_earliest_of_several_waits_fires_first() {
        let (dog, rx) = recording();
        let _long = dog.watch("long", Duration::from_secs(3600));
        let _short = dog.watch("short", Duration::from_millis(100));
        let (o, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(o.phase, "short");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }

    #[test]
    fn the_line_names_the_phase_and_the_stopped_local_ranks() {
        use super::super::launch::Stall;
        let mut o = Overrun {
            phase: "MPI start-up".into(),
            limit: Duration::from_secs(3),
            frozen: None,
        };
        let line = overrun_line(Some(0), &o, &[(2, Stall::Stopped), (3, Stall::Stopped)]);
        assert_eq!(
            line,
            "error: rank 0: timed out after 3s in phase \"MPI start-up\": rank 2,3 did not \
             arrive (stopped on this node)"
        );
        let line = overrun_line(None, &o, &[(1, Stall::Uninterruptible)]);
        assert!(
            line.starts_with("error: this rank: timed out after 3s"),
            "{line}"
        );
        assert!(
            line.contains("rank 1 did not arrive (in uninterruptible"),
            "{line}"
        );
        let line = overrun_line(Some(5), &o, &[]);
        assert!(
            line.contains("ranks on other nodes cannot be named"),
            "{line}"
        );
        // The stopped process itself, continued after the deadline, says so.
        o.frozen = Some(Duration::from_secs(20));
        let line = overrun_line(Some(2), &o, &[(3, Stall::Stopped)]);
        assert_eq!(
            line,
            "error: rank 2: this process was stopped for 20s (SIGSTOP or a debugger?) while \
             waiting in phase \"MPI start-up\" (deadline 3s): the other ranks have given up on it"
        );
    }
}
