//! `safeshard inspect`.

use safeshard::Result;

/// Arguments of `safeshard inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `safeshard inspect`.
pub fn run(args: Args) -> Result<()> {
    let _ = args;
    Err(safeshard::Error::Usage(
        "`safeshard inspect` is not built yet".into(),
    ))
}
