//! One metric's series by label values: the table [`Family::with_labels`](super::Family) reads
//! without a lock.
//!
//! Each metric owns one [`LabelTable`], shared by every `Family` handle of that metric and by every
//! thread. Readers take no lock and execute no locked instruction: a lookup is a keyed hash of the
//! label bytes, then a linear probe of an open-addressing table of write-once slots, comparing the
//! stored hash and then the bytes. Inserts come from the registration path only, under the store
//! lock, so they are serialised; the table is in safe code, so an unserialised insert could at worst
//! leave an entry unfindable (its lookups then take the locked path), never break memory safety.
//!
//! - Entries are never removed and never change (series are never removed and their slots never
//!   move, not even across `fork`), so a reader that sees an entry may keep it for the life of the
//!   process. An empty slot ends a probe: the label set is not in the table (yet).
//! - Growing builds a table twice as large with every entry, then publishes it as the current
//!   level. A reader still probing the previous level finds every entry that level holds; one it
//!   misses goes to the locked path, which sees everything. Previous levels are kept (they are
//!   at most as large as the current one together), so nothing a reader holds is ever freed.
//! - `fork`: the store's prepare hook holds the store lock, so no insert (no `OnceLock`
//!   initialisation, which a child could otherwise find half-done forever) is under way at the
//!   fork; the child inherits a consistent copy, whose slots still point at valid series (the
//!   child's file is mapped at the parent's address).
//! - The hash is seeded per table from `getrandom`: label values can come from outside (a server
//!   that labels by path), and with an unknown seed a hostile label set cannot make its keys
//!   collide on purpose. It is a folded 64×64→128-bit multiply over 16-byte words, the scheme of
//!   `foldhash`, without the `Hasher` round trip per `&str` (its prefix-free length writes and
//!   per-call state updates cost more than the bytes of a short label).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::Resolved;
#[cfg(test)]
use super::Slots;

/// Slots of the first level.
const FIRST_LEVEL: usize = 8;
/// Levels a table can grow to; the last has `FIRST_LEVEL << (LEVELS - 1)` slots, far more series
/// than the largest reserve can hold.
const LEVELS: usize = 32;

/// One series: its label values (back to back, with their end offsets) and what they resolve to.
struct Entry {
    hash: u64,
    bytes: Box<[u8]>,
    ends: Box<[u32]>,
    resolved: Resolved,
}

impl Entry {
    /// Whether `values` are this entry's label values.
    #[inline]
    fn is(&self, values: &[&str]) -> bool {
        if values.len() != self.ends.len() {
            return false;
        }
        let mut start = 0;
        for (v, &end) in values.iter().zip(self.ends.iter()) {
            let end = end as usize;
            match self.bytes.get(start..end) {
                Some(stored) if same_bytes(v.as_bytes(), stored) => start = end,
                _ => return false,
            }
        }
        true
    }
}

/// The series of one metric by label values; see the module docs.
pub(crate) struct LabelTable {
    seed: [u64; 2],
    /// Index into `levels` of the newest level.
    current: AtomicUsize,
    /// Level `k` has `FIRST_LEVEL << k` slots, once it exists.
    levels: [OnceLock<Box<[OnceLock<&'static Entry>]>>; LEVELS],
    /// Entries inserted (the insert path's count; readers never look at it).
    len: AtomicUsize,
}

impl LabelTable {
    /// A new empty table with a fresh random seed. Leaked: a metric lives as long as its store.
    pub(super) fn leak() -> &'static LabelTable {
        let id = crate::layout::region::random_id();
        let (a, b) = id.split_at(8);
        let word = |s: &[u8]| s.iter().rev().fold(0u64, |w, b| (w << 8) | u64::from(*b));
        Box::leak(Box::new(LabelTable {
            seed: [word(a), word(b)],
            current: AtomicUsize::new(0),
            levels: [const { OnceLock::new() }; LEVELS],
            len: AtomicUsize::new(0),
        }))
    }

    /// The series `values` resolves to, if it is in the table. No lock.
    #[inline]
    pub(super) fn get(&self, values: &[&str]) -> Option<Resolved> {
        let hash = hash(&self.seed, values);
        let level = self.levels.get(self.current.load(Ordering::Acquire))?.get()?;
        let mask = level.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let entry = level.get(i)?.get()?;
            if entry.hash == hash && entry.is(values) {
                return Some(entry.resolved);
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds the series `values` (not yet in the table). Called under the store lock.
    pub(super) fn insert(&self, values: &[&str], resolved: Resolved) {
        let mut bytes = Vec::with_capacity(values.iter().map(|v| v.len()).sum());
        let mut ends = Vec::with_capacity(values.len());
        for v in values {
            bytes.extend_from_slice(v.as_bytes());
            // Label values are at most layout::MAX_STRING bytes each; refuse rather than truncate.
            let Ok(end) = u32::try_from(bytes.len()) else { return };
            ends.push(end);
        }
        let entry: &'static Entry = Box::leak(Box::new(Entry {
            hash: hash(&self.seed, values),
            bytes: bytes.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
            resolved,
        }));
        let len = self.len.load(Ordering::Relaxed) + 1;
        let k = self.current.load(Ordering::Relaxed);
        let level = match self.levels.get(k).and_then(OnceLock::get) {
            // At most half full: probes stay short.
            Some(level) if 2 * len <= level.len() => level,
            Some(full) => {
                let Some(next) = self.levels.get(k + 1) else { return };
                let bigger = new_level(full.len() * 2);
                for old in full.iter().filter_map(OnceLock::get) {
                    place(&bigger, old);
                }
                let _ = next.set(bigger);
                let Some(level) = next.get() else { return };
                place(level, entry);
                self.len.store(len, Ordering::Relaxed);
                // Publishes the level with every entry placed above.
                self.current.store(k + 1, Ordering::Release);
                return;
            }
            None => {
                let Some(first) = self.levels.first() else { return };
                let _ = first.set(new_level(FIRST_LEVEL));
                let Some(level) = first.get() else { return };
                level
            }
        };
        place(level, entry);
        self.len.store(len, Ordering::Relaxed);
    }
}

