//! The `safeshard` command line (feature `cli`): argument parsing and output formatting only;
//! the work is in the library. The binary and the Python package's console script both run
//! [`main_from`], so they are one program.

use crate::error::OptionNames;
use crate::Error;
use clap::{Parser, Subcommand};

mod common;
mod demo;
mod dist;
mod inspect;
mod load;
mod plan;
mod report;
mod reshard;
mod spec;

/// Load safetensors checkpoints into TP/PP/DP/EP jobs: each rank reads only the bytes it needs.
#[derive(Parser, Debug)]
#[command(name = "safeshard", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `safeshard=debug`.
    #[arg(long, global = true, env = "SAFESHARD_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List a checkpoint's tensors (name, dtype, shape, bytes, file) and totals.
    Inspect(inspect::Args),
    /// List shipped sharding specs or check one.
    #[command(subcommand)]
    Spec(spec::SpecCommand),
    /// Dry run: per-rank memory and reads for a topology, without reading tensor data.
    Plan(plan::Args),
    /// Load one rank, every rank on threads, or (with --share, or under mpirun/srun) every
    /// rank of a job with reads shared between ranks.
    Load(load::Args),
    /// Write each rank's tensors as safetensors files (vLLM sharded_state naming).
    Reshard(reshard::Args),
    /// Old name of `load --share MODE --digest` (hidden; kept so scripts keep working).
    #[command(hide = true)]
    DistLoad(dist::Args),
    /// Write a small Llama-shaped checkpoint, plan it, load all ranks with verification.
    Demo(demo::Args),
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    main_from(std::env::args_os())
}

/// Runs the CLI on `args` (the program name first) and returns the exit status; the Python
/// package's console script calls this with its own `sys.argv`.
pub fn main_from<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0); usage errors (exit 2) get our
            // one-line form instead of clap's several lines of usage and tips.
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!("{}", missing_subcommand(&e.render().to_string()));
            } else if e.use_stderr() {
                eprintln!(
                    "{}",
                    crate::error::escape_controls(&one_line_usage_error(&e.render().to_string()))
                );
            } else {
                let _ = e.print();
            }
            return e.exit_code();
        }
    };
    init_tracing(&cli.log);
    install_stdout_failure_hook();
    // Unwinding (not exiting) on a stdout failure lets temporary directories clean up.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Spec(cmd) => spec::run(cmd),
        Command::Plan(args) => plan::run(args),
        Command::Load(args) => load::run(args),
        Command::Reshard(args) => reshard::run(args),
        Command::Demo(args) => demo::run(args),
        Command::DistLoad(args) => load::run(args.into()),
    }));
    let result = match result {
        Ok(r) => r,
        Err(payload) => match stdout_failure(payload.as_ref()) {
            Some(cause) if cause.contains("os error 32") => Ok(()),
            Some(cause) => {
                eprintln!("error: <stdout>: {cause}");
                return 1;
            }
            None => std::panic::resume_unwind(payload),
        },
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            exit_code(&e)
        }
    }
}

/// Exit status of a failed command: 2 for bad usage (flags, arguments, topology), 1 for bad
/// data and failures of the system ([`crate::error::ErrorKind::exit_code`]).
pub fn exit_code(e: &Error) -> i32 {
    e.exit_code()
}

/// The command line's spelling of library options: flags (`pp_layers` → `--pp-layers`), with
/// the few whose flag is not their field's name.
pub struct Flags;

impl OptionNames for Flags {
    fn option(&self, field: &str) -> String {
        match field {
            "mode" => "--share".into(),
            "round_bytes" => "--round".into(),
            // Fields of the job fingerprint that are not flags.
            "plan" => "the plan (checkpoint files, topology or spec flags)".into(),
            "version" => "the safeshard version".into(),
            "world size" => "the world size".into(),
            f => format!("--{}", f.replace('_', "-")),
        }
    }
}

