//! `load_state_dict`'s native half: a checkpoint opened for slice requests
//! ([`safeshard::SliceJob`]) and the collective load of one rank's requests
//! ([`safeshard::load_collective`]) into caller memory, over a torch.distributed group or
//! alone.
//!
//! Every failure this rank can have before the load (the caller's own checks of its state
//! dict, an unopenable checkpoint, bad options, buffers that are read-only, not contiguous
//! or overlapping) is handed to the library's first agreement rather than raised here, so
//! that every rank of the group fails together and none is left waiting.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use safeshard::comm::{Communicator, ThreadComm};
use safeshard::load::LoadControl;
use safeshard::plan::requests::DimRanges;
use safeshard::{
    load_collective, Error, IoMode, LoadOptions, ShareMode, ShareOptions, SliceJob, SliceRequest,
};

use crate::caller::{self, CallerMemory};
use crate::{comm, dlpack, run_interruptible, to_py, NativeRank};

/// A checkpoint's catalog (headers only), for planning slice requests.
#[pyclass(frozen, module = "safeshard._safeshard")]
pub(crate) struct NativeCheckpoint {
    job: Arc<SliceJob>,
}

#[pymethods]
impl NativeCheckpoint {
    /// Opens a `.safetensors` file, an index or a directory (the GIL is released meanwhile).
    #[new]
    fn new(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let job = py
            .detach(|| SliceJob::open(&path))
            .map_err(|e| to_py(py, e))?;
        Ok(NativeCheckpoint { job: Arc::new(job) })
    }

    /// `{name: (dtype, shape)}` of every tensor, in file order.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for t in self.job.checkpoint().tensors() {
            d.set_item(&t.name, (t.dtype.name(), PyTuple::new(py, &t.shape)?))?;
        }
        Ok(d)
    }

    /// The directory holding the checkpoint's files.
    #[getter]
    fn root(&self) -> String {
        self.job.checkpoint().root().display().to_string()
    }
}

/// One request as Python passes it: `(dest, source, ranges per dimension)`.
type PyRequest = (String, String, Vec<DimRanges>);

/// The options, or the first thing wrong with them.
fn share_options(
    share: &str,
    io: &str,
    threads: Option<usize>,
    timeout: f64,
    round_bytes: u64,
    control: &Arc<LoadControl>,
) -> safeshard::Result<ShareOptions> {
    let mode: ShareMode = share.parse()?;
    let io: IoMode = io.parse()?;
    if threads == Some(0) {
        return Err(Error::invalid_argument("threads", "must be at least 1"));
    }
    // Every collective's deadline, in seconds (infinite: none).
    let timeout = match timeout {
        s if s == f64::INFINITY => None,
        s if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        s => {
            return Err(Error::invalid_argument(
                "timeout",
                format!("{s} must be positive"),
            ))
        }
    };
    Ok(ShareOptions {
        mode,
        // Which ranks share a node: by SAFESHARD_NODE, else the host name.
        node: std::env::var("SAFESHARD_NODE").ok(),
        round_bytes,
        timeout,
        load: LoadOptions {
            io,
            threads,
            control: Some(Arc::clone(control)),
            ..LoadOptions::default()
        },
        ..ShareOptions::default()
    })
}

/// Loads this rank's `requests` together with the other ranks of `comm` (a
/// `safeshard._dist.TorchComm`; `None`: this process alone). Collective. The tensors named
/// in `into` go straight into those buffers; the returned rank holds the others. `precheck`:
/// this rank's own failure (every rank then raises; this one its own error).
#[pyfunction]
#[pyo3(signature = (checkpoint, comm, requests, into, precheck=None, share="none", io="auto", threads=None, timeout=600.0, round_bytes=1073741824))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_slices(
    py: Python<'_>,
    checkpoint: Option<PyRef<'_, NativeCheckpoint>>,
    comm: Option<Bound<'_, PyAny>>,
    requests: Vec<PyRequest>,
    into: Vec<(String, Bound<'_, PyAny>)>,
    precheck: Option<String>,
    share: &str,
    io: &str,
    threads: Option<usize>,
    timeout: f64,
    round_bytes: u64,
) -> PyResult<NativeRank> {
    let share_name = share.to_string();
    let control = Arc::new(LoadControl::default());
    let opts = share_options(share, io, threads, timeout, round_bytes, &control);
    let bufs = caller::take_all(py, &into);
    let job = checkpoint.map(|c| Arc::clone(&c.job));
    let world = comm
        .map(|c| comm::PyComm::new(py, c.unbind()))
        .transpose()?;
    let rank = world.as_ref().map_or(0, |w| w.rank());
    let requests: Vec<SliceRequest> = requests
        .into_iter()
        .map(|(dest, source, ranges)| SliceRequest {
            dest,
            source,
            ranges,
        })
        .collect();
    let (loaded, traffic) = run_interruptible(py, &control, None, move || {
        // This rank's state before the collective: its own failure, if any, goes first.
        let precheck = match precheck {
            Some(m) => Err(Error::plan(m)),
            None => Ok(()),
        };
        let defaults = ShareOptions::default();
        let (opts, opts_ok) = match opts {
            Ok(o) => (o, Ok(())),
            Err(e) => (defaults, Err(e)),
        };
        let (mut bufs, bufs_ok): (Vec<(String, CallerMemory)>, _) = match bufs {
            Ok(b) => (b, Ok(())),
            Err(e) => (Vec::new(), Err(e)),
        };
        let job = precheck.and(opts_ok).and(bufs_ok).and_then(|()| {
            job.as_deref()
                .ok_or_else(|| Error::plan("no checkpoint was opened"))
        });
        let mut slices = caller::slices(&mut bufs);
        match &world {
            Some(w) => load_collective(job, w, &requests, &opts, &mut slices),
            None => {
                let solo = ThreadComm::world(1);
                let w: &dyn Communicator = solo
                    .first()
                    .ok_or_else(|| Error::comm("threads", "no communicator for one rank"))?;
                load_collective(job, w, &requests, &opts, &mut slices)
            }
        }
    })?;
    let stats = *loaded.stats();
    // The tensors left in the arena (those of `into` are in the caller's memory).
    let held: HashSet<String> = loaded.iter().map(|t| t.name.to_string()).collect();
    let (arena, tensors) = loaded.into_parts();
    let tensors = tensors
        .into_iter()
        .filter(|t| held.contains(&t.name))
        .collect();
    Ok(NativeRank {
        rank,
        tensors,
        arena: dlpack::Owner::from_arena(arena),
        read_bytes: stats.read_bytes,
        sent_bytes: traffic.sent_bytes,
        received_bytes: traffic.received_bytes,
        seconds: stats.seconds,
        threads: stats.threads,
        paths: stats.paths,
        share: share_name,
        share_default: None,
        // Slice requests use checkpoint names: nothing is re-tied.
        aliases: Vec::new(),
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeCheckpoint>()?;
    m.add_function(wrap_pyfunction!(load_slices, m)?)?;
    Ok(())
}
