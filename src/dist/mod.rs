//! Distributed loading: every rank of a job loads its tensors together with the others,
//! sharing the reading of the checkpoint, and gets the same [`RankTensors`] a local
//! [`crate::load::load_rank`] returns.
//!
//! Every rank calls [`load_shared`] with the same plan and its world communicator. The modes:
//!
//! - [`ShareMode::None`]: every rank reads its own segments from storage.
//! - [`ShareMode::Broadcast`]: a tensor that several ranks hold byte for byte (same name, same
//!   size, same source segments: norms, replicated KV heads, the same slice in every DP
//!   replica) is read by one owner, the member with the least bytes to read so far (so owners
//!   spread across ranks), and broadcast on a sub-communicator of exactly its holders.
//!   Sub-communicators are made once per distinct holder set; disjoint sets share one split.
//!   Each rank takes part in the broadcasts in one global order, which cannot deadlock.
//! - [`ShareMode::ReadOnce`]: the union of all byte ranges the job needs is cut into rounds of
//!   at most [`ShareOptions::round_bytes`], each round into one contiguous piece per rank; each
//!   rank reads its pieces and an all-to-all-v hands every rank the bytes of its segments.
//!   With [`ShareOptions::per_node`] this happens within each node (ranks grouped by node
//!   name), so each node reads the checkpoint once; nodes may need different numbers of
//!   rounds, so a round's collectives run on the node's communicator only.
//!
//! [`load_shared_into`] writes chosen tensors straight into caller buffers instead of the
//! arena (`dist/target.rs`), under every mode.
//!
//! The pure planning of the modes (who reads what, which broadcasts, the rounds) is in
//! [`BroadcastSchedule`] and [`ReadOnceSchedule`]; the functions that run collectives follow
//! them. Guarantees, on every backend:
//!
//! - **Agreement first.** Before any other collective the ranks compare a job fingerprint:
//!   the safeshard version, the world size, the plan's hash and every option that decides
//!   which collectives run or how data is cut ([`ShareOptions::fingerprint`]). A difference
//!   is one [`Error::Disagree`] on every rank naming the option, the values and the ranks.
//! - **No hang on failure.** Every local step that can fail ends with [`agree`]; counts are
//!   exchanged and compared before any broadcast or all-to-all, and no receive buffer is
//!   written past its length whatever a peer sends.
//! - **No hang on a stopped rank.** [`ShareOptions::timeout`] bounds every collective; the
//!   rank that gives up names the phase and the ranks that did not arrive
//!   ([`Error::Timeout`]). MPI start-up and finalize are the caller's (the CLI arms
//!   `MpiUniverse::init_with_timeout` with the same timeout).
//! - **No abort on memory.** Arenas, staging and receive buffers are allocated fallibly; a
//!   failure names the rank, the size and what the buffer was for.

mod default;
mod exchange;
mod read_once;
mod schedule;
mod segments;
mod target;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use default::{choose_share, ShareChoice};
pub use schedule::{BroadcastSchedule, ReadOnceSchedule};

use crate::comm::{agree, agree_fields, Communicator};
use crate::load::{Arena, ArenaInit, ExecStats, IoMode, LoadOptions, LoadStats, RankTensors};
use crate::plan::Plan;
use crate::{Error, Result};

/// How ranks share the reading of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ShareMode {
    /// Every rank reads its own slices.
    #[default]
    None,
    /// Bytes held by several ranks are read by one and broadcast to the others.
    Broadcast,
    /// Every needed byte is read once per job (or per node) and scattered with all-to-all-v.
    ReadOnce,
}

impl FromStr for ShareMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ShareMode::None),
            "broadcast" => Ok(ShareMode::Broadcast),
            "read-once" => Ok(ShareMode::ReadOnce),
            _ => Err(Error::invalid_argument(
                "share",
                format!("mode {s:?}: expected none, broadcast or read-once"),
            )),
        }
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareMode::None => "none",
            ShareMode::Broadcast => "broadcast",
            ShareMode::ReadOnce => "read-once",
        })
    }
}

/// Smallest [`ShareOptions::round_bytes`]: every round is a few collectives plus page-rounded
/// reads, so tiny rounds only make a job crawl (millions of rounds) and read more, not less.
pub const MIN_ROUND_BYTES: u64 = 64 << 10;

