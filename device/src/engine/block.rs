//! One in-timeline reorder block: `size` consecutive arrivals of a timeline
//! that complete in the order of their [`ReorderSlot::rank`]s.
//!
//! Rules (see [`ReorderSlot`]):
//! - members complete in rank order, each no earlier than its own due time;
//! - when the lowest-ranked member that has arrived is due but lower ranks
//!   have not arrived, it waits at most `hold_ns` past its due time; then
//!   those ranks are *skipped*: it completes, and when a skipped member does
//!   arrive it completes at its due time, in arrival order among the skipped
//!   ones, without waiting for (or holding up) the ranked members;
//! - a hung member leaves the order (its rank counts as done);
//! - the block ends when it is *closed* (all `size` members arrived, or the
//!   timeline moved on to another block or to an unordered fence) and every
//!   member that did arrive is done. Nothing completes outside its block.
//!
//! Picking the next member scans the ranks after the lowest pending one, so
//! it costs O(size); block sizes are small (a reorder window).

use std::collections::VecDeque;

use crate::fault::ReorderSlot;

use super::Key;

/// Largest block the engine accepts; bigger slots are treated as unordered.
pub const MAX_BLOCK: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Not arrived yet.
    Waiting,
    Pending(Key),
    /// Completed, or hung (out of the order).
    Done,
    /// Given up waiting for; arrives (if ever) into the `late` queue.
    Skipped,
}

/// Which member [`Block::next`] picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The member of this rank; `skips`: lower ranks still waiting are
    /// given up when it completes.
    Ranked { rank: u32, skips: bool },
    /// The first skipped member that arrived late.
    Late,
}

/// What the block can do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// `key` may complete at `at_ns`.
    Ready { at_ns: u64, key: Key, pick: Pick },
    /// Nothing can complete until another member arrives.
    Idle,
    /// Every member is accounted for: the block is over.
    Finished,
}

#[derive(Debug)]
pub struct Block {
    id: u64,
    hold_ns: u64,
    /// Members by rank.
    slots: Vec<Slot>,
    arrived: u32,
    closed: bool,
    /// Ranks below this are done or skipped.
    next_rank: u32,
    late: VecDeque<Key>,
}

impl Block {
    /// A new block for `slot`'s block, or `None` when the slot is not
    /// usable (empty or oversized block, rank outside it).
    pub fn open(slot: &ReorderSlot) -> Option<Block> {
        if slot.size == 0 || slot.size > MAX_BLOCK || slot.rank >= slot.size {
            return None;
        }
        Some(Block {
            id: slot.block,
            hold_ns: slot.hold_ns,
            slots: vec![Slot::Waiting; slot.size as usize],
            arrived: 0,
            closed: false,
            next_rank: 0,
            late: VecDeque::new(),
        })
    }

    /// Takes a member that arrived with `slot`; `hung` members only take up
    /// their rank. Returns false (and changes nothing) when the fence does
    /// not belong here: another block, a closed block, a rank already used.
    pub fn admit(&mut self, slot: &ReorderSlot, key: Key, hung: bool) -> bool {
        if self.closed || slot.block != self.id || slot.size as usize != self.slots.len() {
            return false;
        }
        let Some(s) = self.slots.get_mut(slot.rank as usize) else {
            return false;
        };
        match (*s, hung) {
            (Slot::Waiting, false) => *s = Slot::Pending(key),
            (Slot::Waiting, true) => *s = Slot::Done,
            (Slot::Skipped, false) => self.late.push_back(key),
            (Slot::Skipped, true) => {}
            (Slot::Pending(_) | Slot::Done, _) => return false,
        }
        self.arrived += 1;
        if self.arrived as usize == self.slots.len() {
            self.closed = true;
        }
        true
    }

    /// No more members will arrive: ranks still waiting are skipped.
    pub fn close(&mut self) {
        self.closed = true;
        for s in &mut self.slots {
            if *s == Slot::Waiting {
                *s = Slot::Skipped;
            }
        }
    }

