//! The engine that executes copy and zero runs into an arena, behind one call: a [`Request`]
//! names the runs (and the caller buffers that replace spans of the arena),
//! [`Request::prepare`] opens the files and checks their identity, and [`Prepared::run`]
//! validates the runs against the arena, maps what is gathered from a mapping and copies on
//! the worker pool, choosing the I/O path per task by [`IoMode`].
//!
//! One concern per file: `files` (file identity), `validate` (soundness: the
//! [`validate::ValidatedRuns`] token the unsafe copy requires), `tasks` (runs cut into tasks),
//! `mapped` (mapped windows and page-cache residency), `direct` (`O_DIRECT` handles and the
//! bounce pool), `budget` (the staging budget), `pool` (the worker pool) and `copy` (the I/O
//! of one task: zero fill, positioned read, gather, staged read).

mod budget;
mod copy;
mod direct;
mod files;
mod mapped;
mod pool;
mod prefetch;
mod tasks;
mod validate;

use std::fs::File;

use super::LoadOptions;
use crate::plan::{CopyRun, PlanFile, ZeroRun};
use crate::{Error, Result};

pub(crate) use mapped::{touched_pages, Mapped};
pub(crate) use validate::Redirect;

/// What one execution did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    /// Bytes read from storage: the page-rounded union of the pages the mmap engine touches,
    /// or the bytes the pread engine asked the kernel for.
    pub read_bytes: u64,
    /// Most staging memory held at once (pread engine; 0 for mmap).
    pub peak_staging: u64,
    /// Reader threads the copies ran on.
    pub threads: usize,
    /// Arena bytes by how they were read.
    pub paths: IoPaths,
}

/// Arena bytes by how they were read: what [`crate::load::IoMode::Auto`] chose, task by task
/// (zero fills not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoPaths {
    /// Positioned reads through the page cache (`pread`).
    pub pread: u64,
    /// Of [`IoPaths::pread`], the spans that were not cached when the load started, read
    /// from storage with their pages asked for ahead of the readers.
    pub prefetched: u64,
    /// Copied from a mapping of the file (strided runs whose pages were cached; every run
    /// under `IoMode::Mmap`).
    pub mapped: u64,
    /// Read with direct I/O (`O_DIRECT`) into bounce buffers.
    pub direct: u64,
}

impl IoPaths {
    /// The path that moved the most bytes: `pread`, `mmap`, `direct`, or `none` when no
    /// byte was read.
    pub fn main(&self) -> &'static str {
        let all = [
            (self.pread, "pread"),
            (self.mapped, "mmap"),
            (self.direct, "direct"),
        ];
        match all.iter().max_by_key(|(b, _)| *b) {
            Some(&(b, name)) if b > 0 => name,
            _ => "none",
        }
    }
}

fn bad_plan(msg: String) -> Error {
    Error::plan(msg)
}

/// The message of a load whose input shrank under it (a short read or a recovered `SIGBUS`).
fn truncated(pf: &PlanFile, detail: impl std::fmt::Display) -> Error {
    Error::Truncated {
        file: pf.path.clone(),
        detail: detail.to_string(),
    }
}

/// What to execute: copy and zero runs of a plan's files into an arena, optionally with
/// spans of the arena written to caller buffers instead, or with the tensors left out of the
/// copies handed out as views of a mapping.
pub(crate) struct Request<'a> {
    files: &'a [PlanFile],
    copies: &'a [CopyRun],
    zeros: &'a [ZeroRun],
    redirects: Vec<Redirect<'a>>,
    views_of: Option<&'a [CopyRun]>,
}

impl<'a> Request<'a> {
    /// `copies` and `zeros` may be any sub-lists of a rank's runs (the share modes use this
    /// for the tensors a rank reads itself).
    pub(crate) fn new(files: &'a [PlanFile], copies: &'a [CopyRun], zeros: &'a [ZeroRun]) -> Self {
        Request {
            files,
            copies,
            zeros,
            redirects: Vec::new(),
            views_of: None,
        }
    }

    /// Arena spans written to caller buffers instead: every redirect must lie inside the
    /// arena, no two may overlap, and every run must lie inside one redirect or outside all
    /// of them (checked by [`Prepared::run`]).
    pub(crate) fn redirect(mut self, redirects: Vec<Redirect<'a>>) -> Self {
        self.redirects = redirects;
        self
    }

    /// Maps every run of `all` (a superset of the runs to copy, each checked like them) and
    /// keeps the mapping in [`Executed::mapped`]: the tensors left out of the copies are
    /// handed out as views of it. Read bytes are then the pages `all` touches.
    pub(crate) fn views_of(mut self, all: &'a [CopyRun]) -> Self {
        self.views_of = Some(all);
        self
    }

    /// Opens every file the runs (or the views) read and checks it against its planned
    /// identity; nothing is read yet.
    pub(crate) fn prepare(self) -> Result<Prepared<'a>> {
        let open = files::open_checked(self.files, self.views_of.unwrap_or(self.copies))?;
        Ok(Prepared {
            req: self,
            open,
            populate_ahead: false,
        })
    }
}

/// A [`Request`] whose files are open and checked.
pub(crate) struct Prepared<'a> {
    req: Request<'a>,
    open: Vec<Option<File>>,
    populate_ahead: bool,
}

/// What [`Prepared::run`] did.
pub(crate) struct Executed {
    pub(crate) stats: ExecStats,
    /// The mapping of [`Request::views_of`]'s runs, when asked for.
    pub(crate) mapped: Option<Mapped>,
}

impl<'a> Prepared<'a> {
    /// With `on`, each reader makes a task's destination pages resident in one
    /// `MADV_POPULATE_WRITE` call before reading into them ([`crate::load::ArenaInit::Ahead`]
    /// on a fresh arena): one batched call faults pages about twice as fast as the copy's own
    /// page faults do, and it runs on every reader, so on every core.
    pub(crate) fn populate_ahead(mut self, on: bool) -> Self {
        self.populate_ahead = on;
        self
    }

    /// Validates the runs against `arena` (which must be the rank's arena or any buffer of
    /// its layout), then copies them with the engine `opts.io` selects.
    pub(crate) fn run(self, arena: &'a mut [u8], opts: &LoadOptions) -> Result<Executed> {
        let Prepared {
            req,
            open,
            populate_ahead,
        } = self;
        if let Some(all) = req.views_of {
            validate::check(req.files, all, req.zeros, arena.len() as u64)?;
        }
        let runs = validate::validate(req.files, req.copies, req.zeros, arena, req.redirects)?
            .populate_ahead(populate_ahead);
        let mapped = match req.views_of {
            Some(all) => Some(Mapped::map(req.files, &open, all, |_| true, true)?),
            None => mapped::map_for(&runs, &open, opts)?,
        };
        let mut stats = copy::run(&runs, &open, mapped.as_ref(), opts)?;
        let mapped = match req.views_of {
            Some(all) => {
                stats.read_bytes = touched_pages(all);
                mapped
            }
            None => None,
        };
        Ok(Executed { stats, mapped })
    }
}

/// Runs the copies (and zero fills) into `arena` with the engine `opts.io` selects.
/// `copies` and `zeros` may be any sub-lists of a rank's runs (the communicator reuses this
/// for the tensors a rank reads itself).
pub fn execute(
    files: &[PlanFile],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena: &mut [u8],
    opts: &LoadOptions,
) -> Result<ExecStats> {
    Ok(Request::new(files, copies, zeros)
        .prepare()?
        .run(arena, opts)?
        .stats)
}
