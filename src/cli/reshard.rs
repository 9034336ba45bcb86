//! `safeshard reshard`.

use safeshard::Result;

/// Arguments of `safeshard reshard`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `safeshard reshard`.
pub fn run(args: Args) -> Result<()> {
    let _ = args;
    Err(safeshard::Error::Usage(
        "`safeshard reshard` is not built yet".into(),
    ))
}
