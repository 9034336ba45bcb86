//! The entry point: a whole job (checkpoint, spec, topology, resolution and plan), above
//! every layer it drives (load, dist, reshard).

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::comm::Communicator;
use crate::dist::{self, ShareOptions};
use crate::load::{
    load_rank, load_rank_into_buffer, load_rank_scattered, load_rank_views, verify_rank,
    LoadOptions, LoadStats, RankTensors,
};
use crate::plan::{self, Plan, TensorPlan};
use crate::reshard::{ReshardOptions, ReshardSummary};
use crate::sharding::{self, Config, Resolution, Spec};
use crate::topology::Topology;
use crate::vllm::{Names, TensorNames, VllmNames};
use crate::Result;

/// Everything needed to load any rank of a job: the steps from opening a checkpoint to the
/// plan (open → spec → resolve → plan), done once. The entry point of the library.
///
/// ```no_run
/// use safeshard::{Job, LoadOptions, Topology};
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
    /// Per-rank copy runs (under the names of [`Job::names`]).
    pub plan: Plan,
    /// With vLLM names: what each rank leaves until after its load.
    vllm: Option<VllmNames>,
}

/// A rank loaded into a caller's buffer ([`Job::load_rank_into_buffer`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BufferRank {
    /// What the load did.
    pub stats: LoadStats,
    /// The tensors the rank holds, at their offsets in the buffer (the plan's, less
    /// [`BufferRank::aliases`]).
    pub tensors: Vec<TensorPlan>,
    /// `(name, holder)` of plan tensors the rank leaves out because `holder` holds their
    /// values (see [`RankTensors::aliases`]).
    pub aliases: Vec<(String, String)>,
}

/// Options of [`Job::builder`]: a checkpoint plus, optionally, a topology (default: one
/// rank), a spec and config overrides.
///
/// ```no_run
/// use safeshard::{Job, Topology};
///
/// # fn main() -> safeshard::Result<()> {
/// let job = Job::builder("model-dir")
///     .topology(Topology::new(2, 1, 1, 1)?)
///     .spec("llama")
///     .set("num_key_value_heads=8")
///     .open()?;
/// println!("{} ranks", job.world());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct JobBuilder {
    checkpoint: PathBuf,
    topology: Topology,
    spec: Option<String>,
    overrides: Vec<String>,
    names: TensorNames,
}

impl JobBuilder {
    /// The topology (default: tp = pp = dp = ep = 1).
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// The sharding spec: a shipped name or a `.shard` path (default: detected from
    /// `config.json`).
    pub fn spec(mut self, spec: impl Into<String>) -> Self {
        self.spec = Some(spec.into());
        self
    }

    /// Overrides one config value, `key=value` (repeatable).
    pub fn set(mut self, key_value: impl Into<String>) -> Self {
        self.overrides.push(key_value.into());
        self
    }

