//! `safeshard._safeshard`: the native half of the Python package.
//!
//! It wraps the Rust library and nothing more: planning is [`safeshard::Job`], loading is
//! [`safeshard::Job::load_rank`] or, over a communicator, [`safeshard::dist::load_shared_with`]
//! (share modes). What Python
//! sees of a loaded rank is one owned arena (never a file mapping: a file truncated under a
//! mapping would be a `SIGBUS` in the user's process) exported through DLPack, plus the table
//! of tensor offsets; `safeshard/__init__.py` turns those into torch or numpy views.
//!
//! Lifetime: the arena is reference-counted. Every DLPack capsule handed out holds one count
//! and releases it in its deleter, so the bytes live until the last tensor viewing them is
//! gone, whatever happens to the Python `Rank` object.

use std::collections::HashSet;
use std::ffi::{c_void, CStr};
use std::ptr::NonNull;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use safeshard::comm::Communicator;
use safeshard::dist::{choose_share, load_shared_with, SharedPlan};
use safeshard::error::{ErrorKind, OptionNames};
use safeshard::load::LoadControl;
use safeshard::plan::TensorPlan;
use safeshard::{
    Error, IoMode, Job, LoadOptions, RankTensors, ShareMode, ShareOptions, TensorNames, Topology,
};

mod caller;
mod comm;
mod dlpack;
mod slices;

create_exception!(
    _safeshard,
    SafeshardError,
    PyValueError,
    "Every safeshard failure: `str(e)` is the CLI's one-line message, `e.kind` names the \
     error class (`io`, `invalid_file`, `spec`, `usage`, ...), `e.exit_code` the CLI's status."
);

/// The Python spelling of library options: the keyword argument (`tp`, `share`), and in hints
/// `` `spec=` `` so it reads as one.
struct Keywords;

impl OptionNames for Keywords {
    fn option(&self, field: &str) -> String {
        match field {
            "mode" => "share".into(),
            // The library parses `TensorNames` as the CLI's `format`; Python calls it `names`.
            "format" => "names".into(),
            f => f.into(),
        }
    }

    fn hint(&self, field: &str) -> String {
        format!("`{}=`", self.option(field))
    }
}

/// `SafeshardError(message)` of kind `kind` (its exit code from the library's one mapping).
fn py_error(py: Python<'_>, kind: ErrorKind, msg: String) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let inst = py.get_type::<SafeshardError>().call1((msg,))?;
        inst.setattr("kind", kind.name())?;
        inst.setattr("exit_code", kind.exit_code())?;
        Ok(PyErr::from_value(inst))
    })();
    made.unwrap_or_else(|err| err)
}

/// Turns a library error into `SafeshardError(message)` with `kind` and `exit_code` set; the
/// message is the CLI's line with options named as keyword arguments.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let err = py_error(py, e.kind(), e.render(&Keywords));
    // A timeout also carries its phase and the ranks it names as missing.
    if let (Error::Timeout { phase, .. }, Some(missing)) = (&e, e.missing_ranks()) {
        let v = err.value(py);
        let _ = v.setattr("phase", phase);
        let _ = v.setattr("missing", missing);
    }
    err
}

/// The `SafeshardError` of kind `kind` (`usage`, ...) with `message`, for errors the Python
/// layer (`safeshard/__init__.py`) finds itself: its exit code from the library's mapping.
#[pyfunction]
fn error(py: Python<'_>, kind: &str, message: String) -> PyResult<PyErr> {
    let kind = ErrorKind::from_name(kind)
        .ok_or_else(|| PyValueError::new_err(format!("unknown error kind {kind:?}")))?;
    Ok(py_error(py, kind, message))
}

fn usage(py: Python<'_>, option: &str, msg: String) -> PyErr {
    to_py(py, Error::invalid_argument(option, msg))
}

/// A plan: every rank's tensors and copy runs, made from headers only.
#[pyclass(frozen, module = "safeshard._safeshard")]
struct NativePlan {
    job: Arc<Job>,
}

fn parse_io(py: Python<'_>, io: &str) -> PyResult<IoMode> {
    io.parse::<IoMode>().map_err(|e| to_py(py, e))
}

