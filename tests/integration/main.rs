//! Integration tests: the real binary, real workers, real TCP clients on 127.0.0.1.
//!
//! Compiled as one test binary (one link, shared helpers). Tests whose names start with
//! `load_` put load on the machine; nextest runs them one at a time (.config/nextest.toml).

mod bad_input;
mod chaos;
mod control;
mod deploy;
mod launcher;
mod master_robustness;
mod node;
mod operations;
mod real_deploy;
mod recycle;
pub(crate) mod rolling;
mod servers;
mod steering;
mod support;
mod takeover;
