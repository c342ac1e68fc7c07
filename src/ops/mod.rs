//! What operators and their tools talk to: the control socket and its client, waiting
//! commands, status, metrics, systemd, the workers' notify socket, and `doctor`.

pub mod client;
pub mod conns;
pub mod control;
pub mod doctor;
pub mod metrics;
pub mod notify;
pub mod status;
pub mod systemd;
pub mod waiting;
