//! End-to-end tests: the real `devsync` binary and the real session code, on loopback only.

mod common;
mod cp;
mod faults;
mod keep;
mod local;
mod openssh;
mod protocol;
mod reflink;
mod reliability;
mod remote;
mod serve;
mod session;
mod shell;
mod watch;
