//! A [`Communicator`] that calls back into a Python object (`safeshard._dist.TorchComm`,
//! which runs torch.distributed collectives on a `ProcessGroup`).
//!
//! The load runs on a thread without the GIL; each collective takes the GIL, hands Python
//! memoryviews of the Rust buffers (no copy) and releases them when the call returns, so no
//! Python object can keep pointing into Rust memory afterwards (a view still exported then is
//! an error, not a dangling pointer).

use std::os::raw::c_char;
use std::time::Duration;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use safeshard::comm::{exchange_through_packed, Communicator};
use safeshard::{Error, Result};

/// A communicator backed by a Python object with the methods `rank()`, `size()`,
/// `split(color, key)`, `barrier()`, `broadcast(root, view)`, `all_gather(bytes)`,
/// `all_to_all_v(list[bytes])`, `all_to_all_packed(send, send_counts, recv, recv_counts)`
/// and, where its attribute `direct_exchange` is true, `exchange(sends, recvs)` (lists of
/// `(peer, view)`: point-to-point messages straight from and into Rust memory).
pub(crate) struct PyComm {
    obj: Py<PyAny>,
    rank: usize,
    size: usize,
    direct_exchange: bool,
}

fn comm_err(what: &str, e: PyErr) -> Error {
    Python::attach(|py| {
        let msg = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
        // A collective past the deadline (`safeshard._dist.CollectiveTimeout`): the phase and
        // the ranks that did not arrive, typed.
        let timeout = py
            .import("safeshard._dist")
            .and_then(|m| m.getattr("CollectiveTimeout"))
            .is_ok_and(|cls| e.value(py).is_instance(&cls).unwrap_or(false));
        if timeout {
            let v = e.value(py);
            let field = |name: &str| v.getattr(name).ok();
            if let (Some(rank), Some(phase), Some(after), Some(missing)) = (
                field("rank").and_then(|x| x.extract::<usize>().ok()),
                field("phase").and_then(|x| x.extract::<String>().ok()),
                field("after").and_then(|x| x.extract::<f64>().ok()),
                field("missing").and_then(|x| x.extract::<Vec<usize>>().ok()),
            ) {
                return Error::Timeout {
                    rank,
                    phase,
                    after: Duration::try_from_secs_f64(after).unwrap_or_default(),
                    missing: Some(missing),
                    silent: None,
                    stopped_for: None,
                };
            }
        }
        Error::comm(
            format!("torch.distributed {what}"),
            format!(
                "{}: {}",
                e.get_type(py)
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                msg.lines().next().unwrap_or("")
            ),
        )
    })
}

/// A memoryview over Rust memory, valid only until [`release`] is called on it.
fn view<'py>(
    py: Python<'py>,
    ptr: *mut u8,
    len: usize,
    writable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let len = isize::try_from(len)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("buffer too large"))?;
    // CPython's PyBUF_WRITE / PyBUF_READ (memoryobject.h), not exported by pyo3-ffi.
    let flags = if writable { 0x200 } else { 0x100 };
    // An empty slice may have a dangling pointer; memoryview never reads it.
    // SAFETY: ptr/len describe a live buffer that outlives the view (released below).
    let mv = unsafe { ffi::PyMemoryView_FromMemory(ptr.cast::<c_char>(), len, flags) };
    // SAFETY: a new reference or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, mv) }
}

/// Ends a memoryview's access to Rust memory; fails if Python still holds an export of it.
fn release(mv: &Bound<'_, PyAny>) -> PyResult<()> {
    mv.call_method0("release").map(|_| ())
}

impl PyComm {
    pub(crate) fn new(py: Python<'_>, obj: Py<PyAny>) -> PyResult<PyComm> {
        let rank = obj.call_method0(py, "rank")?.extract(py)?;
        let size = obj.call_method0(py, "size")?.extract(py)?;
        let direct_exchange = obj
            .getattr(py, "direct_exchange")
            .and_then(|v| v.extract::<bool>(py))
            .unwrap_or(false);
        Ok(PyComm {
            obj,
            rank,
            size,
            direct_exchange,
        })
    }

    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<T>,
    ) -> Result<T> {
        Python::attach(|py| f(py, self.obj.bind(py))).map_err(|e| comm_err(what, e))
    }
}