/// Default [`ShareOptions::timeout`]: ten minutes, like `torch.distributed`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of a shared load.
#[derive(Clone, Debug)]
pub struct ShareOptions {
    /// The share mode.
    pub mode: ShareMode,
    /// Read-once per node instead of per job.
    pub per_node: bool,
    /// This rank's node name for `per_node` (default: the host name).
    pub node: Option<String>,
    /// The ranks on this rank's node, sharing its page cache (from [`choose_share`], see
    /// [`ShareChoice::apply`]); the modes where a rank reads its own slices ask for spans
    /// the node reads together whole ([`crate::load::LoadOptions::node_spans`]). Empty:
    /// unknown, each rank asks for exactly its pages.
    pub node_ranks: Vec<usize>,
    /// Read-once: bytes of the job's union read per round (bounds staging memory to about
    /// this divided by the group size, plus the bytes sent). At least [`MIN_ROUND_BYTES`].
    pub round_bytes: u64,
    /// How long any collective may wait for the other ranks (`None`: forever).
    pub timeout: Option<Duration>,
    /// How the bytes a rank reads itself are read (the loader's engine and its options).
    pub load: LoadOptions,
    /// The caller's own options that every rank must share, compared with the job
    /// fingerprint (e.g. whether the caller verifies or digests the result afterwards, which
    /// adds collectives): `(name, value)`.
    pub agree_also: Vec<(String, String)>,
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            mode: ShareMode::None,
            per_node: false,
            node: None,
            node_ranks: Vec::new(),
            round_bytes: 1 << 30,
            timeout: Some(DEFAULT_TIMEOUT),
            load: LoadOptions::default(),
            agree_also: Vec::new(),
        }
    }
}

impl ShareOptions {
    /// Checks the options on their own (the same on every rank, so no agreement needed).
    pub fn validate(&self) -> Result<()> {
        if self.round_bytes < MIN_ROUND_BYTES {
            return Err(Error::invalid_argument(
                "round_bytes",
                format!(
                    "{}: at least {MIN_ROUND_BYTES} bytes (64 KiB)",
                    self.round_bytes
                ),
            ));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::invalid_argument("timeout", "0: must be positive"));
        }
        Ok(())
    }

    /// What every rank of a job must agree on, by field name: the safeshard version, the
    /// world size, the options that decide which collectives run or how data is cut,
    /// [`ShareOptions::agree_also`], and last the plan's hash. Options that do not matter for
    /// the mode (`round_bytes` without read-once, ...) are left out, so they may differ.
    pub fn fingerprint(&self, plan: &Plan) -> Vec<(String, String)> {
        self.fingerprint_with_hash(plan.ranks.len(), &plan_hash(plan))
    }

    fn fingerprint_with_hash(&self, world: usize, hash: &str) -> Vec<(String, String)> {
        let mut f = vec![
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("world size".to_string(), world.to_string()),
            ("mode".to_string(), self.mode.to_string()),
        ];
        if self.mode == ShareMode::ReadOnce {
            f.push(("per_node".into(), self.per_node.to_string()));
            f.push(("round_bytes".into(), self.round_bytes.to_string()));
        }
        if self.mode != ShareMode::None {
            // The engine decides the bytes a rank reports as read, not the bytes moved, but a
            // job mixing engines reports mixed numbers: keep them equal.
            f.push(("io".into(), self.load.io.name().into()));
            if self.load.io == IoMode::Pread {
                f.push((
                    "staging_budget".into(),
                    self.load.staging_budget.to_string(),
                ));
            }
        }
        f.extend(self.agree_also.iter().cloned());
        // Last: a different plan usually follows from one of the above.
        f.push(("plan".into(), hash.to_string()));
        f
    }
}

/// The plan's identity in a fingerprint: the first 16 hex digits of [`Plan::hash`] (enough to
/// tell plans apart, short enough for a one-line message).
fn plan_hash(plan: &Plan) -> String {
    plan.hash()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the ranks of one process can share instead of computing it each: the plan's hash
/// and the broadcast schedule, each computed once, by the first rank that needs it.
pub struct SharedPlan<'a> {
    plan: &'a Plan,
    hash: OnceLock<String>,
    broadcast: OnceLock<BroadcastSchedule>,
}

