//! reuseport-cluster: run N copies of a server behind one port, the kernel's way.
//!
//! `main` only parses, runs and maps the result to an exit code (documented in the
//! README and in `--help`): 0 clean stop, 1 failure, 2 invalid command line, 3 stopped but
//! some worker had to be SIGKILLed.

#![deny(unsafe_op_in_unsafe_fn)]

mod cli;
mod config;
mod demo;
mod log;
mod master;
mod notify;
mod readiness;
mod rolling;
mod socket;
mod spawn;
mod supervisor;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::supervisor::Outcome;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::DemoWorker) = cli.command {
        return match demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("demo app: {e:#}")),
        };
    }
    let config = match Config::from_args(&cli.run) {
        Ok(config) => config,
        Err(e) => return fail(2, &e.to_string()),
    };
    match master::run(config) {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::Killed) => ExitCode::from(3),
        Ok(Outcome::Failed(msg)) => fail(1, &msg),
        Err(e) => fail(1, &format!("{e:#}")),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "error: {msg}");
    ExitCode::from(code)
}