    /// The next member allowed to complete and when, given each pending
    /// member's due time.
    pub fn next(&mut self, due: impl Fn(Key) -> u64) -> Next {
        self.skip_finished_ranks();
        let ranked = self.ranked_candidate(&due);
        let late = self.late.front().map(|&k| (due(k), k, Pick::Late));
        let best = match (ranked, late) {
            (Some(r), Some(l)) => Some(if l.0 < r.0 { l } else { r }),
            (r, l) => r.or(l),
        };
        match best {
            Some((at_ns, key, pick)) => Next::Ready { at_ns, key, pick },
            None if self.is_finished() => Next::Finished,
            None => Next::Idle,
        }
    }

    /// Records that the member `pick` names completed.
    pub fn completed(&mut self, pick: Pick) {
        match pick {
            Pick::Late => {
                self.late.pop_front();
            }
            Pick::Ranked { rank, skips } => {
                if skips {
                    for s in &mut self.slots[self.next_rank as usize..rank as usize] {
                        if *s == Slot::Waiting {
                            *s = Slot::Skipped;
                        }
                    }
                }
                if let Some(s) = self.slots.get_mut(rank as usize) {
                    *s = Slot::Done;
                }
            }
        }
    }

    /// Every member still waiting to complete, ranked ones in rank order
    /// then late ones in arrival order.
    pub fn pending(&self) -> impl Iterator<Item = Key> + '_ {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Pending(k) => Some(*k),
                _ => None,
            })
            .chain(self.late.iter().copied())
    }

    fn skip_finished_ranks(&mut self) {
        while let Some(Slot::Done | Slot::Skipped) = self.slots.get(self.next_rank as usize) {
            self.next_rank += 1;
        }
    }

    fn ranked_candidate(&self, due: &impl Fn(Key) -> u64) -> Option<(u64, Key, Pick)> {
        let first = self.next_rank as usize;
        match self.slots.get(first)? {
            Slot::Pending(k) => Some((
                due(*k),
                *k,
                Pick::Ranked {
                    rank: self.next_rank,
                    skips: false,
                },
            )),
            Slot::Waiting => {
                // The lowest-ranked member that has arrived waits for the
                // missing lower ranks at most hold_ns past its due time.
                let (rank, key) =
                    self.slots
                        .iter()
                        .enumerate()
                        .skip(first + 1)
                        .find_map(|(r, s)| match s {
                            Slot::Pending(k) => Some((r, *k)),
                            _ => None,
                        })?;
                Some((
                    due(key).saturating_add(self.hold_ns),
                    key,
                    Pick::Ranked {
                        rank: rank as u32,
                        skips: true,
                    },
                ))
            }
            Slot::Done | Slot::Skipped => None,
        }
    }

    /// Over once no member can arrive and none is waiting to complete. An
    /// open block with nothing pending blocks nothing: any later arrival of
    /// its timeline either joins it or closes it.
    fn is_finished(&self) -> bool {
        self.closed
            && self.late.is_empty()
            && !self.slots.iter().any(|s| matches!(s, Slot::Pending(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(block: u64, size: u32, rank: u32, hold_ns: u64) -> ReorderSlot {
        ReorderSlot {
            block,
            size,
            rank,
            position: 0,
            hold_ns,
        }
    }

    /// Completes everything the block allows at `now`, returning keys.
    fn drain(b: &mut Block, due: &dyn Fn(Key) -> u64, now: u64) -> Vec<Key> {
        let mut out = Vec::new();
        while let Next::Ready { at_ns, key, pick } = b.next(due) {
            if at_ns > now {
                break;
            }
            b.completed(pick);
            out.push(key);
        }
        out
    }

    #[test]
    fn members_complete_in_rank_order() {
        let ranks = [2, 0, 3, 1];
        let mut b = Block::open(&slot(7, 4, ranks[0], 0)).unwrap();
        for (k, &r) in ranks.iter().enumerate() {
            assert!(b.admit(&slot(7, 4, r, 0), k as Key, false));
        }
        let due = |_k: Key| 10;
        assert_eq!(drain(&mut b, &due, 9), Vec::<Key>::new());
        assert_eq!(drain(&mut b, &due, 10), vec![1, 3, 0, 2]);
        assert_eq!(b.next(due), Next::Finished);
    }

    #[test]
    fn each_member_waits_for_its_own_due_time() {
        let mut b = Block::open(&slot(1, 2, 1, 0)).unwrap();
        assert!(b.admit(&slot(1, 2, 1, 0), 0, false));
        assert!(b.admit(&slot(1, 2, 0, 0), 1, false));
        let due = |k: Key| if k == 1 { 50 } else { 5 };
        // Rank 0 (key 1) is due at 50; key 0 must not overtake it.
        assert_eq!(drain(&mut b, &due, 40), Vec::<Key>::new());
        assert_eq!(drain(&mut b, &due, 50), vec![1, 0]);
    }

    #[test]
    fn missing_lower_ranks_are_waited_for_hold_ns_then_skipped() {
        let mut b = Block::open(&slot(1, 3, 2, 100)).unwrap();
        assert!(b.admit(&slot(1, 3, 2, 100), 10, false));
        let due = |_k: Key| 20;
        match b.next(due) {
            Next::Ready { at_ns, key, .. } => assert_eq!((at_ns, key), (120, 10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(drain(&mut b, &due, 119), Vec::<Key>::new());
        assert_eq!(drain(&mut b, &due, 120), vec![10]);
        // Ranks 0 and 1 were skipped: they arrive late and go in arrival
        // order at their due time.
        assert!(b.admit(&slot(1, 3, 0, 100), 11, false));
        assert!(b.admit(&slot(1, 3, 1, 100), 12, false));
        assert_eq!(drain(&mut b, &due, 120), vec![11, 12]);
        assert_eq!(b.next(due), Next::Finished);
    }

    #[test]
    fn an_arrival_within_the_hold_keeps_the_order() {
        let mut b = Block::open(&slot(1, 2, 1, 1_000)).unwrap();
        assert!(b.admit(&slot(1, 2, 1, 1_000), 0, false));
        let due = |_k: Key| 10;
        assert_eq!(drain(&mut b, &due, 500), Vec::<Key>::new());
        assert!(b.admit(&slot(1, 2, 0, 1_000), 1, false));
        assert_eq!(drain(&mut b, &due, 500), vec![1, 0]);
    }

    #[test]
    fn hung_members_leave_the_order_and_closing_skips_the_rest() {
        let mut b = Block::open(&slot(3, 4, 0, 1_000_000)).unwrap();
        assert!(b.admit(&slot(3, 4, 0, 0), 0, true));
        assert!(b.admit(&slot(3, 4, 2, 0), 1, false));
        let due = |_k: Key| 0;
        // Rank 1 has not arrived: key 1 waits for it.
        assert_eq!(drain(&mut b, &due, 10), Vec::<Key>::new());
        b.close();
        assert_eq!(drain(&mut b, &due, 10), vec![1]);
        assert_eq!(b.next(due), Next::Finished);
        assert!(!b.admit(&slot(3, 4, 1, 0), 2, false), "closed");
    }

    #[test]
    fn foreign_or_duplicate_slots_are_refused() {
        let mut b = Block::open(&slot(1, 2, 0, 0)).unwrap();
        assert!(b.admit(&slot(1, 2, 0, 0), 0, false));
        assert!(!b.admit(&slot(1, 2, 0, 0), 1, false), "rank taken");
        assert!(!b.admit(&slot(2, 2, 1, 0), 1, false), "other block");
        assert!(!b.admit(&slot(1, 3, 1, 0), 1, false), "other size");
        assert!(!b.admit(&slot(1, 2, 5, 0), 1, false), "rank outside");
        assert!(Block::open(&slot(1, 0, 0, 0)).is_none());
        assert!(Block::open(&slot(1, 2, 2, 0)).is_none());
        assert!(Block::open(&slot(1, MAX_BLOCK + 1, 0, 0)).is_none());
        assert_eq!(b.pending().collect::<Vec<_>>(), vec![0]);
    }
}