impl<'a> SharedPlan<'a> {
    /// Wraps `plan`; nothing is computed yet.
    pub fn new(plan: &'a Plan) -> SharedPlan<'a> {
        SharedPlan {
            plan,
            hash: OnceLock::new(),
            broadcast: OnceLock::new(),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &'a Plan {
        self.plan
    }

    fn hash(&self) -> &str {
        self.hash.get_or_init(|| plan_hash(self.plan))
    }

    fn broadcast(&self) -> &BroadcastSchedule {
        self.broadcast
            .get_or_init(|| BroadcastSchedule::new(self.plan))
    }
}

/// Bytes a rank moved during a shared load (what [`LoadStats`] does not cover).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes this rank sent to other ranks.
    pub sent_bytes: u64,
    /// Bytes this rank received from other ranks.
    pub received_bytes: u64,
}

/// Loads this rank's tensors under `opts.mode`, cooperating with the other ranks of `world`.
///
/// Collective on `world`: every rank of the job calls it with an equal plan. Fails on every
/// rank (never hangs) when any rank fails; the error of a rank that failed itself is its own
/// (naming the file), the others name the failed rank.
///
/// ```no_run
/// use safeshard::comm::run_threads;
/// use safeshard::dist::{load_shared, ShareMode, ShareOptions};
/// use safeshard::Job;
/// use safeshard::topology::Topology;
///
/// # fn main() -> safeshard::Result<()> {
/// let job = Job::open("model-dir", Topology::new(2, 2, 1, 1)?, None, &[])?;
/// let opts = ShareOptions { mode: ShareMode::Broadcast, ..Default::default() };
/// for rank in run_threads(job.world(), |comm| load_shared(job.plan(), comm, &opts)) {
///     let rank = rank?;
///     println!("rank {}: {} tensors", rank.stats().rank, rank.len());
/// }
/// # Ok(())
/// # }
/// ```
pub fn load_shared(
    plan: &Plan,
    world: &dyn Communicator,
    opts: &ShareOptions,
) -> Result<RankTensors> {
    load_shared_with(&SharedPlan::new(plan), world, opts).map(|(t, _)| t)
}

/// [`load_shared`] with the bytes moved, on a [`SharedPlan`]: rank threads of one process
/// pass the same one, so the plan's hash and the broadcast schedule (whole-job work) are
/// computed once per process, not once per rank.
pub fn load_shared_with(
    shared: &SharedPlan<'_>,
    world: &dyn Communicator,
    opts: &ShareOptions,
) -> Result<(RankTensors, Traffic)> {
    load_shared_into(shared, world, opts, &mut [])
}

/// [`load_shared_with`] with the tensors named in `into` written straight into caller
/// buffers (a trainer's parameters; exactly each tensor's bytes, row-major) instead of the
/// arena, whatever the share mode: bytes this rank reads go there from the files, broadcast
/// and exchanged bytes from the communicator. The returned [`RankTensors`] holds the other
/// tensors; the arena pages of the redirected ones are never touched. The buffers are checked
/// against this rank's plan (names, sizes) in the agreed plan check, before any byte moves.
pub fn load_shared_into(
    shared: &SharedPlan<'_>,
    world: &dyn Communicator,
    opts: &ShareOptions,
    into: &mut [(&str, &mut [u8])],
) -> Result<(RankTensors, Traffic)> {
    let start = Instant::now();
    let plan = shared.plan();
    let me = world.rank();
    world.set_timeout(opts.timeout);
    world.set_phase("job fingerprint");
    let fields = opts.fingerprint_with_hash(plan.ranks.len(), shared.hash());
    let fields: Vec<(&str, String)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    agree_fields(world, &fields)?;
    world.set_phase("plan check");
    let setup = (|| {
        opts.validate()?;
        if world.size() != plan.ranks.len() {
            return Err(Error::WorldSize {
                ranks: world.size(),
                planned: plan.ranks.len(),
                topology: None,
            });
        }
        for r in &plan.ranks {
            segments::check_rank(plan, r)?;
        }
        let rp = plan
            .ranks
            .get(me)
            .ok_or_else(|| Error::plan_rank(me, "not in the plan"))?;
        crate::load::buffer_slots(rp, into)
    })();
    let redirected = agree(world, setup)?;
    let rp = plan
        .ranks
        .get(me)
        .ok_or_else(|| Error::plan_rank(me, "not in the plan"))?;
    world.set_phase("arena allocation");
    // Redirected tensors' pages are never touched, so a populated arena would only waste
    // them: prepare it ahead instead, as load_rank_scattered does.
    let init = match opts.load.arena {
        ArenaInit::Populate if !into.is_empty() => ArenaInit::Ahead,
        other => other,
    };
    let arena = Arena::new(rp.arena_bytes, init).map_err(|_| Error::OutOfMemory {
        bytes: rp.arena_bytes,
        what: "its tensors".into(),
        rank: Some(me),
    });
    let mut arena = agree(world, arena)?;
    let mut traffic = Traffic::default();
    let buffers = into
        .iter_mut()
        .zip(&redirected)
        .map(|((_, b), &(_, start))| (start, &mut **b))
        .collect();
    let mut target = agree(world, target::Target::new(&mut arena, buffers))?;
    // What the engine chose where this rank read everything itself (the other modes read
    // in several calls; their stats say only the bytes).
    let mut exec = ExecStats::default();
    let read_bytes = match opts.mode {
        ShareMode::None => {
            world.set_phase("read");
            // The rank's own runs, strided ones whole: the spans its node reads together
            // are asked for whole.
            let load = opts
                .load
                .clone()
                .with_node_spans(plan, &opts.node_ranks, me);
            let r = target.read(&plan.files, &rp.copies, &load);
            exec = agree(world, r)?;
            exec.read_bytes
        }
        ShareMode::Broadcast => {
            world.set_phase("broadcast: schedule");
            let schedule = shared.broadcast();
            exchange::broadcast(plan, schedule, world, opts, &mut target, &mut traffic)?
        }
        ShareMode::ReadOnce => read_once::read_once(plan, world, opts, &mut target, &mut traffic)?,
    };
    drop(target);
    world.set_phase("done");
    let stats = LoadStats {
        rank: me,
        tensors: rp.tensors.len(),
        bytes: rp.bytes,
        read_bytes,
        view_bytes: 0,
        peak_staging: 0,
        seconds: start.elapsed().as_secs_f64(),
        threads: exec.threads,
        paths: exec.paths,
    };
    let mut loaded = RankTensors::from_arena(rp, arena, stats);
    for &(i, _) in &redirected {
        loaded.leave_out(i);
    }
    Ok((loaded, traffic))
}

#[cfg(test)]
mod tests;