fn load_options(
    py: Python<'_>,
    io: &str,
    threads: Option<usize>,
    control: &Arc<LoadControl>,
) -> PyResult<LoadOptions> {
    if threads == Some(0) {
        return Err(usage(py, "threads", "must be at least 1".into()));
    }
    Ok(LoadOptions {
        io: parse_io(py, io)?,
        threads,
        control: Some(Arc::clone(control)),
        ..LoadOptions::default()
    })
}

/// Runs `work` on a thread with the GIL released, and meanwhile, every 50 ms, takes the GIL
/// to deliver signals (Ctrl-C cancels the load through `control` and raises
/// `KeyboardInterrupt` once the worker has stopped) and to call `progress(done_bytes)`.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    control: &Arc<LoadControl>,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce() -> safeshard::Result<T> + Send,
) -> PyResult<T> {
    let progress = progress.map(|p| p.clone().unbind());
    let mut interrupted: Option<PyErr> = None;
    let mut last_done = u64::MAX;
    let result = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let worker = std::thread::Builder::new()
                .name("safeshard-load".into())
                .spawn_scoped(s, move || {
                    let r = work();
                    let _ = tx.send(());
                    r
                });
            let worker = match worker {
                Ok(w) => w,
                Err(e) => {
                    return Err(Error::load(
                        None,
                        format!("cannot start the loader thread: {e}"),
                    ))
                }
            };
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                if interrupted.is_some() {
                    continue;
                }
                Python::attach(|py| {
                    if let Err(e) = py.check_signals() {
                        control.cancel();
                        interrupted = Some(e);
                        return;
                    }
                    let done = control.done_bytes();
                    if let (Some(p), true) = (&progress, done != last_done) {
                        last_done = done;
                        if let Err(e) = p.call1(py, (done,)) {
                            control.cancel();
                            interrupted = Some(e);
                        }
                    }
                });
            }
            worker
                .join()
                .unwrap_or_else(|_| Err(Error::load(None, "the loader thread panicked")))
        })
    });
    if let Some(e) = interrupted {
        return Err(e);
    }
    // A Ctrl-C after the last poll, while the load finished, raises here: from the load it
    // interrupted, not at whatever bytecode runs next (outside the caller's `try`).
    py.check_signals()?;
    if let Some(p) = &progress {
        p.call1(py, (control.done_bytes(),))?;
    }
    result.map_err(|e| to_py(py, e))
}

