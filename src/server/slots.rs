//! Connection slots with eviction of the oldest idle connection, for servers that must keep
//! answering while hostile clients hold connections open.
//!
//! A plain connection limit ("the next ones are refused") lets anyone who holds that many silent
//! connections refuse everybody else: 64 silent sockets, reopened whenever they were cut, made
//! every HAProxy `health_check` on the monitor port fail. An idle socket costs the server almost
//! nothing (a descriptor and a few hundred bytes), so [`Slots`] allows many at once and, when all
//! are taken, makes room for a newcomer by evicting the connection that has been *idle* the
//! longest. Idle means anything but running a request: waiting for the first complete request,
//! waiting for the next one, writing or lingering after a reply. A connection is protected only
//! while it runs a request ([`Slot::busy`] to [`Slot::idle`]); the newcomer is refused only when
//! every slot is running one, which the servers bound separately (each command or request is
//! short, and the slow ones are limited in number).
//!
//! Why the oldest: a legitimate client sends its request right after connecting (HAProxy's
//! `tcp-check send` follows its connect at once), so it is the newest idle connection for the
//! short time it is idle, and a flood of connections would have to open [`Slots::capacity`] new
//! ones in that time to push it out. The age counts from the start of the current idle period,
//! not from the last byte received, so a client that trickles a partial line does not look young.
//!
//! An evicted connection's owner learns it from [`Slot::evicted`] (a future to race against its
//! reads and writes) and closes; its slot is handed to the newcomer at once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

/// A fixed number of connection slots.
pub struct Slots {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    next_id: u64,
}

struct Entry {
    id: u64,
    busy: bool,
    /// Start of the current idle period.
    since: Instant,
    evict: Arc<Notify>,
}

/// What [`Slots::admit`] gave.
pub enum Admit {
    /// A free slot.
    Free(Slot),
    /// The slot of an idle connection that was evicted to make room.
    Evicted(Slot),
    /// Every slot runs a request.
    Full,
}

/// A connection's slot, released on drop (unless it was evicted: then the newcomer owns it).
pub struct Slot {
    slots: Arc<Slots>,
    index: usize,
    id: u64,
    evict: Arc<Notify>,
}

impl Slots {
    /// `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Arc<Slots> {
        let capacity = capacity.max(1);
        Arc::new(Slots {
            inner: Mutex::new(Inner {
                entries: (0..capacity).map(|_| None).collect(),
                free: (0..capacity).rev().collect(),
                next_id: 0,
            }),
            capacity,
        })
    }

    /// How many connections may hold a slot at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Connections holding a slot now.
    pub fn in_use(&self) -> usize {
        self.capacity - self.lock().free.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection (idle from now): a free one, else the one of the connection
    /// idle the longest, which is told to close.
    pub fn admit(self: &Arc<Self>) -> Admit {
        let now = Instant::now();
        let mut inner = self.lock();
        let (index, evicted) = match inner.free.pop() {
            Some(i) => (i, false),
            None => {
                let oldest = inner
                    .entries
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| e.as_ref().filter(|e| !e.busy).map(|e| (i, e.since)))
                    .min_by_key(|&(_, since)| since);
                let Some((i, _)) = oldest else { return Admit::Full };
                if let Some(old) = inner.entries[i].take() {
                    old.evict.notify_one();
                }
                (i, true)
            }
        };
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = Arc::new(Notify::new());
        inner.entries[index] = Some(Entry { id, busy: false, since: now, evict: Arc::clone(&evict) });
        drop(inner);
        let slot = Slot { slots: Arc::clone(self), index, id, evict };
        if evicted {
            Admit::Evicted(slot)
        } else {
            Admit::Free(slot)
        }
    }
}

impl Slot {
    /// Runs `f` on this slot's entry, if the slot is still ours.
    fn with<R>(&self, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let mut inner = self.slots.lock();
        inner.entries[self.index].as_mut().filter(|e| e.id == self.id).map(f)
    }

    /// Marks the connection as running a request: it cannot be evicted until [`Slot::idle`].
    /// `false` if it was evicted already (then the connection must close without running it).
    pub fn busy(&self) -> bool {
        self.with(|e| e.busy = true).is_some()
    }

    /// Marks the connection as idle from now: evictable, the newest of the idle ones.
    pub fn idle(&self) {
        self.with(|e| {
            e.busy = false;
            e.since = Instant::now();
        });
    }

    /// Resolves once the connection has been evicted (at once if it already was).
    pub async fn evicted(&self) {
        if self.with(|_| ()).is_none() {
            return;
        }
        self.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        if inner.entries[self.index].as_ref().is_some_and(|e| e.id == self.id) {
            inner.entries[self.index] = None;
            inner.free.push(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(a: Admit) -> (Slot, bool) {
        match a {
            Admit::Free(s) => (s, false),
            Admit::Evicted(s) => (s, true),
            Admit::Full => panic!("full"),
        }
    }

    #[tokio::test]
    async fn evicts_the_longest_idle_and_never_a_busy_one() {
        let slots = Slots::new(3);
        let (a, ev) = slot(slots.admit());
        assert!(!ev);
        let (b, _) = slot(slots.admit());
        let (c, _) = slot(slots.admit());
        assert_eq!(slots.in_use(), 3);
        // `a` is busy, so `b` (idle the longest) goes.
        assert!(a.busy());
        let (d, ev) = slot(slots.admit());
        assert!(ev);
        b.evicted().await;
        assert!(!b.busy(), "an evicted connection must not start a request");
        // `c` idle again after a request: now younger than `d`, so `d` goes next.
        assert!(c.busy());
        c.idle();
        let (e, ev) = slot(slots.admit());
        assert!(ev);
        d.evicted().await;
        // Dropping evicted slots frees nothing: their slots belong to the newcomers.
        drop((b, d));
        assert_eq!(slots.in_use(), 3);
        // Everything busy: full.
        assert!(c.busy() && e.busy());
        assert!(matches!(slots.admit(), Admit::Full));
        // A slot dropped normally is free again.
        drop(a);
        assert_eq!(slots.in_use(), 2);
        let (_f, ev) = slot(slots.admit());
        assert!(!ev);
        assert_eq!(slots.capacity(), 3);
    }
}