/// An error as the CLI prints it (after `error: `): options named by their flags, one line
/// (spec errors keep their indented source and caret lines).
pub fn message(e: &Error) -> String {
    e.render(&Flags)
}

/// Folds clap's rendered error into one line: the message lines up to the first blank line
/// (dropping clap's `tip:` and `Usage:` paragraphs), joined with spaces, plus a pointer to
/// `--help`.
fn one_line_usage_error(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.is_empty() {
            if !parts.is_empty() {
                break;
            }
            continue;
        }
        parts.push(line);
    }
    let mut msg = parts.join(" ");
    if !msg.starts_with("error:") {
        msg = format!("error: {msg}");
    }
    msg.push_str(" (see --help)");
    msg
}

/// The cause of a `println!` panic (stdout gone, as under `| head`, or full), if `payload` is
/// one.
fn stdout_failure(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .and_then(|p| p.strip_prefix("failed printing to stdout: "))
}

/// `println!` panics when stdout is gone or full; the subcommands that write with `writeln!`
/// treat a broken pipe as success and other write errors as `error: <stdout>: ...`. This hook
/// keeps such panics quiet (the caller in [`main`] turns them into that behaviour); any other
/// panic still goes to the default hook.
fn install_stdout_failure_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if stdout_failure(info.payload()).is_none() {
            default(info);
        }
    }));
}

/// One line for a command run without its subcommand, from clap's help text: the usage line
/// and the subcommands listed under `Commands:`.
fn missing_subcommand(help: &str) -> String {
    let usage = help
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
        .unwrap_or("safeshard <COMMAND>");
    let command = usage.split(" [").next().unwrap_or(usage);
    let names: Vec<&str> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .collect();
    format!(
        "error: {command} needs a subcommand: {} (see --help)",
        names.join(", ")
    )
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_hints_become_flags() {
        let e = Error::NoSpec {
            architectures: Vec::new(),
        };
        assert!(
            message(&e).contains("(--spec: a shipped name"),
            "{}",
            message(&e)
        );
        assert!(
            e.to_string().contains("(the `spec` option: a shipped name"),
            "{e}"
        );
        let e = Error::Disagree {
            option: "mode".into(),
            values: vec![("none".into(), vec![0]), ("broadcast".into(), vec![1, 2])],
        };
        assert_eq!(
            message(&e),
            "ranks disagree on --share: rank 0 none, rank 1,2 broadcast"
        );
    }

    #[test]
    fn options_are_printed_as_flags_and_decide_the_exit_code() {
        let e = Error::invalid_argument("pp_layers", "has 3 entries but pp is 2");
        assert_eq!(message(&e), "--pp-layers has 3 entries but pp is 2");
        assert_eq!(exit_code(&e), 2);
        assert_eq!(
            exit_code(&Error::WorldSize {
                ranks: 3,
                planned: 4,
                topology: Some([2, 2, 1])
            }),
            2
        );
        assert_eq!(exit_code(&Error::Cancelled), 1);
        let oom = Error::OutOfMemory {
            bytes: 9,
            what: "tensor \"w\"".into(),
            rank: Some(2),
        };
        assert_eq!(exit_code(&oom), 1);
    }

    #[test]
    fn only_spec_context_lines_survive() {
        let spec = Error::SpecAt {
            file: "a\nb.shard".into(),
            line: 1,
            col: 3,
            message: "bad".into(),
            excerpt: "\n    x y\n      ^".into(),
        };
        assert_eq!(message(&spec), "a\\nb.shard:1:3: bad\n    x y\n      ^");
        // A line break inside a name of any other error is escaped, never a second line.
        let forged = Error::comm("rank 1", "a\nerror: forged \u{1b}[2J");
        assert_eq!(message(&forged), "rank 1: a\\nerror: forged \\u{1b}[2J");
        let inv = Error::invalid_argument("out", "x\ny");
        assert_eq!(message(&inv), "--out x\\ny");
    }
}
