//! `safeshard spec list` and `safeshard spec check`.

use safeshard::Result;

/// `safeshard spec` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SpecCommand {
    /// List the shipped specs and the architectures they cover.
    List,
}

/// Runs a `safeshard spec` subcommand.
pub fn run(cmd: SpecCommand) -> Result<()> {
    let _ = cmd;
    Err(safeshard::Error::Usage(
        "`safeshard spec` is not built yet".into(),
    ))
}
