//! `safeshard demo`.

use safeshard::Result;

/// Arguments of `safeshard demo`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `safeshard demo`.
pub fn run(args: Args) -> Result<()> {
    let _ = args;
    Err(safeshard::Error::Usage(
        "`safeshard demo` is not built yet".into(),
    ))
}
