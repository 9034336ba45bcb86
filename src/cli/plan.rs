//! `safeshard plan`.

use safeshard::Result;

/// Arguments of `safeshard plan`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `safeshard plan`.
pub fn run(args: Args) -> Result<()> {
    let _ = args;
    Err(safeshard::Error::Usage(
        "`safeshard plan` is not built yet".into(),
    ))
}
