//! The `safeshard` command: the library's command line ([`safeshard::cli`]).

fn main() {
    std::process::exit(safeshard::cli::main());
}
