//! Checks a `torch.save` archive's pickles before candle's reader sees them.
//!
//! candle's pickle reader executes nothing (globals are only names), but it trusts the file: a
//! string's declared length is allocated before it is read, objects fetched from the memo are deep
//! copies (a few dozen bytes can ask for 2^30 objects), nesting is unbounded (dropping a deeply
//! nested object overflows the stack) and a malformed tensor record can panic. This walks each
//! `data.pkl` once with the same opcodes but only counts objects, so a malicious checkpoint is
//! refused with an error before anything large is allocated.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Largest `data.pkl` read (a 7B model's is a few hundred kilobytes).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Most objects the pickle may make, memo copies included (a large state dict makes ~100k).
pub const MAX_PICKLE_OBJECTS: u64 = 4_000_000;
/// Deepest nesting of objects (a state dict nests about six deep).
pub const MAX_PICKLE_DEPTH: u32 = 128;

/// Objects an entry stands for and how deep they nest.
#[derive(Clone, Copy)]
struct Item {
    objects: u64,
    depth: u32,
    mark: bool,
}

const LEAF: Item = Item { objects: 1, depth: 1, mark: false };

/// Checks every `*data.pkl` of the zip archive at `path`.
pub fn check_archive(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.into_owned();
        if !name.ends_with("data.pkl") {
            continue;
        }
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!("{name} is {} bytes, over the limit of {MAX_PICKLE_BYTES}", entry.size()));
        }
        let mut bytes = Vec::new();
        entry.by_ref().take(MAX_PICKLE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        if bytes.len() as u64 > MAX_PICKLE_BYTES {
            return Err(format!("{name} is over the limit of {MAX_PICKLE_BYTES} bytes"));
        }
        check_pickle(&bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Walks one pickle with candle's opcodes, counting objects instead of making them.
pub fn check_pickle(bytes: &[u8]) -> Result<(), String> {
    let mut walker = Walker { bytes, at: 0, stack: Vec::new(), memo: HashMap::new(), made: 0 };
    walker.run()
}

struct Walker<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// Objects made so far, copies included.
    made: u64,
}

impl Walker<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("{n} bytes declared at offset {} but the pickle ends first", self.at));
        };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<(), String> {
        let rest = &self.bytes[self.at..];
        let n = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        self.at += n;
        Ok(())
    }

    fn push(&mut self, item: Item) -> Result<(), String> {
        self.made = self.made.saturating_add(item.objects);
        if self.made > MAX_PICKLE_OBJECTS {
            return Err(format!("makes over {MAX_PICKLE_OBJECTS} objects"));
        }
        if item.depth > MAX_PICKLE_DEPTH {
            return Err(format!("nests objects over {MAX_PICKLE_DEPTH} deep"));
        }
        self.stack.push(item);
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, String> {
        self.stack.pop().ok_or_else(|| "pops an empty stack".to_string())
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Item>, String> {
        let mark = self.stack.iter().rposition(|i| i.mark).ok_or("no mark on the stack")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A new object holding `children` (counted as made already, so only the parent is new).
    fn parent(children: &[Item]) -> Item {
        let depth = children.iter().map(|c| c.depth).max().unwrap_or(0) + 1;
        let objects = children.iter().map(|c| c.objects).fold(1u64, u64::saturating_add);
        Item { objects, depth, mark: false }
    }

    fn push_parent(&mut self, children: &[Item]) -> Result<(), String> {
        let parent = Self::parent(children);
        // Only the new node is made; the children moved in.
        self.made = self.made.saturating_add(1);
        if self.made > MAX_PICKLE_OBJECTS {
            return Err(format!("makes over {MAX_PICKLE_OBJECTS} objects"));
        }
        if parent.depth > MAX_PICKLE_DEPTH {
            return Err(format!("nests objects over {MAX_PICKLE_DEPTH} deep"));
        }
        self.stack.push(parent);
        Ok(())
    }

    /// Appends `children` to the container on top of the stack.
    fn extend_last(&mut self, children: &[Item]) -> Result<(), String> {
        let last = self.stack.last_mut().ok_or("appends to an empty stack")?;
        for child in children {
            last.objects = last.objects.saturating_add(child.objects);
            last.depth = last.depth.max(child.depth + 1);
        }
        if last.depth > MAX_PICKLE_DEPTH {
            return Err(format!("nests objects over {MAX_PICKLE_DEPTH} deep"));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                b'c' => {
                    self.line()?;
                    self.line()?;
                    self.push(LEAF)?;
                }
                b'K' => {
                    self.take(1)?;
                    self.push(LEAF)?;
                }
                b'M' => {
                    self.take(2)?;
                    self.push(LEAF)?;
                }
                b'J' => {
                    self.take(4)?;
                    self.push(LEAF)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(LEAF)?;
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    self.take(len)?;
                    self.push(LEAF)?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes (at most 8 are read)"));
                    }
                    self.take(n)?;
                    self.push(LEAF)?;
                }
                b'N' | 0x88 | 0x89 | b'}' | b')' | b']' => self.push(LEAF)?,
                b'(' => self.push(Item { mark: true, ..LEAF })?,
                b'Q' => {
                    let id = self.pop()?;
                    self.push_parent(&[id])?;
                }
                b't' | b'd' => {
                    let items = self.pop_to_mark()?;
                    self.push_parent(&items)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    self.push_parent(&items)?;
                }
                b'R' | 0x81 | b'b' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push_parent(&[callable, args])?;
                }
                b'a' => {
                    let value = self.pop()?;
                    self.extend_last(&[value])?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_last(&[key, value])?;
                }
                b'e' | b'u' => {
                    let items = self.pop_to_mark()?;
                    self.extend_last(&items)?;
                }
                b'h' | b'j' => {
                    let id = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let item =
                        *self.memo.get(&id).ok_or_else(|| format!("memo {id} is read before it is set"))?;
                    // candle deep-copies memo entries, on get as on put.
                    self.push(item)?;
                }
                b'q' | b'r' => {
                    let id = if op == b'q' { u32::from(self.u8()?) } else { self.u32()? };
                    let last = *self.stack.last().ok_or("memoizes an empty stack")?;
                    self.made = self.made.saturating_add(last.objects);
                    if self.made > MAX_PICKLE_OBJECTS {
                        return Err(format!("makes over {MAX_PICKLE_OBJECTS} objects"));
                    }
                    self.memo.insert(id, last);
                }
                b'.' => return Ok(()),
                other => return Err(format!("opcode 0x{other:02x} at offset {} is not read", self.at - 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"w": (1, 2)}` as protocol 2 writes it, with a memo put and get.
    const SMALL: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01K\x01K\x02\x86q\x02s.";

    #[test]
    fn a_small_dict_passes() {
        check_pickle(SMALL).unwrap();
    }

    #[test]
    fn memo_copy_bombs_are_refused() {
        // Put a tuple in the memo, then pair two copies of it, 40 times: 2^40 objects.
        let mut bomb = b"\x80\x02)q\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        bomb.push(b'.');
        let err = check_pickle(&bomb).unwrap_err();
        assert!(err.contains("objects"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut deep = b"\x80\x02)".to_vec();
        deep.extend(std::iter::repeat_n(0x85, 100_000));
        deep.push(b'.');
        let err = check_pickle(&deep).unwrap_err();
        assert!(err.contains("deep"), "{err}");
    }

    #[test]
    fn declared_lengths_past_the_end_are_refused() {
        let err = check_pickle(b"\x80\x02X\xff\xff\xff\xffab.").unwrap_err();
        assert!(err.contains("ends first"), "{err}");
        assert!(check_pickle(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00.").is_err());
        assert!(check_pickle(b"\x80\x02h\x05.").unwrap_err().contains("memo 5"));
        assert!(check_pickle(b"\x80\x02").is_err());
        assert!(check_pickle(b"\x80\x02\xff.").unwrap_err().contains("opcode 0xff"));
    }
}
