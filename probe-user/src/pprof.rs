//! `profile.pb.gz`: on-CPU samples and off-CPU (blocked) time of a window as a pprof profile,
//! readable by `go tool pprof` (`-sample_index=off_cpu` for blocking).
//!
//! The profile.proto messages used here are few and flat, so they are encoded directly
//! (varints and length-delimited fields) instead of pulling in a protobuf code generator and
//! `protoc` for the build.

use std::collections::HashMap;
use std::io::Write;

use crate::events::Event;
use crate::recording::Recording;
use crate::sampling::{full_period_ns, sample_weight};
use crate::window::Window;

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, ((field as u64) << 3) | wire_type as u64);
}

fn int_field(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        key(out, field, 0);
        varint(out, value);
    }
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn packed(out: &mut Vec<u8>, field: u32, values: &[u64]) {
    let mut body = Vec::new();
    for v in values {
        varint(&mut body, *v);
    }
    bytes_field(out, field, &body);
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, u64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.id(""); // pprof requires string_table[0] == ""
        s
    }

    fn id(&mut self, text: &str) -> u64 {
        if let Some(id) = self.index.get(text) {
            return *id;
        }
        let id = self.table.len() as u64;
        self.table.push(text.to_string());
        self.index.insert(text.to_string(), id);
        id
    }
}

/// Encodes the uncompressed profile.proto `Profile`.
pub fn encode(recording: &Recording, windows: &[Window]) -> Vec<u8> {
    let hz = recording.meta.settings.sample_hz.max(1);
    let period_ns = full_period_ns(hz);
    let mut strings = Strings::new();
    let mut functions: HashMap<String, u64> = HashMap::new();
    // Each function name is one location (no addresses: the names are already resolved).
    let mut samples: HashMap<Vec<u64>, [u64; 3]> = HashMap::new();
    let mut location_of = |name: &str, strings: &mut Strings| -> u64 {
        let next = functions.len() as u64 + 1;
        let id = *functions.entry(name.to_string()).or_insert(next);
        strings.id(name);
        id
    };
    let inside = |ts: u64| windows.iter().any(|w| w.contains(ts));
    for event in recording.events() {
        let (kernel, user, values) = match event {
            Event::OnCpuSample {
                ts_ns,
                period_ns: sample_period_ns,
                kernel_stack,
                user_stack,
                ..
            } if inside(ts_ns) => {
                // In full-rate samples, as the flame graphs count them.
                let weight = sample_weight(sample_period_ns, hz);
                (kernel_stack, user_stack, [weight, weight * period_ns, 0])
            }
            event @ Event::OffCpu {
                kernel_stack,
                user_stack,
                ..
            } => {
                let Some((end, length)) = event.blocked_interval(false) else {
                    continue;
                };
                let blocked: u64 =
                    event.weigh_off_cpu(windows.iter().map(|w| w.overlap(end, length)).sum());
                if blocked == 0 {
                    continue;
                }
                (kernel_stack, user_stack, [0, 0, blocked])
            }
            _ => continue,
        };
        let mut frames = recording.stack_names(user);
        frames.extend(
            recording
                .stack_names(kernel)
                .into_iter()
                .map(|f| format!("{f} [kernel]")),
        );
        if frames.is_empty() {
            frames.push("[no stack]".into());
        }
        // pprof wants the leaf first.
        let ids: Vec<u64> = frames
            .iter()
            .rev()
            .map(|f| location_of(f, &mut strings))
            .collect();
        let entry = samples.entry(ids).or_insert([0; 3]);
        for (total, v) in entry.iter_mut().zip(values) {
            *total += v;
        }
    }

    let mut out = Vec::new();
    for (kind, unit) in [
        ("samples", "count"),
        ("cpu", "nanoseconds"),
        ("off_cpu", "nanoseconds"),
    ] {
        let mut value_type = Vec::new();
        int_field(&mut value_type, 1, strings.id(kind));
        int_field(&mut value_type, 2, strings.id(unit));
        bytes_field(&mut out, 1, &value_type);
    }
    for (locations, values) in &samples {
        let mut sample = Vec::new();
        packed(&mut sample, 1, locations);
        packed(&mut sample, 2, values);
        bytes_field(&mut out, 2, &sample);
    }
    let mut by_id: Vec<(&String, &u64)> = functions.iter().collect();
    by_id.sort_by_key(|(_, id)| **id);
    for (name, id) in &by_id {
        let mut line = Vec::new();
        int_field(&mut line, 1, **id);
        let mut location = Vec::new();
        int_field(&mut location, 1, **id);
        bytes_field(&mut location, 4, &line);
        bytes_field(&mut out, 4, &location);
        let mut function = Vec::new();
        int_field(&mut function, 1, **id);
        int_field(&mut function, 2, strings.id(name));
        int_field(&mut function, 3, strings.id(name));
        bytes_field(&mut out, 5, &function);
    }
    let period_type = {
        let mut v = Vec::new();
        int_field(&mut v, 1, strings.id("cpu"));
        int_field(&mut v, 2, strings.id("nanoseconds"));
        v
    };
    let default_type = strings.id("cpu");
    for text in &strings.table {
        bytes_field(&mut out, 6, text.as_bytes());
    }
    let first = windows
        .iter()
        .map(|w| w.start_ns)
        .min()
        .unwrap_or(recording.meta.start_ns);
    let unix_ns =
        recording.meta.start_unix_ms * 1_000_000 + first.saturating_sub(recording.meta.start_ns);
    int_field(&mut out, 9, unix_ns);
    int_field(&mut out, 10, windows.iter().map(|w| w.len_ns()).sum());
    bytes_field(&mut out, 11, &period_type);
    int_field(&mut out, 12, period_ns);
    int_field(&mut out, 14, default_type);
    out
}

pub fn encode_gzip(recording: &Recording, windows: &[Window]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(&encode(recording, windows))
        .expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::tests::sample_recording;

    #[test]
    fn varints_match_the_protobuf_spec() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        varint(&mut out, 1);
        assert_eq!(out, [1]);
    }

    #[test]
    fn profile_holds_the_off_cpu_stack_names() {
        let recording = sample_recording();
        let bytes = encode(&recording, &[Window::new(0, u64::MAX)]);
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("stall_here") && text.contains("off_cpu") && text.contains("nanoseconds")
        );
        let gz = encode_gzip(&recording, &[Window::new(0, u64::MAX)]);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}
