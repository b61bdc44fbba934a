//! `pgenvelope` binary: parse the command line, run, map errors to exit codes.

use clap::Parser;

fn main() {
    let cli = pgenvelope::cli::Cli::parse();
    let code = match pgenvelope::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgenvelope: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
