//! Addresses → function names, with blazesym: kernel addresses through /proc/kallsyms, user
//! addresses through the target's ELF files (symbols, DWARF, inlined functions, Rust/C++
//! demangling). User addresses are converted to file offsets with the memory maps saved at
//! record time, so symbolization still works after the target has exited. Code with no file
//! behind it is named from the target's perf map, where a JIT wrote one (see `perf_map`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use blazesym::symbolize::{
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer,
};
use blazesym::MaybeDefault;
use serde::{Deserialize, Serialize};

use crate::perf_map::PerfMap;
use crate::stacks::KERNEL_NOT_WALKED;
use crate::target::MemoryMap;

/// What the root frame of a kernel stack the kernel did not walk (a calm-rate on-CPU sample's:
/// the kernel code it interrupted, and nothing of how it got there) is called.
pub const KERNEL_NOT_WALKED_NAME: &str = "[kernel stack not walked at the calm rate]";

/// x86_64 kernel addresses live in the upper half of the address space.
pub fn is_kernel_address(addr: u64) -> bool {
    addr >= 0xffff_8000_0000_0000
}

/// The address to look up for frame `index` of a stack (leaf first): every frame but the leaf
/// is a return address, which points after the call and may belong to the next function.
pub fn lookup_address(addr: u64, index: usize) -> u64 {
    if index == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

/// Lookup address → function names at it, outermost first (a function and what was inlined
/// into it at that address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolTable {
    pub frames: BTreeMap<u64, Vec<String>>,
}

impl SymbolTable {
    /// Function names for a whole stack (leaf-first addresses), root first, as flame graphs want.
    pub fn stack_root_first(&self, addrs: &[u64]) -> Vec<String> {
        let mut names = Vec::new();
        for (index, &addr) in addrs.iter().enumerate().rev() {
            let key = lookup_address(addr, index);
            match self.frames.get(&key) {
                Some(frames) => names.extend(frames.iter().cloned()),
                None => names.push(format!("[unknown {addr:#x}]")),
            }
        }
        names
    }
}

/// Frames of our own probe's call path (tracepoint dispatch and the BPF program itself) that a
/// kernel stack captured inside a tracepoint starts with.
fn is_tracing_frame(name: &str) -> bool {
    name.starts_with("bpf_trace_run")
        || name.starts_with("__bpf_trace_")
        || name.starts_with("__traceiter_")
        || name.starts_with("bpf_prog_")
}

/// Drops, from the leaf end of every kernel stack, the frames up to and including the deepest
/// tracing frame among the first few, so stacks start at the code that actually ran (e.g.
/// `__schedule`) and not at the probe that observed it.
pub fn trim_tracing_frames(stacks: &mut BTreeMap<u32, Vec<u64>>, table: &SymbolTable) {
    const LOOK_AT: usize = 8;
    for addrs in stacks.values_mut() {
        if !addrs.first().is_some_and(|&a| is_kernel_address(a)) {
            continue;
        }
        let deepest = addrs
            .iter()
            .take(LOOK_AT)
            .enumerate()
            .filter(|&(index, &addr)| {
                table
                    .frames
                    .get(&lookup_address(addr, index))
                    .is_some_and(|names| names.iter().any(|n| is_tracing_frame(n)))
            })
            .map(|(index, _)| index)
            .next_back();
        if let Some(index) = deepest {
            addrs.drain(..=index);
            // The new leaf is a return address, symbolized at address - 1: store it that way
            // so the leaf lookup (which uses the address as is) finds it.
            if let Some(leaf) = addrs.first_mut() {
                *leaf = leaf.saturating_sub(1);
            }
        }
    }
}

fn module_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn names_of(symbolized: &Symbolized<'_>) -> Option<Vec<String>> {
    let sym = symbolized.as_sym()?;
    let mut names = vec![sym.name.to_string()];
    names.extend(sym.inlined.iter().map(|f| f.name.to_string()));
    Some(names)
}

/// Symbolizes every address in `stacks` (each leaf-first). `pid` is used to open mapped files
/// through /proc/PID/map_files while the target still runs (this survives deleted binaries).
pub fn symbolize_stacks(
    stacks: &BTreeMap<u32, Vec<u64>>,
    maps: &[MemoryMap],
    pid: u32,
) -> SymbolTable {
    let mut table = SymbolTable::default();
    let mut kernel = Vec::new();
    let mut user = Vec::new();
    for addrs in stacks.values() {
        for (index, &addr) in addrs.iter().enumerate() {
            let key = lookup_address(addr, index);
            if addr == KERNEL_NOT_WALKED {
                table
                    .frames
                    .insert(key, vec![KERNEL_NOT_WALKED_NAME.into()]);
            } else if is_kernel_address(addr) {
                kernel.push(key);
            } else {
                user.push(key);
            }
        }
    }
    kernel.sort_unstable();
    kernel.dedup();
    user.sort_unstable();
    user.dedup();

    let symbolizer = Symbolizer::new();
    symbolize_kernel(&symbolizer, &kernel, &mut table);
    symbolize_user(&symbolizer, &user, maps, pid, &mut table);
    table
}

fn symbolize_kernel(symbolizer: &Symbolizer, addrs: &[u64], table: &mut SymbolTable) {
    if addrs.is_empty() {
        return;
    }
    let source = Source::Kernel(Kernel {
        vmlinux: MaybeDefault::None,
        debug_syms: false,
        ..Default::default()
    });
    match symbolizer.symbolize(&source, Input::AbsAddr(addrs)) {
        Ok(results) => {
            for (addr, result) in addrs.iter().zip(results.iter()) {
                let names = names_of(result).unwrap_or_else(|| vec!["[kernel]".into()]);
                table.frames.insert(*addr, names);
            }
        }
        Err(err) => log::warn!("kernel symbolization failed: {err}"),
    }
}

