//! p99probe: attach to a server by PID and explain its latency from the kernel's view.
//!
//! Data flows one way: kernel programs ([`attach`]) → [`events`] → [`recorder`] / [`recording`]
//! → analysis ([`flamegraph`], [`histogram`], over a [`window`]) → files ([`output`]).
//! [`cli`] only turns flags into option structs.

pub mod analysis;
pub mod attach;
pub mod btf;
pub mod capture;
pub mod cli;
pub mod error;
pub mod events;
pub mod flamegraph;
pub mod flight;
pub mod goruntime;
pub mod histogram;
pub mod latency;
pub mod latency_slices;
pub mod latency_watch;
pub mod listeners;
pub mod monitor;
pub mod offcpu_sampling;
pub mod output;
pub mod own_cost;
pub mod perf_map;
pub mod pprof;
pub mod recorder;
pub mod recording;
pub mod report;
pub mod request_end;
pub mod sampling;
pub mod scheduling;
pub mod stacks;
pub mod svg;
pub mod symbolize;
pub mod target;
pub mod thread_table;
pub mod timeline;
pub mod timing_rings;
pub mod trigger;
pub mod verdict;
pub mod wakeup;
pub mod window;
