//! devsync: rsync-style delta sync between a local tree and a remote dev box.
//!
//! Data flow: `cli` → `target` (what the user named) → `transport` (a byte stream to a helper)
//! → `session` (the two roles, sender and receiver) over `proto` (frames and messages) →
//! `engine` (scan, plan, signature, delta, apply; synchronous and transport-free).

pub mod cli;
pub mod engine;
pub mod error_chain;
pub mod escape;
pub mod proto;
pub mod server;
pub mod session;
pub mod target;
pub mod trace;
pub mod transport;
pub mod watch;
