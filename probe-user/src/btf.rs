//! Byte offsets of kernel struct members, read from the running kernel's BTF.
//!
//! aya-ebpf has no CO-RE field relocations, so the kernel programs read `task_struct` fields at
//! offsets the agent finds here and passes in as globals. Only struct/union member lookup is
//! needed (through anonymous members), which is a small, well-specified walk of the BTF type
//! section; a full BTF library would bring far more than this one question needs.

use std::collections::HashMap;
use std::path::Path;

use crate::error::ProbeError;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Composite {
    members: Vec<Member>,
}

/// The struct and union layouts of one BTF blob.
pub struct KernelBtf {
    composites: HashMap<u32, Composite>,
    by_name: HashMap<String, u32>,
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, ProbeError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ProbeError> {
        let bytes = std::fs::read(path).map_err(|e| ProbeError::MissingBtf {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&bytes).map_err(|reason| ProbeError::MissingBtf {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let u16_at = |o: usize| -> Result<u16, String> {
            data.get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or_else(|| "truncated BTF".to_string())
        };
        let u32_at = |o: usize| -> Result<u32, String> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| "truncated BTF".to_string())
        };
        if u16_at(0)? != BTF_MAGIC {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings_start = hdr_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .ok_or("BTF string section out of bounds")?;
        let name_at = |off: u32| -> String {
            let tail = strings.get(off as usize..).unwrap_or(&[]);
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };

        let mut composites = HashMap::new();
        let mut by_name = HashMap::new();
        let mut pos = types_start;
        let mut type_id = 1u32;
        while pos < types_end {
            let name_off = u32_at(pos)?;
            let info = u32_at(pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let raw_offset = u32_at(m + 8)?;
                        members.push(Member {
                            name: name_at(u32_at(m)?),
                            type_id: u32_at(m + 4)?,
                            // With kind_flag the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag {
                                raw_offset & 0xff_ffff
                            } else {
                                raw_offset
                            },
                        });
                    }
                    pos += vlen * 12;
                    let name = name_at(name_off);
                    if kind == KIND_STRUCT && !name.is_empty() {
                        by_name.entry(name).or_insert(type_id);
                    }
                    composites.insert(type_id, Composite { members });
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => pos += 12,
                KIND_ENUM | KIND_FUNC_PROTO => pos += vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => pos += vlen * 12,
                _ => {}
            }
            type_id += 1;
        }
        Ok(KernelBtf {
            composites,
            by_name,
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, ProbeError> {
        let missing = || ProbeError::KernelLayout(format!("struct {name} has no member {member}"));
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| ProbeError::KernelLayout(format!("no struct {name} in BTF")))?;
        self.find_bits(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(missing)
    }

    fn find_bits(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let composite = self.composites.get(&id)?;
        for m in &composite.members {
            if m.name == member {
                return Some(m.bit_offset);
            }
        }
        composite
            .members
            .iter()
            .filter(|m| m.name.is_empty())
            .find_map(|m| {
                self.find_bits(m.type_id, member, depth + 1)
                    .map(|inner| m.bit_offset + inner)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob with `struct outer { int a; union { int b; int c; }; }`.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0";
        let s = |needle: &str| -> u32 {
            let hay = std::str::from_utf8(strings).unwrap();
            hay.find(&format!("\0{needle}\0")).unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { b, c }
        push(&[0, (KIND_UNION << 24) | 2, 4, s("b"), 1, 0, s("c"), 1, 0]);
        // 3: struct outer { a @0, <anon> @32 bits }
        push(&[
            s("outer"),
            (KIND_STRUCT << 24) | 2,
            8,
            s("a"),
            1,
            0,
            0,
            2,
            32,
        ]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = KernelBtf::parse(&tiny_btf()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 4);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 4);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(KernelBtf::parse(b"not btf at all, definitely").is_err());
        assert!(KernelBtf::parse(&[]).is_err());
    }

    #[test]
    fn running_kernel_task_struct_offsets_are_plausible() {
        let btf = KernelBtf::from_sys_fs().expect("this machine has /sys/kernel/btf/vmlinux");
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        // pid_t pid; pid_t tgid; are adjacent in every kernel since 2.6.
        assert_eq!(tgid, pid + 4);
        assert!(btf.member_offset("task_struct", "__state").is_ok());
    }
}
