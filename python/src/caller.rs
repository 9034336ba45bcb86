//! Caller memory taken through DLPack: a CPU `torch.Tensor`, a `numpy.ndarray` or anything
//! else that exports DLPack (`Plan.load(out=...)`, `Plan.load(into=...)`,
//! `load_state_dict`).
//!
//! Rust checks the memory itself from the producer's own description: the device (CPU or
//! pinned host memory), the layout (row-major contiguous), the size (shape × element size)
//! and, with versioned DLPack (1.x, what torch and numpy export when asked), writability.
//! The capsule is never consumed: it is held while the bytes are written and released
//! afterwards, and the producer's capsule destructor frees its export then, so the memory
//! stays alive and in place for exactly as long as Rust may write to it.

use std::ffi::CStr;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use safeshard::Error;

use crate::dlpack::{DLManagedTensor, DLTensor};

const LEGACY: &CStr = c"dltensor";
const VERSIONED: &CStr = c"dltensor_versioned";
const KDL_CPU: i32 = 1;
const KDL_CUDA_HOST: i32 = 3;
const READ_ONLY: u64 = 1;

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut std::ffi::c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// Writable, contiguous host memory of a Python object, held through its DLPack capsule.
pub(crate) struct CallerMemory {
    /// The unconsumed capsule: it keeps the producer's export (and so the memory) alive.
    capsule: Py<PyAny>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is into memory the capsule keeps alive; it is only written through
// `bytes_mut`, whose callers make sure no two writers share bytes.
unsafe impl Send for CallerMemory {}
// SAFETY: as above; shared references only read `len` and the address.
unsafe impl Sync for CallerMemory {}

/// `what` is the option (`out`) or the option and the buffer's name (`into` and `"w"`);
/// `why` a predicate (`is read-only`).
fn refuse(what: &(&str, Option<&str>), why: impl std::fmt::Display) -> Error {
    match what.1 {
        None => Error::invalid_argument(what.0, why.to_string()),
        Some(name) => Error::invalid_argument(what.0, format!("{name:?} {why}")),
    }
}

impl CallerMemory {
    /// Takes `obj`'s memory, checked to be writable, contiguous host memory. `option` names
    /// the argument in errors (`out`, `into`), with the buffer's `name` when it has one.
    pub(crate) fn take(
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        option: &str,
        name: Option<&str>,
    ) -> Result<Self, Error> {
        let what = &(option, name);
        let py_err = |e: PyErr| {
            let msg = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
            refuse(
                what,
                msg.lines()
                    .next()
                    .unwrap_or("cannot export its memory")
                    .to_owned(),
            )
        };
        if !obj.hasattr("__dlpack__").unwrap_or(false) {
            return Err(refuse(
                what,
                format!(
                    "is a {} that does not export its memory (pass a CPU torch.Tensor or numpy \
                     array)",
                    obj.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        // The device first: exporting a CUDA tensor would synchronize a stream for nothing.
        if let Ok(dev) = obj.call_method0("__dlpack_device__") {
            if let Ok((kind, _)) = dev.extract::<(i32, i32)>() {
                if kind != KDL_CPU && kind != KDL_CUDA_HOST {
                    return Err(refuse(
                        what,
                        "not in CPU memory (pass CPU or pinned memory)",
                    ));
                }
            }
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item("max_version", (1, 0)).map_err(py_err)?;
        let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
            Ok(c) => c,
            // Producers older than DLPack 1.0 take no max_version.
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                obj.call_method0("__dlpack__").map_err(py_err)?
            }
            Err(e) => return Err(py_err(e)),
        };
        let raw = capsule.as_ptr();
        // SAFETY: raw is a live object; PyCapsule_IsValid accepts any object.
        let (tensor, read_only) = unsafe {
            if ffi::PyCapsule_IsValid(raw, VERSIONED.as_ptr()) == 1 {
                let m = ffi::PyCapsule_GetPointer(raw, VERSIONED.as_ptr())
                    .cast::<DLManagedTensorVersioned>();
                if m.is_null() {
                    return Err(refuse(what, "exported an empty DLPack capsule"));
                }
                if (*m).version.major != 1 {
                    return Err(refuse(
                        what,
                        format!(
                            "DLPack version {}.{}",
                            (*m).version.major,
                            (*m).version.minor
                        ),
                    ));
                }
                (
                    &(*m).dl_tensor as *const DLTensor,
                    (*m).flags & READ_ONLY != 0,
                )
            } else if ffi::PyCapsule_IsValid(raw, LEGACY.as_ptr()) == 1 {
                let m = ffi::PyCapsule_GetPointer(raw, LEGACY.as_ptr()).cast::<DLManagedTensor>();
                if m.is_null() {
                    return Err(refuse(what, "exported an empty DLPack capsule"));
                }
                (&(*m).dl_tensor as *const DLTensor, false)
            } else {
                ffi::PyErr_Clear();
                return Err(refuse(what, "returned no DLPack capsule from __dlpack__"));
            }
        };
        if read_only {
            return Err(refuse(what, "is read-only"));
        }
        // SAFETY: the capsule (alive: `capsule` holds it) owns the managed tensor and so the
        // DLTensor, its shape and strides.
        let (ptr, len) = unsafe { describe(&*tensor) }.map_err(|why| refuse(what, why))?;
        Ok(CallerMemory {
            capsule: capsule.unbind(),
            ptr,
            len,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The capsule that keeps the memory alive (for an owner that outlives the load).
    pub(crate) fn keep(&self, py: Python<'_>) -> Py<PyAny> {
        self.capsule.clone_ref(py)
    }

    /// The bytes, for writing.
    ///
    /// # Safety
    /// No other live slice may cover any of these bytes (callers check that buffers do not
    /// overlap), and Python code must not use the memory until the slice is gone.
    pub(crate) unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: ptr/len describe live, writable memory held by the capsule; exclusivity
        // is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// The address and byte length of a contiguous host tensor, or why it is not one.
///
/// # Safety
/// `t` must be a valid DLTensor whose shape (and strides, when not null) hold `ndim` values.
unsafe fn describe(t: &DLTensor) -> Result<(*mut u8, usize), String> {
    let kind = t.device.device_type;
    if kind != KDL_CPU && kind != KDL_CUDA_HOST {
        return Err("is not in CPU memory (pass CPU or pinned memory)".into());
    }
    let bits = u64::from(t.dtype.bits) * u64::from(t.dtype.lanes);
    if bits == 0 || bits % 8 != 0 {
        return Err(format!("has elements of {bits} bits, not whole bytes"));
    }
    let ndim = usize::try_from(t.ndim).map_err(|_| "has a negative number of dimensions")?;
    let shape: &[i64] = if ndim == 0 || t.shape.is_null() {
        &[]
    } else {
        // SAFETY: the producer's shape array holds ndim values.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let strides: Option<&[i64]> = if ndim == 0 || t.strides.is_null() {
        None
    } else {
        // SAFETY: as above, for the strides.
        Some(unsafe { std::slice::from_raw_parts(t.strides, ndim) })
    };
    let mut elements = 1u64;
    for &n in shape {
        let n = u64::try_from(n).map_err(|_| "has a negative dimension")?;
        elements = elements.checked_mul(n).ok_or("has a size that overflows")?;
    }
    if let (Some(strides), true) = (strides, elements > 0) {
        // Row-major: each dimension's stride is the product of the sizes after it (a
        // dimension of size 1 may have any stride).
        let mut expect = 1i64;
        for d in (0..ndim).rev() {
            if shape[d] != 1 && strides[d] != expect {
                return Err("is not contiguous".into());
            }
            expect = expect.saturating_mul(shape[d]);
        }
    }
    let len = elements
        .checked_mul(bits / 8)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("has a size that overflows")?;
    if len == 0 {
        return Ok((crate::dangling().cast(), 0));
    }
    let base = t.data.cast::<u8>();
    if base.is_null() {
        return Err("has a null data pointer".into());
    }
    let offset = usize::try_from(t.byte_offset).map_err(|_| "has a byte offset that overflows")?;
    Ok((base.wrapping_add(offset), len))
}

/// Refuses buffers that share bytes: writes through them would race.
pub(crate) fn refuse_overlaps(bufs: &[(String, CallerMemory)], option: &str) -> Result<(), Error> {
    let mut spans: Vec<(usize, usize, &str)> = bufs
        .iter()
        .filter(|(_, m)| m.len() > 0)
        .map(|(n, m)| (m.addr(), m.addr().saturating_add(m.len()), n.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::invalid_argument(
                option,
                format!("has overlapping buffers for {:?} and {:?}", w[0].2, w[1].2),
            ));
        }
    }
    Ok(())
}

/// Takes every `(name, buffer)` of `into`, refusing buffers that overlap.
pub(crate) fn take_all(
    py: Python<'_>,
    into: &[(String, Bound<'_, PyAny>)],
) -> Result<Vec<(String, CallerMemory)>, Error> {
    let bufs = into
        .iter()
        .map(|(n, obj)| Ok((n.clone(), CallerMemory::take(py, obj, "into", Some(n))?)))
        .collect::<Result<Vec<_>, Error>>()?;
    refuse_overlaps(&bufs, "into")?;
    Ok(bufs)
}

/// The buffers as the library takes them: `(name, bytes)`.
pub(crate) fn slices(bufs: &mut [(String, CallerMemory)]) -> Vec<(&str, &mut [u8])> {
    bufs.iter_mut()
        .map(|(n, m)| {
            // SAFETY: `take_all` refused overlapping buffers, and the callers (`Plan.load`,
            // `load_state_dict`) leave the memory to the load until it returns.
            (n.as_str(), unsafe { m.bytes_mut() })
        })
        .collect()
}
