//! Byte streams to a helper. `local` starts `devsync helper` as a child process (the same code
//! path as a remote helper, minus SSH). Hands back a reader and writer; knows nothing of the
//! protocol.

pub mod local;
