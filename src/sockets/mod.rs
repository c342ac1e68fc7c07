//! Listening sockets: how one is opened (`listen`), the life of each slot's sockets
//! (`slots`: who opens, holds, hands over and closes them), steering (`bpf`), who else
//! listens on a port (`ports`), and what the kernel says of TCP sockets (`diag`).

pub mod bpf;
pub mod diag;
pub mod listen;
pub mod ports;
pub mod slots;
