//! Errors a user can act on. Each renders as one line; `main` prints it and exits non-zero.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("no process with PID {0} (is the server running, and in this PID namespace?)")]
    NoSuchProcess(u32),

    #[error("p99probe needs root, or CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN on older kernels); run it with sudo")]
    NotPrivileged,

    #[error("kernel BTF is not usable at {path}: {reason} (needs CONFIG_DEBUG_INFO_BTF=y)")]
    MissingBtf { path: String, reason: String },

    #[error("kernel layout not as expected: {0}")]
    KernelLayout(String),

    #[error("cannot write output {path}: {reason}")]
    Unwritable { path: String, reason: String },

    #[error("corrupt recording {path}: {reason}")]
    CorruptRecording { path: String, reason: String },

    #[error("cannot read recording {path}: {reason}")]
    UnreadableRecording { path: String, reason: String },

    #[error("no scheduler hook could be attached: {0}")]
    NoSchedulerHook(String),

    #[error("cannot list the target's TCP listeners: {0}")]
    Listeners(String),

    #[error("attaching {program} failed: {reason}")]
    Attach { program: String, reason: String },

    #[error("{0}")]
    InvalidArgument(String),
}