fn new_level(slots: usize) -> Box<[OnceLock<&'static Entry>]> {
    (0..slots).map(|_| OnceLock::new()).collect()
}

/// Puts `entry` in the first free slot of its probe sequence.
fn place(level: &[OnceLock<&'static Entry>], entry: &'static Entry) {
    let mask = level.len() - 1;
    let mut i = entry.hash as usize & mask;
    // The level is at most half full, so a free slot comes; the bound only guards the loop.
    for _ in 0..level.len() {
        if let Some(slot) = level.get(i) {
            if slot.set(entry).is_ok() {
                return;
            }
        }
        i = (i + 1) & mask;
    }
}

/// Multiplies and folds the 128-bit product: the mixing step of foldhash and wyhash.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A short byte string (at most 16 bytes) as two words that, for a given length, determine the
/// bytes: the first and last 8 (or 4) bytes overlap to cover them all; 1–3 bytes are the first,
/// middle and last byte.
#[inline]
fn words(b: &[u8]) -> (u64, u64) {
    let n = b.len();
    let le8 = |s: &[u8]| s.try_into().map_or(0, u64::from_le_bytes);
    let le4 = |s: &[u8]| s.try_into().map_or(0, |a: [u8; 4]| u64::from(u32::from_le_bytes(a)));
    match n {
        8..=16 => (le8(&b[..8]), le8(&b[n - 8..])),
        4..=7 => (le4(&b[..4]), le4(&b[n - 4..])),
        1..=3 => (u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16, 0),
        _ => (0, 0),
    }
}

/// `a == b`, without a `memcmp` call for the short strings labels usually are.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() <= 16 {
        words(a) == words(b)
    } else {
        a == b
    }
}

/// The seeded hash of a label set: each value's length and bytes folded into the running state.
#[inline]
fn hash(seed: &[u64; 2], values: &[&str]) -> u64 {
    let mut h = seed[0];
    for v in values {
        let b = v.as_bytes();
        let (lo, hi) = if b.len() <= 16 {
            words(b)
        } else {
            let mut chunks = b.chunks_exact(16);
            for c in &mut chunks {
                let (lo, hi) = c.split_at(8);
                h = fold(
                    lo.try_into().map_or(0, u64::from_le_bytes) ^ seed[1] ^ h,
                    hi.try_into().map_or(0, u64::from_le_bytes) ^ seed[0],
                );
            }
            words(&b[b.len() - 16..])
        };
        h = fold(lo ^ seed[1] ^ h, hi ^ seed[0] ^ b.len() as u64);
    }
    fold(h, seed[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    static SLOT: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

    fn resolved(i: usize) -> Resolved {
        Resolved { slots: Slots { values: &SLOT[i % 4..], dropped: None }, bounds: &[], states: &[] }
    }

    #[test]
    fn words_determine_short_strings() {
        // For each length up to 16, changing any one byte changes the words.
        for n in 0..=16usize {
            let base: Vec<u8> = (0..n as u8).map(|i| b'a' + i).collect();
            assert_eq!(words(&base), words(&base.clone()));
            for p in 0..n {
                for x in [0u8, b'A', 0xff] {
                    let mut other = base.clone();
                    other[p] = x;
                    assert_ne!(words(&base), words(&other), "length {n}, byte {p} = {x}");
                    assert!(!same_bytes(&base, &other));
                }
            }
        }
        assert!(same_bytes(&[7u8; 40], &[7u8; 40]));
        assert!(!same_bytes(&[7u8; 40], &[[7u8; 39].as_slice(), &[8]].concat()));
        assert!(!same_bytes(b"GET", b"GETS"));
    }

    #[test]
    fn lookups_find_exactly_what_was_inserted_across_growth() {
        let t = LabelTable::leak();
        assert!(t.get(&["a"]).is_none(), "empty table");
        let labels: Vec<String> = (0..5000).map(|i| format!("v{i}{}", "x".repeat(i % 40))).collect();
        for (i, l) in labels.iter().enumerate() {
            assert!(t.get(&[l, "GET"]).is_none());
            t.insert(&[l, "GET"], resolved(i));
            for (j, m) in labels[..=i].iter().enumerate().step_by(97) {
                let got = t.get(&[m, "GET"]).map(|r| r.slots.values.as_ptr());
                assert_eq!(got, Some(resolved(j).slots.values.as_ptr()), "{m}");
            }
        }
        assert_eq!(t.current.load(Ordering::Relaxed), 11, "5000 entries: 16384 = 8 << 11 slots");
        for (i, l) in labels.iter().enumerate() {
            assert_eq!(t.get(&[l, "GET"]).map(|r| r.slots.values.len()), Some(4 - i % 4));
            assert!(t.get(&[l, "GE"]).is_none());
            assert!(t.get(&[l]).is_none(), "another label count");
        }
    }

    #[test]
    fn label_boundaries_are_part_of_the_key() {
        let t = LabelTable::leak();
        t.insert(&["ab", ""], resolved(0));
        t.insert(&["", ""], resolved(1));
        assert!(t.get(&["a", "b"]).is_none());
        assert!(t.get(&["", "ab"]).is_none());
        assert!(t.get(&["ab", ""]).is_some());
        assert!(t.get(&["", ""]).is_some());
        assert!(t.get(&[""]).is_none());
    }
}