    /// The names ranks hold (default: [`TensorNames::Checkpoint`]). With
    /// [`TensorNames::Vllm`] every rank holds exactly its vLLM `model.state_dict()` entries
    /// (see [`crate::vllm`]); an architecture or quantization method without a vLLM
    /// name map is [`crate::Error::Unsupported`].
    ///
    /// ```
    /// # fn main() -> safeshard::Result<()> {
    /// use safeshard::{Job, LoadOptions, TensorNames, Topology};
    /// # let dir = tempfile::tempdir().map_err(|e| safeshard::Error::io("tmp", e))?;
    /// # safeshard::synth::write_checkpoint(dir.path(), &safeshard::synth::SynthOptions::preset("llama-tiny")?)?;
    /// let job = Job::builder(dir.path())
    ///     .topology(Topology::new(2, 1, 1, 1)?)
    ///     .names(TensorNames::Vllm)
    ///     .open()?;
    /// let rank = job.load_rank(1, &LoadOptions::default())?;
    /// assert!(rank.get("model.layers.0.self_attn.qkv_proj.weight").is_some());
    /// assert!(rank.get("model.layers.0.self_attn.q_proj.weight").is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub fn names(mut self, names: TensorNames) -> Self {
        self.names = names;
        self
    }

    /// Opens, resolves and plans.
    pub fn open(self) -> Result<Job> {
        let mut job = Job::open(
            &self.checkpoint,
            self.topology,
            self.spec.as_deref(),
            &self.overrides,
        )?;
        if self.names == TensorNames::Vllm {
            let (plan, vllm) = VllmNames::plan(&job.plan, &job.ckpt, &job.config, &job.spec)?;
            job.plan = plan;
            job.vllm = Some(vllm);
        }
        Ok(job)
    }
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
            vllm: None,
        })
    }

    /// A [`JobBuilder`] for `checkpoint` (a `.safetensors` file, an index, or a directory).
    pub fn builder(checkpoint: impl Into<PathBuf>) -> JobBuilder {
        JobBuilder {
            checkpoint: checkpoint.into(),
            topology: Topology {
                tp: 1,
                pp: 1,
                dp: 1,
                ep: 1,
                pp_layers: None,
            },
            spec: None,
            overrides: Vec::new(),
            names: TensorNames::Checkpoint,
        }
    }

    /// The names the ranks hold.
    pub fn names(&self) -> TensorNames {
        match self.vllm {
            Some(_) => TensorNames::Vllm,
            None => TensorNames::Checkpoint,
        }
    }

    /// Finishes a rank of [`Job::plan`] loaded through the lower layers
    /// ([`crate::load::load_rank`], [`crate::dist::load_shared_with`], ...): for vLLM names,
    /// transposes the tensors vLLM holds transposed (GPT-2's Conv1D weights; a view is
    /// materialized first), writes the values of the buffers no checkpoint provides
    /// (attention `_k_scale` ...) and re-ties the embeddings vLLM re-ties (see
    /// [`crate::vllm`]). [`Job::load_rank`], [`Job::load_shared`], [`Job::load_rank_views`]
    /// and [`Job::load_rank_scattered`] do it themselves. A finished rank
    /// ([`RankTensors::is_finished`]) is left as it is, so calling this again changes
    /// nothing; a rank of another plan is an error.
    pub fn finish(&self, loaded: &mut RankTensors) -> Result<()> {
        match &self.vllm {
            Some(v) => v.finish(&self.plan, loaded, Names::Vllm).map(|_| ()),
            None => {
                loaded.mark_finished();
                Ok(())
            }
        }
    }

    /// Loads one rank into `buf`, memory the caller owns (see
    /// [`crate::load::load_rank_into_buffer`]), and finishes it there like [`Job::load_rank`]:
    /// the only way to finish a caller's buffer, so its steps run exactly once.
    pub fn load_rank_into_buffer(
        &self,
        rank: usize,
        opts: &LoadOptions,
        buf: &mut [u8],
    ) -> Result<BufferRank> {
        let stats = load_rank_into_buffer(&self.plan, rank, opts, buf)?;
        let aliases = match &self.vllm {
            Some(v) => v.finish_buffer(&self.plan, rank, buf)?,
            None => Vec::new(),
        };
        let tensors = self
            .plan
            .ranks
            .get(rank)
            .map_or(&[][..], |r| &r.tensors[..]);
        let tensors = tensors
            .iter()
            .filter(|t| !aliases.iter().any(|(a, _)| *a == t.name))
            .cloned()
            .collect();
        Ok(BufferRank {
            stats,
            tensors,
            aliases,
        })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.plan.ranks.len()
    }

    /// What resolution noticed but did not refuse (one line each), for the caller to show.
    pub fn warnings(&self) -> &[String] {
        &self.resolution.warnings
    }

    /// Loads one rank into memory it owns (see [`crate::load::load_rank`]).
    pub fn load_rank(&self, rank: usize, opts: &LoadOptions) -> Result<RankTensors> {
        let mut loaded = load_rank(&self.plan, rank, opts)?;
        self.finish(&mut loaded)?;
        Ok(loaded)
    }

    /// Loads one rank with the tensors named in `into` written straight into caller memory
    /// and the rest into memory it owns (see [`crate::load::load_rank_scattered`]); finished
    /// like [`Job::load_rank`] wherever each tensor lands.
    pub fn load_rank_scattered(
        &self,
        rank: usize,
        opts: &LoadOptions,
        into: &mut [(&str, &mut [u8])],
    ) -> Result<RankTensors> {
        let mut loaded = load_rank_scattered(&self.plan, rank, opts, into)?;
        match &self.vllm {
            Some(v) => v.finish_scattered(&self.plan, &mut loaded, into)?,
            None => loaded.mark_finished(),
        }
        Ok(loaded)
    }

    /// Loads this communicator rank's tensors together with the other ranks of `world`, under
    /// a share mode (see [`crate::dist::load_shared`]): the same [`RankTensors`] as
    /// [`Job::load_rank`] for rank `world.rank()`, with shared bytes read once.
    ///
    /// ```
    /// # fn main() -> safeshard::Result<()> {
    /// use safeshard::comm::run_threads;
    /// use safeshard::{Job, ShareMode, ShareOptions, Topology};
    /// # let dir = tempfile::tempdir().map_err(|e| safeshard::Error::io("tmp", e))?;
    /// # safeshard::synth::write_checkpoint(dir.path(), &safeshard::synth::SynthOptions::preset("llama-tiny")?)?;
    /// let job = Job::builder(dir.path()).topology(Topology::new(2, 1, 2, 1)?).open()?;
    /// let opts = ShareOptions { mode: ShareMode::Broadcast, ..ShareOptions::default() };
    /// for rank in run_threads(job.world(), |comm| job.load_shared(comm, &opts)) {
    ///     let rank = rank?;
    ///     assert_eq!(job.verify(&rank)?, rank.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn load_shared(
        &self,
        world: &dyn Communicator,
        opts: &ShareOptions,
    ) -> Result<RankTensors> {
        let mut loaded = dist::load_shared(&self.plan, world, opts)?;
        self.finish(&mut loaded)?;
        Ok(loaded)
    }

    /// Loads one rank with zero-copy views of the file mapping where
    /// [`LoadOptions::views`] is set.
    ///
    /// # Safety
    ///
    /// As [`crate::load::load_rank_views`]: no file of the checkpoint may be truncated or
    /// written while the result is alive.
    pub unsafe fn load_rank_views(&self, rank: usize, opts: &LoadOptions) -> Result<RankTensors> {
        // SAFETY: the caller upholds load_rank_views' contract.
        let mut loaded = unsafe { load_rank_views(&self.plan, rank, opts) }?;
        self.finish(&mut loaded)?;
        Ok(loaded)
    }

    /// Checks a loaded rank against the independent slow path (see [`verify_rank`]); returns
    /// the number of tensors checked.
    ///
    /// ```no_run
    /// # fn main() -> safeshard::Result<()> {
    /// use safeshard::{Job, LoadOptions, Topology};
    /// let job = Job::open("model-dir", Topology::new(2, 1, 1, 1)?, None, &[])?;
    /// let rank = job.load_rank(1, &LoadOptions::default())?;
    /// assert_eq!(job.verify(&rank)?, rank.len());
    /// # Ok(())
    /// # }
    /// ```
    pub fn verify(&self, loaded: &RankTensors) -> Result<usize> {
        if self.vllm.is_some() {
            return Err(crate::Error::Unsupported {
                what: "verify".into(),
                why: "the independent slow path checks checkpoint names; open the job with checkpoint names to verify".into(),
            });
        }
        verify_rank(&self.ckpt, &self.resolution, loaded)
    }

    /// Writes every rank's tensors to `out` as vLLM `sharded_state` files plus a manifest
    /// (see [`crate::reshard`] for the guarantees: no overlap with the input, an exclusive
    /// lock on `out`, atomic files, the manifest last).
    ///
    /// ```no_run
    /// # fn main() -> safeshard::Result<()> {
    /// use safeshard::{Job, ReshardOptions, Topology};
    /// let job = Job::open("model-dir", Topology::new(2, 1, 1, 1)?, None, &[])?;
    /// let done = job.reshard("model-tp2", &ReshardOptions::default())?;
    /// println!("{} files, {} bytes", done.files, done.bytes);
    /// # Ok(())
    /// # }
    /// ```
    pub fn reshard(&self, out: impl AsRef<Path>, opts: &ReshardOptions) -> Result<ReshardSummary> {
        let vllm = match (opts.format, &self.vllm) {
            (TensorNames::Checkpoint, _) => None,
            (TensorNames::Vllm, None) => return Err(crate::Error::invalid_argument(
                "format",
                "vllm needs a job opened with vLLM names (JobBuilder::names(TensorNames::Vllm))",
            )),
            (TensorNames::Vllm, Some(v)) => Some(crate::reshard::VllmOutput {
                names: v,
                ckpt: &self.ckpt,
            }),
        };
        crate::reshard::reshard(&self.plan, &[&self.ckpt.root], out.as_ref(), opts, vllm)
    }
}