#[pymethods]
impl NativePlan {
    /// Opens the checkpoint, resolves the spec and plans every rank (headers only; the GIL is
    /// released meanwhile).
    #[new]
    #[pyo3(signature = (path, tp, pp, dp, ep, spec=None, overrides=Vec::new(), pp_layers=None, names="checkpoint"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        tp: usize,
        pp: usize,
        dp: usize,
        ep: usize,
        spec: Option<String>,
        overrides: Vec<String>,
        pp_layers: Option<Vec<usize>>,
        names: &str,
    ) -> PyResult<Self> {
        let names: TensorNames = names.parse().map_err(|e| to_py(py, e))?;
        let job = py
            .detach(|| {
                let mut topology = Topology::new(tp, pp, dp, ep)?;
                topology.pp_layers = pp_layers;
                let mut builder = Job::builder(&path).topology(topology).names(names);
                if let Some(spec) = spec {
                    builder = builder.spec(spec);
                }
                for kv in overrides {
                    builder = builder.set(kv);
                }
                builder.open()
            })
            .map_err(|e| to_py(py, e))?;
        Ok(NativePlan { job: Arc::new(job) })
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.job.plan().ranks().len()
    }

    #[getter]
    fn hash(&self) -> String {
        self.job.plan().hash_hex()
    }

    #[getter]
    fn spec(&self) -> String {
        self.job.plan().spec().to_owned()
    }

    /// What resolution noticed but did not refuse, one line each.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.job.warnings().to_vec()
    }

    /// `(tp, pp, dp, ep)`.
    #[getter]
    fn topology(&self) -> (usize, usize, usize, usize) {
        let t = self.job.plan().topology();
        (t.tp, t.pp, t.dp, t.ep)
    }

    fn to_json(&self, py: Python<'_>) -> String {
        let job = Arc::clone(&self.job);
        py.detach(move || safeshard::plan::json_document(job.plan()))
    }

    /// One rank's summary: a dict with the coordinates, `bytes`, `read_bytes`,
    /// `staging_bytes`, `arena_bytes` and `tensors` as `(name, dtype, shape, nbytes)`.
    fn rank_info<'py>(&self, py: Python<'py>, rank: usize) -> PyResult<Bound<'py, PyDict>> {
        let rp = self.job.plan().ranks().get(rank).ok_or_else(|| {
            usage(
                py,
                "rank",
                format!(
                    "{rank}: the plan has {} ranks",
                    self.job.plan().ranks().len()
                ),
            )
        })?;
        let d = PyDict::new(py);
        let c = rp.coords();
        d.set_item("rank", c.rank)?;
        d.set_item("tp_rank", c.tp_rank)?;
        d.set_item("pp_rank", c.pp_rank)?;
        d.set_item("dp_rank", c.dp_rank)?;
        d.set_item("ep_rank", c.ep_rank)?;
        d.set_item("bytes", rp.bytes())?;
        d.set_item("read_bytes", rp.read_bytes())?;
        d.set_item("staging_bytes", rp.staging_bytes())?;
        d.set_item("arena_bytes", rp.arena_bytes())?;
        d.set_item("tensors", tensor_table(py, rp.tensors(), false)?)?;
        Ok(d)
    }

    /// Loads one rank into a fresh arena, reading its own slices.
    #[pyo3(signature = (rank, io="auto", threads=None, progress=None, node_ranks=None))]
    fn load(
        &self,
        py: Python<'_>,
        rank: usize,
        io: &str,
        threads: Option<usize>,
        progress: Option<&Bound<'_, PyAny>>,
        node_ranks: Option<Vec<usize>>,
    ) -> PyResult<NativeRank> {
        let control = Arc::new(LoadControl::default());
        let opts = load_options(py, io, threads, &control)?.with_node_spans(
            self.job.plan(),
            &node_ranks.unwrap_or_default(),
            rank,
        );
        let job = Arc::clone(&self.job);
        let loaded = run_interruptible(py, &control, progress, move || job.load_rank(rank, &opts))?;
        Ok(NativeRank::loaded(rank, loaded))
    }

    /// Loads one rank into caller memory: `out`, a writable, contiguous CPU tensor or array
    /// (taken through DLPack and checked here), kept alive while any view exists; the rank's
    /// tensors are views of that memory.
    #[pyo3(signature = (rank, out, io="auto", threads=None, progress=None, node_ranks=None))]
    #[allow(clippy::too_many_arguments)]
    fn load_into(
        &self,
        py: Python<'_>,
        rank: usize,
        out: &Bound<'_, PyAny>,
        io: &str,
        threads: Option<usize>,
        progress: Option<&Bound<'_, PyAny>>,
        node_ranks: Option<Vec<usize>>,
    ) -> PyResult<NativeRank> {
        let mut mem = caller::CallerMemory::take(py, out, "out", None).map_err(|e| to_py(py, e))?;
        let (keep, address) = (mem.keep(py), mem.ptr());
        let control = Arc::new(LoadControl::default());
        let opts = load_options(py, io, threads, &control)?.with_node_spans(
            self.job.plan(),
            &node_ranks.unwrap_or_default(),
            rank,
        );
        let job = Arc::clone(&self.job);
        let loaded = run_interruptible(py, &control, progress, move || {
            // SAFETY: the one buffer of this load; `Plan.load` documents that Python code
            // leaves it alone until the load returns.
            let bytes = unsafe { mem.bytes_mut() };
            // Finished (vLLM names: transposes, buffers, re-ties) as Job::load_rank does.
            job.load_rank_into_buffer(rank, &opts, bytes)
        })?;
        let used = self
            .job
            .plan()
            .ranks()
            .get(rank)
            .map_or(0, |rp| rp.arena_bytes()) as usize;
        // SAFETY: the first `used` bytes (the load checked they fit) of memory the capsule
        // `keep` holds alive and in place.
        let owner = unsafe { dlpack::Owner::from_external(address, used, keep) };
        let mut native = NativeRank::local(rank, loaded.tensors, owner, &loaded.stats);
        native.aliases = loaded.aliases;
        Ok(native)
    }

    /// Loads one rank with the tensors in `into` (`(name, buffer)`: writable, contiguous CPU
    /// tensors or arrays of exactly the tensor's bytes, taken through DLPack and checked
    /// here) written straight into those buffers; the returned rank holds the other tensors
    /// in a fresh arena.
    #[pyo3(signature = (rank, into, io="auto", threads=None, progress=None, node_ranks=None))]
    #[allow(clippy::too_many_arguments)]
    fn load_scattered(
        &self,
        py: Python<'_>,
        rank: usize,
        into: Vec<(String, Bound<'_, PyAny>)>,
        io: &str,
        threads: Option<usize>,
        progress: Option<&Bound<'_, PyAny>>,
        node_ranks: Option<Vec<usize>>,
    ) -> PyResult<NativeRank> {
        let mut bufs = caller::take_all(py, &into).map_err(|e| to_py(py, e))?;
        let control = Arc::new(LoadControl::default());
        let opts = load_options(py, io, threads, &control)?.with_node_spans(
            self.job.plan(),
            &node_ranks.unwrap_or_default(),
            rank,
        );
        let job = Arc::clone(&self.job);
        let loaded = run_interruptible(py, &control, progress, move || {
            let mut slices = caller::slices(&mut bufs);
            job.load_rank_scattered(rank, &opts, &mut slices)
        })?;
        Ok(NativeRank::loaded(rank, loaded))
    }

    /// Loads this process's rank of a distributed job under a share mode, moving bytes
    /// through `comm` (a `safeshard._dist.TorchComm`, or any object with its methods).
    /// `share=None`: the default for the job's node count (`safeshard::dist::choose_share`,
    /// nodes named by `SAFESHARD_NODE`, else the host name), reported in `stats()`.
    #[pyo3(signature = (comm, share=None, io="auto", threads=None, per_node=false, round_bytes=1073741824, progress=None, timeout=600.0))]
    #[allow(clippy::too_many_arguments)]
    fn load_shared(
        &self,
        py: Python<'_>,
        comm: Bound<'_, PyAny>,
        share: Option<&str>,
        io: &str,
        threads: Option<usize>,
        per_node: bool,
        round_bytes: u64,
        progress: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<NativeRank> {
        let mode: Option<ShareMode> = share
            .map(str::parse)
            .transpose()
            .map_err(|e| to_py(py, e))?;
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(to_py(
                    py,
                    Error::invalid_argument(
                        "timeout",
                        format!("{t}: expected a positive number of seconds, or None"),
                    ),
                ))
            }
        };
        let node = std::env::var("SAFESHARD_NODE").ok();
        let control = Arc::new(LoadControl::default());
        let load = load_options(py, io, threads, &control)?;
        let world = comm::PyComm::new(py, comm.unbind())?;
        let rank = world.rank();
        let mut opts = ShareOptions {
            mode: mode.unwrap_or_default(),
            per_node,
            node: node.clone(),
            round_bytes: round_bytes.max(1),
            timeout,
            load,
            ..ShareOptions::default()
        };
        let job = Arc::clone(&self.job);
        let (loaded, traffic, share_why) = run_interruptible(py, &control, progress, move || {
            // Every rank counts the nodes, given a mode or not, so that ranks whose options
            // differ run the same collectives up to the agreement that names the difference.
            world.set_timeout(opts.timeout);
            let why = choose_share(&world, node.as_deref())?.apply(mode, &mut opts);
            let (mut loaded, traffic) =
                load_shared_with(&SharedPlan::new(job.plan()), &world, &opts)?;
            // vLLM names' transposes, buffers and re-ties, as Job::load_shared.
            job.finish(&mut loaded)?;
            Ok((loaded, traffic, why.map(|w| (opts.mode, w))))
        })?;
        let mut native = NativeRank::loaded(rank, loaded);
        native.sent_bytes = traffic.sent_bytes;
        native.received_bytes = traffic.received_bytes;
        native.share = share_why
            .as_ref()
            .map_or_else(|| mode.unwrap_or_default(), |(m, _)| *m)
            .to_string();
        native.share_default = share_why.map(|(_, w)| w);
        Ok(native)
    }
}

