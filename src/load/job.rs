//! A whole loading job for library users: checkpoint, spec, topology, resolution and plan.

use std::path::Path;

use super::{load_rank, verify_rank, LoadOptions, RankTensors};
use crate::checkpoint::Checkpoint;
use crate::plan::{self, Plan};
use crate::sharding::{self, Config, Resolution, Spec};
use crate::topology::Topology;
use crate::Result;

/// Everything needed to load any rank of a job: the steps from opening a checkpoint to the
/// plan, done once.
///
/// ```no_run
/// use safeshard::load::{Job, LoadOptions};
/// use safeshard::topology::Topology;
///
/// # fn main() -> safeshard::Result<()> {
/// let job = Job::open("model-dir", Topology::new(4, 2, 1, 1)?, None, &[])?;
/// let rank = job.load_rank(3, &LoadOptions::default())?;
/// for t in rank.iter() {
///     println!("{} {} {:?} {} bytes", t.name, t.dtype, t.shape, t.data.len());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Job {
    /// The checkpoint catalog.
    pub ckpt: Checkpoint,
    /// Config values (`config.json` plus overrides).
    pub config: Config,
    /// The sharding spec.
    pub spec: Spec,
    /// The topology.
    pub topology: Topology,
    /// Every tensor's placement.
    pub resolution: Resolution,
    /// Per-rank copy runs.
    pub plan: Plan,
}

impl Job {
    /// Opens `checkpoint`, picks the spec (`spec`: a shipped name or a `.shard` path; `None`:
    /// detected from `config.json`), applies `overrides` (`key=value`), resolves and plans.
    pub fn open(
        checkpoint: impl AsRef<Path>,
        topology: Topology,
        spec: Option<&str>,
        overrides: &[String],
    ) -> Result<Job> {
        topology.validate()?;
        let ckpt = Checkpoint::open(checkpoint)?;
        let config = Config::from_checkpoint(&ckpt, overrides)?;
        let spec = match spec {
            Some(s) => Spec::load(s)?,
            None => Spec::detect(&config)?,
        };
        let resolution = sharding::resolve(&spec, &ckpt, &config, &topology)?;
        let plan = plan::build(&ckpt, &resolution, &topology, &spec.name)?;
        Ok(Job {
            ckpt,
            config,
            spec,
            topology,
            resolution,
            plan,
        })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.plan.ranks.len()
    }

    /// Loads one rank.
    pub fn load_rank(&self, rank: usize, opts: &LoadOptions) -> Result<RankTensors> {
        load_rank(&self.plan, rank, opts)
    }

    /// Checks a loaded rank against the independent slow path (see [`verify_rank`]).
    pub fn verify(&self, loaded: &RankTensors) -> Result<usize> {
        verify_rank(&self.ckpt, &self.resolution, loaded)
    }
}
