//! The entry point: a whole job (checkpoint, spec, topology, resolution and plan), above
//! every layer it drives (load, dist, reshard).

use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, Dtype};
use crate::comm::Communicator;
use crate::dist::{self, ShareOptions};
use crate::load::{
    load_rank, load_rank_scattered, load_rank_views, verify_rank, LoadOptions, RankTensors,
};
use crate::plan::names::{vllm_plan, BufferFill, TensorNames};
use crate::plan::{self, Plan};
use crate::reshard::{ReshardOptions, ReshardSummary};
use crate::sharding::vllm::VllmMap;
use crate::sharding::{self, Config, Resolution, Spec};
use crate::topology::Topology;
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
    names: TensorNames,
    buffers: BufferFill,
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
    /// (see [`crate::plan::names`]); an architecture or quantization method without a vLLM
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
            let map = VllmMap::for_spec(&job.spec)?;
            let (plan, buffers) = vllm_plan(&job.plan, &job.ckpt, &job.config, &map)?;
            job.plan = plan;
            job.buffers = buffers;
            job.names = TensorNames::Vllm;
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
            names: TensorNames::Checkpoint,
            buffers: BufferFill::default(),
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
        self.names
    }

    /// [`Job::fill_buffers`] for a rank loaded into a caller's buffer
    /// ([`crate::load::load_rank_into_buffer`]): `arena` laid out as the rank's plan says.
    pub fn finish_buffer(&self, rank: usize, arena: &mut [u8]) -> Result<()> {
        let Some(rp) = self.plan.ranks.get(rank) else {
            return Ok(());
        };
        self.finish(rank, &mut |i, f| {
            let t = rp
                .tensors
                .get(i)
                .ok_or_else(|| crate::Error::plan_rank(rank, format!("no tensor {i} to finish")))?;
            let s = usize::try_from(t.offset).ok();
            let e = s.and_then(|s| s.checked_add(usize::try_from(t.bytes).ok()?));
            let len = arena.len();
            match (s, e) {
                (Some(s), Some(e)) if e <= len => f(&mut arena[s..e]),
                _ => Err(crate::Error::Plan {
                    rank: Some(rank),
                    tensor: Some(t.name.clone()),
                    reason: format!("lies outside the {len}-byte buffer"),
                }),
            }
        })
    }

    /// Finishes a loaded rank of a vLLM-named plan: writes the values of the buffers it holds
    /// without a file source (attention `_k_scale` ...) and transposes the tensors vLLM holds
    /// transposed (GPT-2's Conv1D weights; with views, the rank is materialized first).
    /// [`Job::load_rank`], [`Job::load_shared`] and [`Job::load_rank_views`] do it themselves;
    /// a caller that loads [`Job::plan`] through the lower layers calls it once per load.
    /// Nothing to do for checkpoint names.
    pub fn fill_buffers(&self, loaded: &mut RankTensors) -> Result<()> {
        let rank = loaded.coords().rank;
        self.finish(rank, &mut |i, f| {
            if loaded.arena_tensor_mut(i).is_none() {
                loaded.materialize();
            }
            match loaded.arena_tensor_mut(i) {
                Some(data) => f(data),
                None => Err(crate::Error::plan_rank(
                    rank,
                    format!("tensor {i} to finish is not in the arena"),
                )),
            }
        })
    }

    /// The finishing steps of rank `rank` (transposes, then buffer values), each applied by
    /// `with(i, step)` to tensor `i`'s bytes wherever the caller holds them.
    #[allow(clippy::type_complexity)]
    fn finish(
        &self,
        rank: usize,
        with: &mut dyn FnMut(usize, &mut dyn FnMut(&mut [u8]) -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        for tr in self.buffers.transposes.get(rank).into_iter().flatten() {
            with(tr.tensor, &mut |d| tr.apply(d))?;
        }
        let tensors = self
            .plan
            .ranks
            .get(rank)
            .map_or(&[][..], |r| &r.tensors[..]);
        for &(i, value) in self.buffers.ranks.get(rank).into_iter().flatten() {
            let Some(t) = tensors.get(i) else {
                continue;
            };
            with(i, &mut |d| fill_value(rank, t, value, d))?;
        }
        Ok(())
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
        self.fill_buffers(&mut loaded)?;
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
        let tensors = self
            .plan
            .ranks
            .get(rank)
            .map_or(&[][..], |r| &r.tensors[..]);
        self.finish(rank, &mut |i, f| {
            let name = tensors.get(i).map(|t| t.name.as_str());
            if let Some((_, buf)) = into.iter_mut().find(|(n, _)| Some(*n) == name) {
                return f(buf);
            }
            match loaded.arena_tensor_mut(i) {
                Some(data) => f(data),
                None => Err(crate::Error::plan_rank(
                    rank,
                    format!("tensor {i} to finish is not loaded"),
                )),
            }
        })?;
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
        self.fill_buffers(&mut loaded)?;
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
        self.fill_buffers(&mut loaded)?;
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
        if self.names == TensorNames::Vllm {
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
        let files = match opts.format {
            TensorNames::Checkpoint => Vec::new(),
            TensorNames::Vllm if self.names != TensorNames::Vllm => {
                return Err(crate::Error::invalid_argument(
                    "format",
                    "vllm needs a job opened with vLLM names (JobBuilder::names(TensorNames::Vllm))",
                ))
            }
            TensorNames::Vllm => self.vllm_side_files()?,
        };
        let finish = |r: &mut RankTensors| self.fill_buffers(r);
        let extras = crate::reshard::Extras {
            files,
            finish: &finish,
        };
        crate::reshard::reshard(&self.plan, &[&self.ckpt.root], out.as_ref(), opts, &extras)
    }

    /// Files a vLLM model directory needs beside the weights: config.json (with
    /// `tie_word_embeddings` false when the checkpoint stores a head vLLM would untie for:
    /// the `sharded_state` loader never unties), generation and tokenizer files as they are.
    fn vllm_side_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        const COPIED: [&str; 9] = [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "chat_template.jinja",
        ];
        let mut files = Vec::new();
        if let Some(config) = &self.ckpt.config {
            let mut config = config.clone();
            let map = VllmMap::for_spec(&self.spec)?;
            let stored_head = map.tie.as_ref().is_some_and(|t| {
                self.ckpt
                    .tensors
                    .iter()
                    .any(|x| map.renamed(&x.name) == t.head)
            });
            let declared = map.tie.as_ref().is_some_and(|t| {
                self.config
                    .values
                    .get("tie_word_embeddings")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(t.default)
            });
            if stored_head && declared {
                if let Some(obj) = config.as_object_mut() {
                    obj.insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
                }
            }
            // vLLM's GPTQ config, when config.json does not list the quantized modules, reads
            // them off the checkpoint's files: every module with a non-float tensor. Off the
            // output's fused names that would miss gate_up_proj; write the list the original
            // checkpoint gives (vLLM maps checkpoint module names to its fused layers).
            if let Some(q) = config
                .get_mut("quantization_config")
                .and_then(|q| q.as_object_mut())
            {
                let gptq = q.get("quant_method").and_then(|m| m.as_str()) == Some("gptq");
                if gptq && !q.contains_key("modules_in_block_to_quantize") {
                    let floats = [Dtype::F16, Dtype::BF16, Dtype::F32];
                    let modules: std::collections::BTreeSet<&str> = self
                        .ckpt
                        .tensors
                        .iter()
                        .filter(|t| !floats.contains(&t.dtype))
                        .filter_map(|t| t.name.rsplit_once('.').map(|(m, _)| m))
                        .collect();
                    q.insert(
                        "modules_in_block_to_quantize".into(),
                        serde_json::Value::from(modules.into_iter().collect::<Vec<_>>()),
                    );
                }
            }
            let mut bytes = serde_json::to_vec_pretty(&config)
                .map_err(|e| crate::Error::io("config.json", std::io::Error::other(e)))?;
            bytes.push(b'\n');
            files.push(("config.json".to_string(), bytes));
        }
        for name in COPIED {
            let path = self.ckpt.root.join(name);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    let bytes = std::fs::read(&path).map_err(|e| crate::Error::io(&path, e))?;
                    files.push((name.to_string(), bytes));
                }
                _ => {}
            }
        }
        Ok(files)
    }
}

/// Writes `value` into every element of buffer `t`'s bytes.
fn fill_value(rank: usize, t: &crate::plan::TensorPlan, value: f64, dst: &mut [u8]) -> Result<()> {
    let elem = BufferFill::element(t.dtype, value).ok_or_else(|| crate::Error::Plan {
        rank: Some(rank),
        tensor: Some(t.name.clone()),
        reason: format!("buffer value {value} is not exact in {}", t.dtype),
    })?;
    for chunk in dst.chunks_exact_mut(elem.len()) {
        chunk.copy_from_slice(&elem);
    }
    Ok(())
}
