//! Surviving a file truncated while it is mapped.
//!
//! Reading a page of a file mapping that lies past the file's end raises `SIGBUS`, which
//! kills the process ("Bus error"). Checking the file's length before mapping cannot prevent
//! it: another process may truncate the file during the copy. So every window the engine maps
//! is registered here, and a `SIGBUS` handler (installed once, `SA_SIGINFO`) that finds the
//! faulting address inside a registered window maps one anonymous zero page over it
//! (`MAP_FIXED`), marks the window faulted and returns: the copy goes on reading zeros, and
//! the engine then reports `FILE: file truncated during load` instead of using those bytes.
//! A fault anywhere else is not ours: it goes to the handler that was installed before, or,
//! when that was the default action, the default action is restored and the faulting access
//! repeats and kills the process as it would have without us.
//!
//! The handler only reads atomics and calls `mmap`/`sigaction`, which are async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

/// Windows registered at once, over all concurrent loads in the process (a rank maps a few
/// windows per file; `--all-ranks` runs at most 64 ranks at once).
const SLOTS: usize = 8192;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const ACTIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The action that was in place before ours, called for faults outside our windows.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered window: while it lives, a `SIGBUS` inside `[start, end)` is recovered.
/// Dropping it unregisters the window (before the mapping is unmapped).
pub(crate) struct Guard {
    slot: usize,
}

impl Guard {
    /// Whether a read inside the window hit a page past the file's end.
    pub(crate) fn faulted(&self) -> bool {
        TABLE
            .get(self.slot)
            .is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = TABLE.get(self.slot) {
            s.state.store(FREE, Ordering::Release);
        }
    }
}

/// Registers `[ptr, ptr + len)` (a file mapping) and installs the handler on first use.
/// `None` when the handler cannot be installed or every slot is taken; the caller must then
/// not read the file through a mapping.
pub(crate) fn register(ptr: *const u8, len: usize) -> Option<Guard> {
    install();
    if !INSTALLED.load(Ordering::Acquire) {
        return None;
    }
    let start = ptr as usize;
    let end = start.checked_add(len)?;
    for (i, s) in TABLE.iter().enumerate() {
        if s.state
            .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            s.start.store(start, Ordering::Relaxed);
            s.end.store(end, Ordering::Relaxed);
            s.faulted.store(false, Ordering::Relaxed);
            s.state.store(ACTIVE, Ordering::Release);
            return Some(Guard { slot: i });
        }
    }
    None
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value; `handler` has the SA_SIGINFO signature;
        // PREVIOUS is written here once, before the handler is installed, and only read after.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = handler as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            // Record the old action first so a fault between the two calls is not lost.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            PREVIOUS = Some(old);
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        if s.state.load(Ordering::Acquire) != ACTIVE {
            continue;
        }
        let (start, end) = (
            s.start.load(Ordering::Relaxed),
            s.end.load(Ordering::Relaxed),
        );
        if addr < start || addr >= end {
            continue;
        }
        let page = crate::plan::page_size() as usize;
        let base = addr & !(page - 1);
        // SAFETY: the page lies inside one of our own live file mappings (registered until
        // it is unmapped); replacing it with an anonymous zero page changes only what our
        // copy reads there, and the load is then reported as failed.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            s.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or the zero page could not be mapped): hand it on.
    // SAFETY: PREVIOUS was written before the handler was installed and is never written again.
    let prev = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    match prev {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Restore the default action and return: the faulting access repeats and the
            // kernel delivers SIGBUS with the default action (what would have happened
            // without us).
            // SAFETY: sigaction is async-signal-safe; a zeroed action with SIG_DFL is valid.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigemptyset(&mut dfl.sa_mask);
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}
