//! A tiny Llama-like checkpoint and a hand-built plan for it, to exercise the share modes
//! (threads and real `mpirun` jobs) without the spec language and the planner.
//!
//! The checkpoint holds, in F16: `embed` `[vocab, hidden]` and `lm_head` (rows split over TP,
//! vocab padded with zero rows when `vocab % tp != 0`), and per layer a replicated `norm`
//! `[hidden]`, a replicated `kv` `[kv_rows, hidden]` (as replicated KV heads are), a row-split
//! `q` `[hidden, hidden]` and a column-split `o` `[hidden, hidden]` (strided runs), plus a
//! replicated final `norm`. Layers are placed on pipeline stages with
//! [`Topology::layer_stages`]; DP replicas hold the same bytes.

use std::io::Write;
use std::path::Path;

use crate::checkpoint::{header_bytes, Dtype, FileIdentity};
use crate::plan::{CopyRun, Plan, PlanFile, RankPlan, TensorPlan, ZeroRun};
use crate::sharding::TensorKind;
use crate::topology::Topology;
use crate::{Error, Result};

/// How a toy tensor is split over the TP group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToySplit {
    /// Whole tensor on every TP rank.
    Replicated,
    /// Rows (dim 0) split, padded with zero rows to a multiple of TP.
    Rows,
    /// Columns (dim 1) split; the column count must divide by TP.
    Cols,
}

/// One tensor of the toy checkpoint.
#[derive(Clone, Debug)]
pub struct ToyTensor {
    /// Name in the file.
    pub name: String,
    /// Shape `[rows, cols]` (1-D tensors have `cols == 0` and are `[rows]`).
    pub shape: Vec<u64>,
    /// TP split.
    pub split: ToySplit,
    /// Layer index, or `None` for embed (first stage) / final norm and lm_head (last stage).
    pub layer: Option<usize>,
    /// On the first stage (embed) rather than the last, when `layer` is `None`.
    pub first_stage: bool,
    /// Offset of its data in the file.
    pub file_offset: u64,
}

/// Shape of the toy model.
#[derive(Clone, Copy, Debug)]
pub struct ToyModel {
    /// Number of layers.
    pub layers: usize,
    /// Hidden size (must divide by TP).
    pub hidden: u64,
    /// Vocabulary rows.
    pub vocab: u64,
    /// Rows of the replicated `kv` tensor.
    pub kv_rows: u64,
}

impl ToyModel {
    /// The tensors in file order, with their data offsets (relative to the data section).
    pub fn tensors(&self) -> Vec<ToyTensor> {
        let h = self.hidden;
        let mut v = Vec::new();
        let mut push = |name: String, shape: Vec<u64>, split, layer, first_stage| {
            v.push(ToyTensor {
                name,
                shape,
                split,
                layer,
                first_stage,
                file_offset: 0,
            })
        };
        push(
            "embed".into(),
            vec![self.vocab, h],
            ToySplit::Rows,
            None,
            true,
        );
        for l in 0..self.layers {
            push(
                format!("layers.{l}.norm"),
                vec![h],
                ToySplit::Replicated,
                Some(l),
                false,
            );
            push(
                format!("layers.{l}.q"),
                vec![h, h],
                ToySplit::Rows,
                Some(l),
                false,
            );
            push(
                format!("layers.{l}.kv"),
                vec![self.kv_rows, h],
                ToySplit::Replicated,
                Some(l),
                false,
            );
            push(
                format!("layers.{l}.o"),
                vec![h, h],
                ToySplit::Cols,
                Some(l),
                false,
            );
        }
        push("norm".into(), vec![h], ToySplit::Replicated, None, false);
        push(
            "lm_head".into(),
            vec![self.vocab, h],
            ToySplit::Rows,
            None,
            false,
        );
        let mut off = 0;
        for t in &mut v {
            t.file_offset = off;
            off += 2 * t.shape.iter().product::<u64>();
        }
        v
    }

    /// The safetensors header (tensors back to back, F16, no metadata).
    fn header(&self) -> Vec<u8> {
        let tensors = self.tensors();
        header_bytes(
            &[],
            tensors.iter().map(|t| {
                (
                    t.name.as_str(),
                    Dtype::F16,
                    t.shape.as_slice(),
                    2 * t.shape.iter().product::<u64>(),
                )
            }),
        )
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        let data: u64 = self
            .tensors()
            .iter()
            .map(|t| 2 * t.shape.iter().product::<u64>())
            .sum();
        8 + self.header().len() as u64 + data
    }