/// `(name, dtype, shape, nbytes)` rows, with the arena offset first when `offsets`.
fn tensor_table<'py>(
    py: Python<'py>,
    tensors: &[TensorPlan],
    offsets: bool,
) -> PyResult<Bound<'py, PyList>> {
    let rows = PyList::empty(py);
    for t in tensors {
        let shape = PyTuple::new(py, &t.shape)?;
        let row = if offsets {
            PyTuple::new(
                py,
                [
                    t.name.clone().into_pyobject(py)?.into_any(),
                    t.dtype.name().into_pyobject(py)?.into_any(),
                    shape.into_any(),
                    t.bytes.into_pyobject(py)?.into_any(),
                    t.offset.into_pyobject(py)?.into_any(),
                ],
            )?
        } else {
            PyTuple::new(
                py,
                [
                    t.name.clone().into_pyobject(py)?.into_any(),
                    t.dtype.name().into_pyobject(py)?.into_any(),
                    shape.into_any(),
                    t.bytes.into_pyobject(py)?.into_any(),
                ],
            )?
        };
        rows.append(row)?;
    }
    Ok(rows)
}

/// One loaded rank: the arena and its tensor table.
#[pyclass(frozen, module = "safeshard._safeshard")]
struct NativeRank {
    rank: usize,
    tensors: Vec<TensorPlan>,
    /// (name, holder) of tensors left out because `holder` holds their values.
    aliases: Vec<(String, String)>,
    arena: Arc<dlpack::Owner>,
    read_bytes: u64,
    sent_bytes: u64,
    received_bytes: u64,
    seconds: f64,
    threads: usize,
    paths: safeshard::load::IoPaths,
    /// The share mode it loaded with, and why when it was the default.
    share: String,
    share_default: Option<String>,
}