fn symbolize_user(
    symbolizer: &Symbolizer,
    addrs: &[u64],
    maps: &[MemoryMap],
    pid: u32,
    table: &mut SymbolTable,
) {
    // Group by mapping so each file is opened once.
    let mut by_map: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut unmapped = Vec::new();
    for &addr in addrs {
        match maps.iter().position(|m| m.contains(addr)) {
            Some(i) => by_map.entry(i).or_default().push(addr),
            None => unmapped.push(addr),
        }
    }
    // Code with no file behind it: a JIT's, named in its perf map if it writes one.
    let perf_map = if unmapped.is_empty() {
        None
    } else {
        PerfMap::of_process(pid)
    };
    for addr in unmapped {
        let name = perf_map.as_ref().and_then(|map| map.name_at(addr));
        table
            .frames
            .insert(addr, vec![name.unwrap_or("[unknown]").to_string()]);
    }
    for (index, addrs) in by_map {
        let map = &maps[index];
        let fallback = |addr: u64| {
            let offset = addr - map.start + map.file_offset;
            vec![format!("[{}+{offset:#x}]", module_name(&map.path))]
        };
        if map.path.starts_with('[') {
            for addr in addrs {
                table.frames.insert(addr, vec![map.path.clone()]);
            }
            continue;
        }
        let live = format!("/proc/{pid}/map_files/{:x}-{:x}", map.start, map.end);
        let path = if Path::new(&live).exists() {
            live
        } else {
            map.path.clone()
        };
        let offsets: Vec<u64> = addrs
            .iter()
            .map(|a| a - map.start + map.file_offset)
            .collect();
        let source = Source::Elf(Elf::new(&path));
        match symbolizer.symbolize(&source, Input::FileOffset(&offsets)) {
            Ok(results) => {
                for (addr, result) in addrs.iter().zip(results.iter()) {
                    let names = names_of(result).unwrap_or_else(|| fallback(*addr));
                    table.frames.insert(*addr, names);
                }
            }
            Err(err) => {
                log::debug!("symbolizing {}: {err}", map.path);
                for addr in addrs {
                    table.frames.insert(addr, fallback(addr));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_with_a_unique_name() -> usize {
        std::hint::black_box(41) + 1
    }

    #[test]
    fn own_function_symbolizes_through_saved_maps() {
        let addr = a_function_with_a_unique_name as *const () as usize as u64;
        assert_eq!(a_function_with_a_unique_name(), 42);
        let pid = std::process::id();
        let maps = crate::target::executable_maps(pid);
        let stacks: BTreeMap<u32, Vec<u64>> = [(0, vec![addr])].into_iter().collect();
        let table = symbolize_stacks(&stacks, &maps, pid);
        let names = table.stack_root_first(&[addr]);
        assert!(
            names
                .iter()
                .any(|n| n.contains("a_function_with_a_unique_name")),
            "{names:?}"
        );
    }

    #[test]
    fn kernel_addresses_symbolize_from_kallsyms() {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let addr = kallsyms
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let _kind = f.next()?;
                (f.next()? == "do_nanosleep").then_some(addr)
            })
            .expect("do_nanosleep in kallsyms with real addresses (run as root)");
        // A calm-rate sample's kernel stack: the address it interrupted under the marker.
        let not_walked = vec![addr + 4, KERNEL_NOT_WALKED];
        let stacks: BTreeMap<u32, Vec<u64>> = [(1, vec![addr + 4]), (2, not_walked.clone())]
            .into_iter()
            .collect();
        let table = symbolize_stacks(&stacks, &[], 0);
        assert_eq!(table.stack_root_first(&[addr + 4]), vec!["do_nanosleep"]);
        assert_eq!(
            table.stack_root_first(&not_walked),
            vec![KERNEL_NOT_WALKED_NAME, "do_nanosleep"]
        );
    }

    #[test]
    fn tracing_frames_are_trimmed_from_kernel_leaves() {
        let k = 0xffff_ffff_8100_0000u64;
        let table = SymbolTable {
            frames: [
                (k + 0x10, vec!["[bpf]".to_string()]),
                (k + 0x1f, vec!["bpf_trace_run4".to_string()]),
                (k + 0x2f, vec!["__schedule".to_string()]),
                (k + 0x3f, vec!["schedule".to_string()]),
            ]
            .into_iter()
            .collect(),
        };
        let mut stacks: BTreeMap<u32, Vec<u64>> = [
            (1, vec![k + 0x10, k + 0x20, k + 0x30, k + 0x40]),
            (2, vec![0x1000]),
        ]
        .into_iter()
        .collect();
        trim_tracing_frames(&mut stacks, &table);
        assert_eq!(
            table.stack_root_first(&stacks[&1]),
            vec!["schedule", "__schedule"]
        );
        assert_eq!(stacks[&2], vec![0x1000]);
    }

    #[test]
    fn unknown_and_special_mappings() {
        let maps = vec![MemoryMap {
            start: 0x1000,
            end: 0x2000,
            file_offset: 0,
            path: "[vdso]".into(),
        }];
        let stacks: BTreeMap<u32, Vec<u64>> = [(0, vec![0x1010, 0x9999])].into_iter().collect();
        let table = symbolize_stacks(&stacks, &maps, 0);
        // Root first: the caller (second, a return address) comes before the leaf.
        assert_eq!(
            table.stack_root_first(&[0x1010, 0x9999]),
            vec!["[unknown]", "[vdso]"]
        );
        assert_eq!(lookup_address(0x10, 0), 0x10);
        assert_eq!(lookup_address(0x10, 3), 0xf);
    }
}
