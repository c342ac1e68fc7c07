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
mod node;
mod ops;
mod sockets;

use crate::ops::{client, control, doctor};

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::master::supervisor::Outcome;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match cli::hint(&e, &std::env::args().collect::<Vec<_>>()) {
            Some(line) => return fail(2, &line),
            None => e.exit(),
        },
    };
    let (request, target, wait) = match cli.command {
        None => return launch(&cli),
        Some(Command::DemoWorker) => {
            return match demo::run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("demo app: {e:#}")),
            }
        }
        Some(Command::Completions { shell }) => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "reuseport-cluster", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man { dir }) => {
            return match clap_mangen::generate_to(Cli::command(), &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("writing man pages to {}: {e}", dir.display())),
            }
        }
        Some(Command::Status { json, target }) => (
            if json { "status --json" } else { "status" }.to_string(),
            target,
            None,
        ),
        Some(Command::Reload { wait, target }) => ("reload".into(), target, Some(wait)),
        Some(Command::Scale { n, wait, target }) => (format!("scale {n}"), target, Some(wait)),
        Some(Command::Stop { wait, target }) => ("stop".into(), target, Some(wait)),
        Some(Command::Doctor {
            binds,
            workers,
            backlog,
            connections,
        }) => {
            let plan = doctor::Plan {
                binds,
                workers,
                backlog,
                connections,
            };
            return match doctor::run(&plan) {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(1),
            };
        }
    };
    let path = match control::client_path(target.name.as_deref(), target.control.as_deref()) {
        Ok(path) => path,
        Err(e) => return fail(1, &format!("{e:#}")),
    };
    if let Some(wait) = wait.filter(|w| !w.no_wait) {
        let timeout = match wait
            .timeout
            .as_deref()
            .map(config::parse_duration)
            .transpose()
        {
            Ok(t) => t,
            Err(e) => return fail(2, &format!("--timeout {e}")),
        };
        return match client::follow(&path, &request, timeout) {
            Ok(code) => ExitCode::from(code),
            Err(e) => fail(1, &format!("{e:#}")),
        };
    }
    match control::request(&path, &request) {
        Ok(text) if text.starts_with("error:") => fail(1, text.trim_start_matches("error:").trim()),
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &format!("{e:#}")),
    }
}

/// Runs the launcher itself.
fn launch(cli: &Cli) -> ExitCode {
    log::set_format(cli.run.log_format);
    let config = match Config::from_args(&cli.run) {
        Ok(config) => config,
        Err(e) => return fail(2, &e.to_string()),
    };
    match master::run(config) {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::Killed) => ExitCode::from(3),
        Ok(Outcome::Failed(msg)) => fail(1, &msg),
        Err(e) => fail(1, &master::with_emfile_hint(format!("{e:#}"))),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    log::line(log::Level::Error, msg);
    ExitCode::from(code)
}