impl Communicator for PyComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        let sub = self.call("split", |py, o| {
            let r = o.call_method1("split", (color, key))?;
            if r.is_none() {
                Ok(None)
            } else {
                PyComm::new(py, r.unbind()).map(Some)
            }
        })?;
        Ok(sub.map(|c| Box::new(c) as Box<dyn Communicator>))
    }

    fn barrier(&self) -> Result<()> {
        self.call("barrier", |_, o| o.call_method0("barrier").map(|_| ()))
    }

    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
        self.call("broadcast", |py, o| {
            let mv = view(py, buf.as_mut_ptr(), buf.len(), true)?;
            let r = o.call_method1("broadcast", (root, &mv));
            let released = release(&mv);
            r?;
            released
        })
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let got = self.call("all_gather", |py, o| {
            let r = o.call_method1("all_gather", (PyBytes::new(py, mine),))?;
            r.extract::<Vec<Vec<u8>>>()
        })?;
        if got.len() != self.size {
            return Err(Error::comm(
                "torch.distributed all_gather",
                format!("{} parts for {} ranks", got.len(), self.size),
            ));
        }
        Ok(got)
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let got = self.call("all_to_all_v", |py, o| {
            let parts = PyList::empty(py);
            for s in &send {
                parts.append(PyBytes::new(py, s))?;
            }
            o.call_method1("all_to_all_v", (parts,))?
                .extract::<Vec<Vec<u8>>>()
        })?;
        if got.len() != self.size {
            return Err(Error::comm(
                "torch.distributed all_to_all_v",
                format!("{} parts for {} ranks", got.len(), self.size),
            ));
        }
        Ok(got)
    }

    fn all_to_all_packed(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        if send_counts.iter().sum::<usize>() != send.len()
            || recv_counts.iter().sum::<usize>() != recv.len()
        {
            return Err(Error::comm(
                "all_to_all_packed",
                "counts do not add up to the buffers",
            ));
        }
        self.call("all_to_all", |py, o| {
            // The send view is read-only for Python; torch reads it as the input.
            let s = view(py, send.as_ptr().cast_mut(), send.len(), false)?;
            let r = match view(py, recv.as_mut_ptr(), recv.len(), true) {
                Ok(r) => r,
                Err(e) => {
                    let _ = release(&s);
                    return Err(e);
                }
            };
            let res = o.call_method1(
                "all_to_all_packed",
                (&s, send_counts.to_vec(), &r, recv_counts.to_vec()),
            );
            let rel_s = release(&s);
            let rel_r = release(&r);
            res?;
            rel_s?;
            rel_r
        })
    }

    fn exchange(&self, sends: &[(usize, &[u8])], recvs: &mut [(usize, &mut [u8])]) -> Result<()> {
        if !self.direct_exchange {
            // NCCL moves bytes through device tensors: one packed all-to-all.
            return exchange_through_packed(self, sends, recvs);
        }
        self.call("exchange", |py, o| {
            let mut views = Vec::with_capacity(sends.len() + recvs.len());
            let made = (|| {
                let out = PyList::empty(py);
                for (peer, b) in sends {
                    let v = view(py, b.as_ptr().cast_mut(), b.len(), false)?;
                    out.append((*peer, &v))?;
                    views.push(v);
                }
                let into = PyList::empty(py);
                for (peer, b) in recvs.iter_mut() {
                    let v = view(py, b.as_mut_ptr(), b.len(), true)?;
                    into.append((*peer, &v))?;
                    views.push(v);
                }
                Ok::<_, PyErr>((out, into))
            })();
            let res = made.and_then(|(out, into)| o.call_method1("exchange", (out, into)));
            // Every view is released, whatever happened; the first failure is reported.
            let released = views.iter().map(release).fold(Ok(()), PyResult::and);
            res?;
            released
        })
    }

    fn set_timeout(&self, timeout: Option<Duration>) {
        // torch.distributed's own timeouts bound each collective; the Python side passes
        // this one to the groups it creates (best effort: no error path here).
        let secs = timeout.map(|t| t.as_secs_f64());
        let _ = self.call("set_timeout", |_, o| {
            o.call_method1("set_timeout", (secs,)).map(|_| ())
        });
    }

    fn set_phase(&self, phase: &str) {
        let _ = self.call("set_phase", |_, o| {
            o.call_method1("set_phase", (phase,)).map(|_| ())
        });
    }

    fn abort(&self, code: i32, msg: &str) {
        let _ = self.call("abort", |_, o| {
            o.call_method1("abort", (code, msg)).map(|_| ())
        });
    }
}
