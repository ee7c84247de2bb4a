//! The TCP ports the target listens on, which is how the socket hooks tell its connections
//! from everyone else's.
//!
//! Asked of the kernel through sock_diag (what `ss -lt` uses), for listeners only. The
//! alternative, `/proc/PID/net/tcp`, walks every bucket of the established-connection hash to
//! produce its text: milliseconds of agent CPU per read on a machine with a large table, in
//! bursts that delayed the load generator sharing the agent's CPU.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use crate::error::ProbeError;

/// A TCP listener in the target's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub inode: u32,
}

/// Finds the target's listening ports, again and again, cheaply: a listener's owner is looked
/// up in `/proc/PID/fd` only the first time its socket is seen.
pub struct Listeners {
    pid: u32,
    diag: Socket,
    ours: HashSet<u32>,
    others: HashSet<u32>,
}

impl Listeners {
    /// Opens a sock_diag socket in the target's network namespace (a server in a container
    /// listens in its own).
    pub fn open(pid: u32) -> Result<Listeners, ProbeError> {
        Ok(Listeners {
            pid,
            diag: diag_socket_in_netns_of(pid).map_err(|e| listeners_err(pid, e))?,
            ours: HashSet::new(),
            others: HashSet::new(),
        })
    }

    /// The target's listening ports, sorted.
    pub fn ports(&mut self) -> Result<Vec<u16>, ProbeError> {
        let listeners = dump_listeners(&self.diag).map_err(|e| listeners_err(self.pid, e))?;
        let live: HashSet<u32> = listeners.iter().map(|l| l.inode).collect();
        // Closed listeners' inodes can be reused by new sockets: forget them.
        self.ours.retain(|inode| live.contains(inode));
        self.others.retain(|inode| live.contains(inode));
        if live
            .iter()
            .any(|inode| !self.ours.contains(inode) && !self.others.contains(inode))
        {
            let held = socket_inodes(self.pid);
            for &inode in &live {
                if held.contains(&inode) {
                    self.ours.insert(inode);
                } else {
                    self.others.insert(inode);
                }
            }
        }
        let mut ports: Vec<u16> = listeners
            .iter()
            .filter(|l| self.ours.contains(&l.inode))
            .map(|l| l.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }
}

fn listeners_err(pid: u32, e: std::io::Error) -> ProbeError {
    ProbeError::Listeners(format!("PID {pid}: {e}"))
}

fn diag_socket_in_netns_of(pid: u32) -> std::io::Result<Socket> {
    let target_ns = File::open(format!("/proc/{pid}/ns/net"))?;
    let own_ns = fs::metadata("/proc/self/ns/net")?;
    let target_meta = target_ns.metadata()?;
    if (target_meta.dev(), target_meta.ino()) == (own_ns.dev(), own_ns.ino()) {
        return connected_diag_socket();
    }
    // A socket stays in the namespace it was created in; only a throwaway thread switches.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace fd; it affects this thread only.
                if unsafe { libc::setns(target_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                connected_diag_socket()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

fn connected_diag_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Every TCP listener (IPv4 and IPv6) of the socket's namespace. The kernel walks only its
/// listening hash for a LISTEN-only dump.
fn dump_listeners(diag: &Socket) -> std::io::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        diag.send(&bytes, 0)?;
        read_dump(diag, &mut listeners)?;
    }
    Ok(listeners)
}

/// Reads one dump's replies up to its end.
fn read_dump(diag: &Socket, listeners: &mut Vec<Listener>) -> std::io::Result<()> {
    let malformed = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    loop {
        let (datagram, _) = diag.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .map_err(|e| malformed(e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => listeners
                    .push(Listener {
                        port: response.header.socket_id.source_port,
                        inode: response.header.inode,
                    }),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return Err(match error.code {
                        Some(code) => std::io::Error::from_raw_os_error(-code.get()),
                        None => malformed("unexpected acknowledgement".into()),
                    })
                }
                _ => {}
            }
            if length == 0 || length > rest.len() {
                return Err(malformed(format!("message length {length}")));
            }
            // Messages in a datagram start on 4-byte boundaries (NLMSG_ALIGN).
            rest = &rest[length.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// Inodes of the sockets the process holds open.
fn socket_inodes(pid: u32) -> HashSet<u32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let link = fs::read_link(entry.path()).ok()?;
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn finds_own_listeners_and_not_others() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0");
        let mut listeners = Listeners::open(std::process::id()).unwrap();
        let mut expected = vec![v4.local_addr().unwrap().port()];
        if let Ok(v6) = &v6 {
            expected.push(v6.local_addr().unwrap().port());
        }
        expected.sort_unstable();
        assert_eq!(listeners.ports().unwrap(), expected);
        drop(v4);
        // Asked again: a listener closed since is gone.
        assert_eq!(listeners.ports().unwrap().len(), expected.len() - 1);
    }
}
