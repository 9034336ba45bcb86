//! The share mode a job gets when its user names none, chosen by measurement
//! (docs/performance.md, "Whole node" and "Several nodes"):
//!
//! - **one node:** `none`. Ranks of one node share its page cache, so each byte comes from
//!   storage once whatever the mode; exchanging bytes between ranks only adds copies (in the
//!   whole-node runs `read-once` over gloo/MPI took 1.3-3.9x as long as `none`).
//! - **several nodes:** `broadcast`. A tensor that several ranks hold (DP replicas, norms) is
//!   read from storage once and broadcast to its holders, so replicas on other nodes do not
//!   read it again; in the simulated two-node runs (copies with separate page caches, reads
//!   throttled to 200 MB/s) it was the fastest mode at tp 4 and at tp 2 x dp 2. `read-once`
//!   read the fewest bytes (1.0x the checkpoint) but took 1.7-2x as long there: its rounds
//!   read, then exchange, and the exchange is CPU-bound on that machine.
//!
//! The nodes are counted collectively: every rank's node name (`node`, else the host name)
//! is all-gathered and the distinct names counted, so a launcher's variables need not say.

use super::{ShareMode, ShareOptions};
use crate::comm::{host_name, Communicator};
use crate::Result;

/// The share mode chosen for a job and why (one line, for `--json`/reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareChoice {
    /// The mode the job runs with.
    pub mode: ShareMode,
    /// Distinct nodes of the job.
    pub nodes: usize,
    /// The ranks on this rank's node (itself included), in rank order: they share its page
    /// cache ([`crate::plan::NodeSpans`]). Empty when unknown.
    pub node_ranks: Vec<usize>,
    /// Why this mode, in a few words.
    pub why: String,
}

impl ShareChoice {
    /// The rule: `none` on one node, `broadcast` across several.
    pub fn for_nodes(nodes: usize) -> ShareChoice {
        if nodes <= 1 {
            ShareChoice {
                mode: ShareMode::None,
                nodes,
                node_ranks: Vec::new(),
                why: "default for 1 node: its ranks share one page cache, so each reads its own \
                      slices"
                    .into(),
            }
        } else {
            ShareChoice {
                mode: ShareMode::Broadcast,
                nodes,
                node_ranks: Vec::new(),
                why: format!(
                    "default for {nodes} nodes: a tensor several ranks hold is read once and \
                     broadcast to them"
                ),
            }
        }
    }

    /// The choice when the ranks cannot talk (a front built without a transport): every
    /// process reads its own rank.
    pub fn without_transport(why: &str) -> ShareChoice {
        ShareChoice {
            mode: ShareMode::None,
            nodes: 0,
            node_ranks: Vec::new(),
            why: format!("default: {why}"),
        }
    }
}

/// Collective on `world`: counts the job's nodes by name (`node`, else this machine's host
/// name; `SAFESHARD_NODE` is how the fronts pass one) and returns [`ShareChoice::for_nodes`].
pub fn choose_share(world: &dyn Communicator, node: Option<&str>) -> Result<ShareChoice> {
    let mine = node.map_or_else(host_name, str::to_string);
    world.set_phase("share default: node names");
    let names = world.all_gather(mine.as_bytes())?;
    let node_ranks = (0..names.len())
        .filter(|&r| names[r] == mine.as_bytes())
        .collect();
    let mut distinct = names;
    distinct.sort();
    distinct.dedup();
    Ok(ShareChoice {
        node_ranks,
        ..ShareChoice::for_nodes(distinct.len())
    })
}

impl ShareChoice {
    /// Options for a job that runs with `mode` (the caller's, else this choice's): the
    /// mode, and the ranks on this node. Returns why the mode was chosen when it was not the
    /// caller's.
    pub fn apply(&self, given: Option<ShareMode>, opts: &mut ShareOptions) -> Option<String> {
        opts.node_ranks = self.node_ranks.clone();
        match given {
            Some(mode) => {
                opts.mode = mode;
                None
            }
            None => {
                opts.mode = self.mode;
                Some(self.why.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::run_threads;

    /// Every rank's choice for a world whose rank `r` is on node `names[r]`.
    fn choices(names: &[Option<&str>]) -> Vec<ShareChoice> {
        run_threads(names.len(), |c| choose_share(c, names[c.rank()]))
            .into_iter()
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn one_node_gets_none_and_several_get_broadcast() {
        for (names, mode, nodes) in [
            (vec![Some("a"); 4], ShareMode::None, 1),
            // No name: the host name, the same for every thread of this process.
            (vec![None; 3], ShareMode::None, 1),
            (
                vec![Some("a"), Some("a"), Some("b"), Some("b")],
                ShareMode::Broadcast,
                2,
            ),
            (
                vec![Some("x"), Some("y"), Some("z")],
                ShareMode::Broadcast,
                3,
            ),
        ] {
            let got = choices(&names);
            for (r, c) in got.iter().enumerate() {
                let same: Vec<usize> = (0..names.len()).filter(|&q| names[q] == names[r]).collect();
                assert_eq!(c.node_ranks, same, "rank {r} of {names:?}");
            }
            assert!(
                got.iter()
                    .all(|c| (c.mode, c.nodes, &c.why) == (got[0].mode, got[0].nodes, &got[0].why)),
                "{got:?}"
            );
            assert_eq!((got[0].mode, got[0].nodes), (mode, nodes), "{names:?}");
            assert!(
                got[0].why.contains(&format!("{nodes} node")),
                "{}",
                got[0].why
            );
        }
    }
}
