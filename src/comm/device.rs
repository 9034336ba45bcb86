//! Device-aware loading (feature `cuda`): a rank's arena lands in GPU memory through two
//! pinned staging buffers, reused chunk after chunk, with asynchronous host-to-device copies
//! (the CPU fills one buffer while the GPU copies from the other).
//!
//! Untested in CI (no GPU there): it compiles against cudarc 0.19 with dynamic loading, and
//! [`DeviceUploader::new`] checks that the CUDA driver can be loaded before cudarc would panic.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, PinnedHostSlice,
};

use crate::{Error, Result};

fn cu(e: impl std::fmt::Debug) -> Error {
    Error::comm("CUDA", format!("{e:?}"))
}

/// Uploads host bytes to one GPU through reused pinned staging buffers.
pub struct DeviceUploader {
    stream: Arc<CudaStream>,
    staging: Vec<(PinnedHostSlice<u8>, Option<CudaEvent>)>,
    chunk: usize,
}

impl DeviceUploader {
    /// An uploader for GPU `ordinal` with two staging buffers of `chunk` bytes.
    pub fn new(ordinal: usize, chunk: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::comm(
                "CUDA",
                "the driver library (libcuda.so) cannot be loaded: no GPU driver here",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(cu)?;
        let stream = ctx.new_stream().map_err(cu)?;
        let chunk = chunk.max(1 << 20);
        let mut staging = Vec::new();
        for _ in 0..2 {
            // SAFETY: the buffer is written before any copy reads it. Not write-combined:
            // plain page-locked memory, filled by memcpy from the arena.
            let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(chunk, 0) }.map_err(cu)?;
            staging.push((buf, None));
        }
        Ok(DeviceUploader {
            stream,
            staging,
            chunk,
        })
    }

    /// The stream the copies run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `host` into a new device buffer and waits for the copy to finish.
    pub fn upload(&mut self, host: &[u8]) -> Result<CudaSlice<u8>> {
        let mut dst = self.stream.alloc_zeros::<u8>(host.len()).map_err(cu)?;
        let stream = self.stream.clone();
        {
            let (base, _sync) = dst.device_ptr_mut(&stream);
            for (i, piece) in host.chunks(self.chunk).enumerate() {
                let (buf, done) = self
                    .staging
                    .get_mut(i % 2)
                    .ok_or_else(|| Error::comm("CUDA upload", "staging buffer missing"))?;
                // Wait until the GPU has finished reading this buffer's previous chunk.
                if let Some(ev) = done.take() {
                    ev.synchronize().map_err(cu)?;
                }
                let pinned = buf.as_mut_slice().map_err(cu)?;
                let stage = pinned
                    .get_mut(..piece.len())
                    .ok_or_else(|| Error::comm("CUDA upload", "chunk larger than staging"))?;
                stage.copy_from_slice(piece);
                let offset = (i * self.chunk) as u64;
                // SAFETY: `dst` has room for `host.len()` bytes from `base`; `stage` stays
                // alive and untouched until the event recorded below completes.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        base + offset,
                        stage,
                        stream.cu_stream(),
                    )
                }
                .map_err(cu)?;
                *done = Some(stream.record_event(None).map_err(cu)?);
            }
        }
        stream.synchronize().map_err(cu)?;
        Ok(dst)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // SAFETY: only probes with dlopen.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // A GPU machine: this test is about machines without one.
        }
        let e = super::DeviceUploader::new(0, 1 << 20)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("libcuda.so")));
    }
}
