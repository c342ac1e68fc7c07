//! Listening sockets: how one is opened (`listen`), the life of each slot's sockets
//! (`slots`: who opens, holds, hands over and closes them), steering (`bpf`), and who else
//! listens on a port (`ports`).

pub mod bpf;
pub mod listen;
pub mod ports;
pub mod slots;