impl NativeRank {
    /// A rank loaded by this process alone (nothing sent or received).
    fn local(
        rank: usize,
        tensors: Vec<TensorPlan>,
        arena: Arc<dlpack::Owner>,
        stats: &safeshard::LoadStats,
    ) -> NativeRank {
        NativeRank {
            rank,
            tensors,
            aliases: Vec::new(),
            arena,
            read_bytes: stats.read_bytes,
            sent_bytes: 0,
            received_bytes: 0,
            seconds: stats.seconds,
            threads: stats.threads,
            paths: stats.paths,
            share: ShareMode::None.to_string(),
            share_default: None,
        }
    }

    /// A rank loaded into its own arena, which the result owns: the tensors it holds (not
    /// those loaded into caller buffers or left out as aliases).
    fn loaded(rank: usize, loaded: RankTensors) -> NativeRank {
        let stats = *loaded.stats();
        let aliases = loaded.aliases().to_vec();
        let held: HashSet<String> = loaded.iter().map(|t| t.name.to_string()).collect();
        let (arena, tensors) = loaded.into_parts();
        let tensors = tensors
            .into_iter()
            .filter(|t| held.contains(&t.name))
            .collect();
        let mut native = NativeRank::local(rank, tensors, dlpack::Owner::from_arena(arena), &stats);
        native.aliases = aliases;
        native
    }
}

#[pymethods]
impl NativeRank {
    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    /// `(name, dtype, shape, nbytes, offset)` per tensor, in arena order.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        tensor_table(py, &self.tensors, true)
    }

    /// `(name, holder)` of the plan's tensors the rank leaves out because `holder` holds
    /// their values (vLLM's re-tied embeddings).
    #[getter]
    fn aliases(&self) -> Vec<(String, String)> {
        self.aliases.clone()
    }

    /// The arena, exportable once or more through DLPack (each export shares the bytes).
    fn arena(&self) -> dlpack::NativeArena {
        dlpack::NativeArena::new(Arc::clone(&self.arena))
    }

    /// Load statistics as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("rank", self.rank)?;
        d.set_item("tensors", self.tensors.len())?;
        d.set_item("bytes", self.tensors.iter().map(|t| t.bytes).sum::<u64>())?;
        d.set_item("arena_bytes", self.arena.len())?;
        d.set_item("read_bytes", self.read_bytes)?;
        d.set_item("sent_bytes", self.sent_bytes)?;
        d.set_item("received_bytes", self.received_bytes)?;
        d.set_item("seconds", self.seconds)?;
        // What the engine chose (as `safeshard load --json` says it).
        d.set_item("io_chosen", self.paths.main())?;
        let io = PyDict::new(py);
        io.set_item("pread", self.paths.pread)?;
        io.set_item("prefetched", self.paths.prefetched)?;
        io.set_item("mmap", self.paths.mapped)?;
        io.set_item("direct", self.paths.direct)?;
        d.set_item("io_bytes", io)?;
        d.set_item("threads", self.threads)?;
        d.set_item("share", &self.share)?;
        d.set_item("share_default", &self.share_default)?;
        Ok(d)
    }

    /// SHA-256 (hex) of the whole arena, as `safeshard load --digest` prints it.
    fn digest(&self, py: Python<'_>) -> String {
        let owner = Arc::clone(&self.arena);
        py.detach(move || safeshard::load::digest_hex(owner.bytes()))
    }
}

