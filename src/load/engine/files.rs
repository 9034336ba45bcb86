//! File identity: every file a load reads is opened once and checked against the identity
//! recorded when the plan was made, on the handle that is then read or mapped.

use std::fs::File;

use crate::checkpoint::FileIdentity;
use crate::error::FileChange;
use crate::plan::{CopyRun, PlanFile};
use crate::{Error, Result};

/// Opens the plan's files that `copies` read and checks each against its planned identity
/// (length, modification time, device, inode; fields recorded as 0 are unknown and skipped).
/// The check runs on the open handle, which is the one later mapped or read, so a file
/// replaced after the check is not silently used.
pub(super) fn open_checked(files: &[PlanFile], copies: &[CopyRun]) -> Result<Vec<Option<File>>> {
    let mut open: Vec<Option<File>> = (0..files.len()).map(|_| None).collect();
    for run in copies {
        let idx = run.file as usize;
        let Some(pf) = files.get(idx) else {
            return Err(Error::plan(format!(
                "copy run names file #{idx}, but the plan has {} files",
                files.len()
            )));
        };
        let Some(slot) = open.get_mut(idx) else {
            continue;
        };
        if slot.is_some() {
            continue;
        }
        let f = File::open(&pf.path).map_err(|e| Error::io(&pf.path, e))?;
        check_identity(pf, &FileIdentity::of(&f, &pf.path)?)?;
        *slot = Some(f);
    }
    Ok(open)
}

fn check_identity(pf: &PlanFile, now: &FileIdentity) -> Result<()> {
    let want = &pf.identity;
    let change = if now.len != want.len {
        FileChange::Length {
            now: now.len,
            planned: want.len,
        }
    } else if (want.mtime_ns != 0 && now.mtime_ns != want.mtime_ns)
        || (want.dev != 0 && now.dev != want.dev)
        || (want.ino != 0 && now.ino != want.ino)
    {
        FileChange::Replaced
    } else {
        return Ok(());
    };
    Err(Error::FileChanged {
        file: pf.path.clone(),
        change,
    })
}

/// A second handle on plan file `pf` opened with `O_DIRECT`, checked against the planned
/// identity like the first.
pub(super) fn open_direct(pf: &PlanFile) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&pf.path)
        .map_err(|e| Error::io(&pf.path, e))?;
    check_identity(pf, &FileIdentity::of(&f, &pf.path)?)?;
    Ok(f)
}
