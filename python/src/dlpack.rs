//! The arena of a loaded rank and its DLPack export (legacy `dltensor` capsules, DLPack 0.8
//! layout, which torch and numpy both consume).
//!
//! The arena is exported as a one-dimensional `uint8` CPU tensor; Python slices and
//! reinterprets it per tensor. Each capsule owns an `Arc` of the arena, released by the
//! DLPack deleter (when the consumer's last view dies) or by the capsule destructor (when the
//! capsule was never consumed). Neither touches Python objects, so they may run without the
//! GIL on any thread.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use safeshard::load::Arena;

use crate::{dangling, CAPSULE_NAME};

/// The bytes of one loaded rank. Python may write through exported views, so the bytes are
/// only ever reached through the raw pointer taken once at construction.
pub(crate) struct Owner {
    /// Held only to keep the memory behind `ptr` alive (and finally free it).
    _storage: Storage,
    ptr: *mut u8,
    len: usize,
}

/// Whose memory the bytes are.
enum Storage {
    /// The rank's own arena.
    Arena(#[allow(dead_code)] Arena),
    /// A caller's buffer (`Plan.load(out=...)`): the Python object exporting it, kept alive
    /// while any view exists (dropped without the GIL, pyo3 defers the decref).
    External(#[allow(dead_code)] Py<PyAny>),
}

// SAFETY: the arena is owned memory (an anonymous mapping) that never moves;
// the pointer is only dereferenced while an `Arc<Owner>` keeps it alive.
unsafe impl Send for Owner {}
// SAFETY: as above; shared access only reads (see `bytes`).
unsafe impl Sync for Owner {}

/// Arenas alive in this process (tests check that dropping every view frees them).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Number of rank arenas alive in this process.
pub(crate) fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

impl Drop for Owner {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Owner {
    pub(crate) fn from_arena(mut arena: Arena) -> Arc<Owner> {
        let (ptr, len) = (arena.as_mut_ptr(), arena.len());
        LIVE.fetch_add(1, Ordering::Relaxed);
        Arc::new(Owner {
            _storage: Storage::Arena(arena),
            ptr,
            len,
        })
    }

    /// The first `len` bytes at `ptr`, memory of the Python object `keep` (a writable,
    /// C-contiguous buffer checked by the caller), which lives as long as the owner.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay valid and not move while `keep` is alive.
    pub(crate) unsafe fn from_external(ptr: *mut u8, len: usize, keep: Py<PyAny>) -> Arc<Owner> {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Arc::new(Owner {
            _storage: Storage::External(keep),
            ptr,
            len,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The bytes, for hashing. Python code writing to a view at the same time would race
    /// with this read; the digest is documented as a read of the loaded state.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len describe the live storage owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DLDevice {
    pub(crate) device_type: i32,
    pub(crate) device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DLDataType {
    pub(crate) code: u8,
    pub(crate) bits: u8,
    pub(crate) lanes: u16,
}

/// DLPack's tensor description (shared by the export here and the import in `caller.rs`).
#[repr(C)]
pub(crate) struct DLTensor {
    pub(crate) data: *mut c_void,
    pub(crate) device: DLDevice,
    pub(crate) ndim: i32,
    pub(crate) dtype: DLDataType,
    pub(crate) shape: *mut i64,
    pub(crate) strides: *mut i64,
    pub(crate) byte_offset: u64,
}

#[repr(C)]
pub(crate) struct DLManagedTensor {
    pub(crate) dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// One export: the managed tensor first (so a pointer to it is a pointer to this), then what
/// it points to and what keeps the bytes alive.
#[repr(C)]
struct Export {
    managed: DLManagedTensor,
    shape: i64,
    owner: Arc<Owner>,
}

const KDL_CPU: i32 = 1;
const KDL_UINT: u8 = 1;

unsafe extern "C" fn export_deleter(m: *mut DLManagedTensor) {
    if !m.is_null() {
        // SAFETY: every DLManagedTensor we hand out is the first field of a boxed Export.
        drop(unsafe { Box::from_raw(m.cast::<Export>()) });
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule to `used_dltensor` and owns the tensor from then on;
    // only an unconsumed capsule still owns it.
    // SAFETY: called by Python with a live capsule.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr());
            export_deleter(m.cast());
        } else {
            ffi::PyErr_Clear();
        }
    }
}

/// A rank's arena as a DLPack producer (`torch.from_dlpack`, `numpy.from_dlpack`).
#[pyclass(frozen, module = "safeshard._safeshard")]
pub(crate) struct NativeArena {
    owner: Arc<Owner>,
}

impl NativeArena {
    pub(crate) fn new(owner: Arc<Owner>) -> Self {
        NativeArena { owner }
    }
}

#[pymethods]
impl NativeArena {
    /// A `dltensor` capsule of the whole arena as a 1-D uint8 CPU tensor. The keyword
    /// arguments of newer consumers are accepted; a copy is never made.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<Bound<'_, PyAny>>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = (stream, max_version);
        if let Some((t, _)) = dl_device {
            if t != KDL_CPU {
                return Err(PyBufferError::new_err(
                    "safeshard arenas live in CPU memory; copy them with torch to a device",
                ));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "safeshard arenas are exported without copying (copy=True is not supported)",
            ));
        }
        let len = i64::try_from(self.owner.len)
            .map_err(|_| PyBufferError::new_err("arena larger than 2^63 bytes"))?;
        let data = if self.owner.len == 0 {
            dangling()
        } else {
            self.owner.ptr.cast()
        };
        let export = Box::new(Export {
            managed: DLManagedTensor {
                dl_tensor: DLTensor {
                    data,
                    device: DLDevice {
                        device_type: KDL_CPU,
                        device_id: 0,
                    },
                    ndim: 1,
                    dtype: DLDataType {
                        code: KDL_UINT,
                        bits: 8,
                        lanes: 1,
                    },
                    shape: std::ptr::null_mut(),
                    strides: std::ptr::null_mut(),
                    byte_offset: 0,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(export_deleter),
            },
            shape: len,
            owner: Arc::clone(&self.owner),
        });
        let raw = Box::into_raw(export);
        // SAFETY: raw is a valid, uniquely owned Export until the deleter runs.
        unsafe {
            (*raw).managed.dl_tensor.shape = std::ptr::addr_of_mut!((*raw).shape);
            (*raw).managed.manager_ctx = raw.cast();
        }
        // SAFETY: the capsule takes ownership of raw; its destructor frees it if unconsumed.
        let cap = unsafe {
            ffi::PyCapsule_New(raw.cast(), CAPSULE_NAME.as_ptr(), Some(capsule_destructor))
        };
        if cap.is_null() {
            // SAFETY: the capsule was not made, so we still own raw.
            unsafe { export_deleter(raw.cast()) };
            return Err(PyErr::fetch(py));
        }
        // SAFETY: cap is a new reference.
        Ok(unsafe { Bound::from_owned_ptr(py, cap) }.unbind())
    }

    /// `(kDLCPU, 0)`.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CPU, 0)
    }

    /// Bytes in the arena.
    #[getter]
    fn nbytes(&self) -> usize {
        self.owner.len
    }

    /// Address of the first byte (tests check that views share it).
    #[getter]
    fn address(&self) -> usize {
        self.owner.ptr as usize
    }

    /// Capsules and views currently keeping the bytes alive, plus this object and the rank.
    #[getter]
    fn refcount(&self) -> usize {
        Arc::strong_count(&self.owner)
    }
}
