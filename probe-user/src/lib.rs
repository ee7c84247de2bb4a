//! p99probe: attach to a server by PID and explain its latency from the kernel's view.
//!
//! Data flows one way: kernel programs → [`events`] → [`recorder`] → analysis
//! ([`flamegraph`], [`histogram`]) → files. [`cli`] only turns flags into option structs.

pub mod attach;
pub mod btf;
pub mod error;
pub mod events;
pub mod output;
pub mod target;