    /// Start of the data section in the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header().len() as u64
    }

    /// Writes the checkpoint (deterministic, distinct bytes in every tensor).
    pub fn write(&self, path: &Path) -> Result<()> {
        let header = self.header();
        let mut out = Vec::new();
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for (i, t) in self.tensors().iter().enumerate() {
            let n = 2 * t.shape.iter().product::<u64>();
            out.extend((0..n).map(|p| ((i as u64 * 131 + p * 7 + p / 251) % 251) as u8));
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&out).map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// The plan of the toy checkpoint at `path` for `topo`. The file's expected length comes
    /// from the model, not from the file, so a broken file is caught when it is read.
    pub fn plan(&self, path: &Path, topo: &Topology) -> Result<Plan> {
        topo.validate()?;
        let tp = topo.tp as u64;
        if self.hidden % tp != 0 {
            return Err(Error::Usage(format!(
                "toy hidden size {} does not divide by --tp {tp}",
                self.hidden
            )));
        }
        let stages = topo.layer_stages(self.layers)?;
        let data_start = self.data_start();
        let tensors = self.tensors();
        let mut ranks = Vec::new();
        for rank in 0..topo.world() {
            let c = topo.coords(rank);
            let last = c.pp_rank + 1 == topo.pp;
            let mut rp = RankPlan {
                coords: c,
                tensors: Vec::new(),
                copies: Vec::new(),
                zeros: Vec::new(),
                bytes: 0,
                read_bytes: 0,
                arena_bytes: 0,
                staging_bytes: 0,
            };
            for (source, t) in tensors.iter().enumerate() {
                let here = match t.layer {
                    Some(l) => stages.get(l) == Some(&c.pp_rank),
                    None if t.first_stage => c.pp_rank == 0,
                    None => last,
                };
                if !here {
                    continue;
                }
                let rows = t.shape.first().copied().unwrap_or(1);
                let cols = t.shape.get(1).copied().unwrap_or(1);
                let src = data_start + t.file_offset;
                let dst = rp.arena_bytes.div_ceil(64) * 64;
                let tr = c.tp_rank as u64;
                let (shape, bytes) = match t.split {
                    ToySplit::Replicated => {
                        let b = 2 * rows * cols;
                        rp.copies.push(CopyRun {
                            file: 0,
                            src,
                            dst,
                            len: b,
                            count: 1,
                            src_stride: 0,
                            dst_stride: 0,
                        });
                        (t.shape.clone(), b)
                    }
                    ToySplit::Rows => {
                        let per = rows.div_ceil(tp);
                        let start = (tr * per).min(rows);
                        let real = per.min(rows - start);
                        let row = 2 * cols;
                        if real > 0 {
                            rp.copies.push(CopyRun {
                                file: 0,
                                src: src + start * row,
                                dst,
                                len: real * row,
                                count: 1,
                                src_stride: 0,
                                dst_stride: 0,
                            });
                        }
                        if per > real {
                            rp.zeros.push(ZeroRun {
                                dst: dst + real * row,
                                len: (per - real) * row,
                                count: 1,
                                dst_stride: 0,
                            });
                        }
                        (vec![per, cols], per * row)
                    }
                    ToySplit::Cols => {
                        let per = cols / tp;
                        rp.copies.push(CopyRun {
                            file: 0,
                            src: src + tr * per * 2,
                            dst,
                            len: per * 2,
                            count: rows,
                            src_stride: cols * 2,
                            dst_stride: per * 2,
                        });
                        (vec![rows, per], rows * per * 2)
                    }
                };
                rp.tensors.push(TensorPlan {
                    name: t.name.clone(),
                    dtype: Dtype::F16,
                    shape,
                    offset: dst,
                    bytes,
                    source,
                    kind: if t.split == ToySplit::Replicated {
                        TensorKind::Norm
                    } else {
                        TensorKind::Attention
                    },
                    replicated: t.split == ToySplit::Replicated || tp == 1 || topo.dp > 1,
                });
                rp.arena_bytes = dst + bytes;
                rp.bytes += bytes;
            }
            // Exact bytes (the real planner counts whole pages).
            rp.read_bytes = rp.copies.iter().map(|r| r.len * r.count).sum();
            ranks.push(rp);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Plan {
            topology: topo.clone(),
            spec: "toy".into(),
            files: vec![PlanFile {
                name,
                path: path.to_path_buf(),
                identity: FileIdentity {
                    len: self.file_len(),
                    mtime_ns: 0,
                    dev: 0,
                    ino: 0,
                },
            }],
            ranks,
        })
    }
}