/// Runs the `safeshard` command line with `argv` (`argv[0]` is the program name) and returns
/// its exit status: the library's CLI ([`safeshard::cli::main_from`]), so the console script
/// is exactly the Rust command (same flags, messages and exit codes) without a second binary
/// next to the extension.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(move || safeshard::cli::main_from(argv))
}

/// Checks a share mode name (`none`, `broadcast`, `read-once`) the way the library parses it.
#[pyfunction]
fn check_share(py: Python<'_>, share: &str) -> PyResult<()> {
    share
        .parse::<ShareMode>()
        .map(|_| ())
        .map_err(|e| to_py(py, e))
}

/// What a launcher says about this process (`safeshard::comm::launch::detect_env`):
/// `(launcher, rank, size, local_rank)`, or `None` when no launcher's rank variable is set.
#[pyfunction]
fn launch_env(py: Python<'_>) -> PyResult<Option<(&'static str, usize, usize, usize)>> {
    let got = safeshard::comm::launch::detect_env().map_err(|e| to_py(py, e))?;
    Ok(got.map(|l| (l.launcher.name(), l.rank, l.size, l.local_rank)))
}

/// Every launcher's `(name, rank variable, size variable, local rank variable)`, in the order
/// detection checks them.
#[pyfunction]
fn launcher_variables() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    safeshard::comm::launch::Launcher::ALL
        .iter()
        .map(|l| {
            let (r, s, lr) = l.variables();
            (l.name(), r, s, lr)
        })
        .collect()
}

/// Writes a synthetic checkpoint of a named preset into `dir` (tests, examples, benchmarks).
#[pyfunction]
#[pyo3(signature = (dir, preset, *, sparse=false, layers=None, seed=0))]
fn synth(
    py: Python<'_>,
    dir: std::path::PathBuf,
    preset: &str,
    sparse: bool,
    layers: Option<u64>,
    seed: u64,
) -> PyResult<usize> {
    let preset = preset.to_string();
    py.detach(move || {
        let mut opts = safeshard::synth::SynthOptions::preset(&preset)?
            .with_sparse(sparse)
            .with_seed(seed);
        if let Some(l) = layers {
            opts = opts.with_layers(l);
        }
        safeshard::synth::write_checkpoint(&dir, &opts)
    })
    .map_err(|e| to_py(py, e))
}

/// Rank arenas alive in this process (each freed when its last view is gone).
#[pyfunction]
fn live_arenas() -> usize {
    dlpack::live()
}

/// The names [`synth`] accepts.
#[pyfunction]
fn synth_presets() -> Vec<&'static str> {
    safeshard::synth::PRESETS.to_vec()
}

pub(crate) const CAPSULE_NAME: &CStr = c"dltensor";

pub(crate) fn dangling() -> *mut c_void {
    NonNull::<u64>::dangling().as_ptr().cast()
}

#[pymodule]
fn _safeshard(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SafeshardError", m.py().get_type::<SafeshardError>())?;
    m.add_class::<NativePlan>()?;
    m.add_class::<NativeRank>()?;
    m.add_class::<dlpack::NativeArena>()?;
    slices::register(m)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(error, m)?)?;
    m.add_function(wrap_pyfunction!(check_share, m)?)?;
    m.add_function(wrap_pyfunction!(launch_env, m)?)?;
    m.add_function(wrap_pyfunction!(launcher_variables, m)?)?;
    m.add_function(wrap_pyfunction!(synth, m)?)?;
    m.add_function(wrap_pyfunction!(synth_presets, m)?)?;
    m.add_function(wrap_pyfunction!(live_arenas, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
