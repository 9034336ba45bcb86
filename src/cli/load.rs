//! `safeshard load`.

use safeshard::Result;

/// Arguments of `safeshard load`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `safeshard load`.
pub fn run(args: Args) -> Result<()> {
    let _ = args;
    Err(safeshard::Error::Usage(
        "`safeshard load` is not built yet".into(),
    ))
}
