//! A min-heap of events keyed by time, ties broken by insertion order.
//! Entries are never removed early: their owners recognise stale ones when
//! they pop (lazy invalidation), so every operation is O(log n).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

#[derive(Debug)]
struct Entry<E> {
    at_ns: u64,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ns, self.seq) == (other.at_ns, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at_ns, self.seq).cmp(&(other.at_ns, other.seq))
    }
}

#[derive(Debug)]
pub struct Timers<E> {
    heap: BinaryHeap<Reverse<Entry<E>>>,
    seq: u64,
}

impl<E> Default for Timers<E> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E> Timers<E> {
    pub fn push(&mut self, at_ns: u64, event: E) {
        self.heap.push(Reverse(Entry {
            at_ns,
            seq: self.seq,
            event,
        }));
        self.seq = self.seq.wrapping_add(1);
    }

    /// The earliest event's time.
    pub fn next_at(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(e)| e.at_ns)
    }

    /// The earliest event, if it is due at `now_ns`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u64, E)> {
        if self.next_at()? > now_ns {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| (e.at_ns, e.event))
    }

    pub fn clear(&mut self) {
        self.heap.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_then_insertion_order() {
        let mut t = Timers::default();
        t.push(30, 'a');
        t.push(10, 'b');
        t.push(10, 'c');
        t.push(20, 'd');
        assert_eq!(t.next_at(), Some(10));
        assert_eq!(t.pop_due(5), None);
        let mut got = Vec::new();
        while let Some((_, e)) = t.pop_due(25) {
            got.push(e);
        }
        assert_eq!(got, vec!['b', 'c', 'd']);
        assert_eq!(t.len(), 1);
    }
}
