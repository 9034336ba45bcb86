//! NCCL communicator through cudarc (feature `nccl`), loaded at run time.
//!
//! cudarc panics when it cannot load `libcuda`/`libnccl`, so [`nccl_available`] checks both
//! first and returns [`Error::Comm`]. cudarc searches `libnccl.so`, `libnccl.so.12`, ... but
//! not `libnccl.so.2`, the only name pip's `nvidia-nccl-cu12` ships; when that one is
//! loadable the error says where it is and how to expose it (`launch/mpirun.sh` does it:
//! a directory holding a `libnccl.so` symlink, prepended to `LD_LIBRARY_PATH`).
//!
//! [`NcclComm`] is bootstrapped from a host [`Communicator`] (rank 0's NCCL unique id is
//! broadcast over it). Collectives on device buffers ([`NcclComm::broadcast_device`]) are
//! the point of NCCL; the [`Communicator`] methods on host bytes stage broadcasts through
//! the device and delegate the small control collectives to the host communicator.
//!
//! Untested here (no GPU in CI): it compiles against cudarc 0.19 with dynamic loading.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id};

use super::Communicator;
use crate::{Error, Result};

fn dl_loadable(name: &str) -> Option<String> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlopen/dlsym/dladdr with valid C strings; the handle is closed again.
    unsafe {
        let h = libc::dlopen(cname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            return None;
        }
        let mut where_ = name.to_string();
        let sym = libc::dlsym(h, c"ncclGetVersion".as_ptr());
        if !sym.is_null() {
            let mut info: libc::Dl_info = std::mem::zeroed();
            if libc::dladdr(sym, &mut info) != 0 && !info.dli_fname.is_null() {
                where_ = std::ffi::CStr::from_ptr(info.dli_fname)
                    .to_string_lossy()
                    .into_owned();
            }
        }
        libc::dlclose(h);
        Some(where_)
    }
}

/// Checks that the CUDA driver library and NCCL can be loaded, so that cudarc will not panic.
pub fn nccl_available() -> Result<()> {
    // SAFETY: only tries to dlopen candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::comm(
            "NCCL",
            "needs the CUDA driver library (libcuda.so), which cannot be loaded: no GPU driver \
             on this node? Share over MPI instead",
        ));
    }
    // SAFETY: as above.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    match dl_loadable("libnccl.so.2") {
        Some(path) => Err(Error::comm(
            "NCCL",
            format!(
                "found {path} (pip's NCCL name) but cudarc only loads libnccl.so: run \
             `mkdir -p ~/.safeshard-nccl && ln -sf {path} ~/.safeshard-nccl/libnccl.so` and \
             prepend ~/.safeshard-nccl to LD_LIBRARY_PATH (launch/mpirun.sh does this)"
            ),
        )),
        None => Err(Error::comm(
            "NCCL",
            "libnccl.so or libnccl.so.2 cannot be loaded: install it (e.g. `pip install \
             nvidia-nccl-cu12`) and add its lib directory to LD_LIBRARY_PATH",
        )),
    }
}

fn cu(e: impl std::fmt::Debug) -> Error {
    Error::comm("CUDA/NCCL", format!("{e:?}"))
}

/// An NCCL communicator on one GPU, with the host communicator it was made from.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    host: Box<dyn Communicator>,
    device: usize,
}

impl NcclComm {
    /// Creates the NCCL communicator of the ranks of `host` on GPU `device` (usually the
    /// launcher's local rank). Collective on `host`.
    pub fn new(host: Box<dyn Communicator>, device: usize) -> Result<Self> {
        let ok = nccl_available();
        let ok = super::agree(host.as_ref(), ok);
        ok?;
        let ctx = super::agree(host.as_ref(), CudaContext::new(device).map_err(cu))?;
        let stream = ctx.default_stream();
        let mut id = [0u8; 128];
        if host.rank() == 0 {
            let fresh = super::agree(host.as_ref(), Id::new().map_err(cu))?;
            for (d, s) in id.iter_mut().zip(fresh.internal()) {
                *d = *s as u8;
            }
        } else {
            super::agree(host.as_ref(), Ok(()))?;
        }
        host.broadcast(0, &mut id)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            host.rank(),
            host.size(),
            Id::uninit(internal),
        )
        .map_err(cu)?;
        Ok(NcclComm {
            comm,
            stream,
            host,
            device,
        })
    }

    /// The CUDA stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Broadcasts a device buffer from `root` (in place) and waits for it.
    pub fn broadcast_device(&self, root: usize, buf: &mut CudaSlice<u8>) -> Result<()> {
        let root =
            i32::try_from(root).map_err(|_| Error::comm("NCCL broadcast", "root too large"))?;
        self.comm.broadcast_in_place(buf, root).map_err(cu)?;
        self.stream.synchronize().map_err(cu)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        match self.host.split(color, key)? {
            Some(sub) => Ok(Some(Box::new(NcclComm::new(sub, self.device)?))),
            None => Ok(None),
        }
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(buf).map_err(cu)?;
        self.broadcast_device(root, &mut dev)?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(cu)?;
        self.stream.synchronize().map_err(cu)
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.host.all_gather(mine)
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.host.all_to_all_v(send)
    }
    fn all_to_all_packed(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.host
            .all_to_all_packed(send, send_counts, recv, recv_counts)
    }
    fn abort(&self, code: i32, msg: &str) {
        self.host.abort(code, msg)
    }
    fn set_timeout(&self, timeout: Option<std::time::Duration>) {
        // NCCL kernels run on the device and are not polled here: the timeout bounds the
        // host communicator's collectives (the agreement steps around every phase).
        self.host.set_timeout(timeout)
    }
    fn set_phase(&self, phase: &str) {
        self.host.set_phase(phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadComm;

    #[test]
    fn missing_libraries_are_errors_on_every_rank_not_panics() {
        // SAFETY: only probes with dlopen.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // A GPU machine: this test is about machines without one.
        }
        let e = nccl_available().unwrap_err().to_string();
        assert!(e.contains("libcuda.so"), "{e}");
        let out: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadComm::world(2)
                .into_iter()
                .map(|c| s.spawn(move || NcclComm::new(Box::new(c), 0).map(|_| ())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in out {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("libcuda.so"), "{e}");
        }
    }
}
