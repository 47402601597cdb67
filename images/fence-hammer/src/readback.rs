//! WRITE read-back: catching fences signaled before the device completed
//! them.
//!
//! Every fence `seq` gets an 8-byte slot in one buffer object (`slot = seq %
//! slots`) and a unique value (`seq + 1`). Its command stream carries
//! `WRITE{res_handle, slot * 8, value}`; fencelab-device stores the value in
//! the buffer's guest pages just before it returns the fence's descriptor.
//! When fence-hammer sees the fence signaled it reads the slot: if the
//! value is not there, the driver signaled the fence before the device
//! completed it — a **premature signal**.
//!
//! Detection is one-sided: a value that is there proves the device
//! completed the fence (only that fence writes that value); a value that is
//! missing proves the signal came first, *unless* the slot was reused. A
//! slot is reused only by fence `seq + slots`, which is not submitted while
//! `seq` is in flight ([`SlotMap::is_free`]), and slots are sized to the run
//! ([`SlotMap::for_fences`]) so that in all but very long runs no slot is
//! ever reused. A premature signal is missed when the device completes the
//! fence between the signal and the read; the read is made right after
//! poll() reports the fence ready to keep that window small.

use fencelab_stream::{Op, encode};

/// Bytes per slot: one little-endian `u64`.
pub const SLOT_BYTES: u64 = 8;
/// Most slots one run uses (512 KiB of buffer).
pub const MAX_SLOTS: u64 = 65_536;
/// Premature fences listed by number in the result line.
pub const MAX_PREMATURE_LISTED: usize = 16;

/// Where fence `seq` writes, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMap {
    slots: u64,
}

impl SlotMap {
    /// `slots` slots (at least one).
    pub fn new(slots: u64) -> Self {
        Self {
            slots: slots.max(1),
        }
    }

    /// One slot per fence, up to [`MAX_SLOTS`]: a run of at most that many
    /// fences never reuses a slot.
    pub fn for_fences(fences: u64) -> Self {
        Self::new(fences.min(MAX_SLOTS))
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Bytes the slots occupy.
    pub fn bytes(&self) -> u64 {
        self.slots * SLOT_BYTES
    }

    pub fn slot(&self, seq: u64) -> u64 {
        seq % self.slots
    }

    /// Byte offset of fence `seq`'s slot in the buffer.
    pub fn offset(&self, seq: u64) -> u64 {
        self.slot(seq) * SLOT_BYTES
    }

    /// The value fence `seq` writes: never 0 (a fresh buffer is zeroed) and
    /// unique among the fences of a run.
    pub fn value(seq: u64) -> u64 {
        seq.wrapping_add(1)
    }

    /// True when fence `seq` may be submitted while `oldest_in_flight` (the
    /// oldest fence not yet retired) is outstanding: their slots differ.
    pub fn is_free(&self, seq: u64, oldest_in_flight: Option<u64>) -> bool {
        oldest_in_flight.is_none_or(|oldest| seq.saturating_sub(oldest) < self.slots)
    }
}

/// The buffer the device writes fence values into; read from any thread.
pub trait SlotMemory: Sync {
    /// The device resource id of the buffer (`res_handle` from
    /// `DRM_IOCTL_VIRTGPU_RESOURCE_CREATE`): what a `WRITE` op names.
    fn res_handle(&self) -> u32;
    fn map(&self) -> SlotMap;
    /// The current contents of `slot`, read once from memory (volatile);
    /// `None` when the slot is outside the buffer.
    fn read_slot(&self, slot: u64) -> Option<u64>;
}

/// The command stream of fence `seq`: `WORK{work_ns}`, and the fence's
/// `WRITE` when there is a buffer to write into.
pub fn command(seq: u64, work_ns: u64, memory: Option<&dyn SlotMemory>) -> Vec<u8> {
    let mut ops = vec![Op::Work { ns: work_ns }];
    if let Some(m) = memory {
        let map = m.map();
        ops.push(Op::Write {
            resource: m.res_handle(),
            offset: map.offset(seq),
            value: SlotMap::value(seq),
        });
    }
    encode(&ops)
}

/// Reads fence `seq`'s slot in `memory`: `Some(value)` as observed.
pub fn observe(seq: u64, memory: &dyn SlotMemory) -> Option<u64> {
    memory.read_slot(memory.map().slot(seq))
}

/// Counts read-backs and the premature signals among them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrematureCheck {
    /// Read-backs done (fences seen signaled without error).
    pub checks: u64,
    /// Of those, how many did not find their value.
    pub premature: u64,
    /// The first [`MAX_PREMATURE_LISTED`] premature fences, by number.
    pub first: Vec<u64>,
}

impl PrematureCheck {
    /// Records the read-back of fence `seq` that observed `observed`
    /// (`None`: the slot could not be read, counted as missing). Returns true
    /// when the signal was premature.
    pub fn record(&mut self, seq: u64, observed: Option<u64>) -> bool {
        self.checks += 1;
        if observed == Some(SlotMap::value(seq)) {
            return false;
        }
        self.premature += 1;
        if self.first.len() < MAX_PREMATURE_LISTED {
            self.first.push(seq);
        }
        true
    }
}

/// Slots over memory this process can read: a mapping of the buffer object,
/// or, in tests, any array of `u64`.
#[derive(Debug)]
pub struct MappedSlots {
    base: *const u64,
    map: SlotMap,
}

// SAFETY: `MappedSlots` only reads its memory, with volatile loads, and the
// constructor's caller keeps the memory mapped while it is used, from any
// thread: sharing or moving it between threads is as safe as a shared
// reference to an array of u64.
unsafe impl Send for MappedSlots {}
// SAFETY: see `Send` above.
unsafe impl Sync for MappedSlots {}

impl MappedSlots {
    /// # Safety
    /// `base` must be aligned for `u64` and point at `map.slots()` readable
    /// `u64`s that stay mapped for as long as the returned value is used.
    pub unsafe fn new(base: *const u64, map: SlotMap) -> Self {
        Self { base, map }
    }

    pub fn map(&self) -> SlotMap {
        self.map
    }

    /// Volatile read of `slot`: the device writes it behind the compiler's
    /// back, so every read must go to memory.
    pub fn read(&self, slot: u64) -> Option<u64> {
        if slot >= self.map.slots() {
            return None;
        }
        // Observe everything the signal published before reading (a no-op
        // on x86, where loads are not reordered with older loads).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: `slot < slots`, so the address lies inside the region the
        // constructor's caller guaranteed readable, aligned and mapped.
        Some(unsafe { std::ptr::read_volatile(self.base.add(slot as usize)) })
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A buffer in host memory standing in for the mapped BO; tests write
    /// into it the way the device would.
    pub struct FakeSlots {
        pub res_handle: u32,
        pub map: SlotMap,
        pub words: Mutex<Vec<u64>>,
    }

    impl FakeSlots {
        pub fn new(res_handle: u32, map: SlotMap) -> Self {
            Self {
                res_handle,
                map,
                words: Mutex::new(vec![0; map.slots() as usize]),
            }
        }

        /// What the device does when it completes a stream: apply its WRITEs.
        pub fn apply(&self, command: &[u8]) {
            for op in fencelab_stream::decode(command).expect("valid stream") {
                if let Op::Write {
                    resource,
                    offset,
                    value,
                } = op
                {
                    assert_eq!(resource, self.res_handle, "WRITE names the buffer");
                    assert_eq!(offset % SLOT_BYTES, 0, "aligned slot");
                    self.words.lock().unwrap()[(offset / SLOT_BYTES) as usize] = value;
                }
            }
        }
    }

    impl SlotMemory for FakeSlots {
        fn res_handle(&self) -> u32 {
            self.res_handle
        }
        fn map(&self) -> SlotMap {
            self.map
        }
        fn read_slot(&self, slot: u64) -> Option<u64> {
            self.words.lock().unwrap().get(slot as usize).copied()
        }
    }

    #[test]
    fn slot_arithmetic() {
        let m = SlotMap::new(4);
        assert_eq!(m.bytes(), 32);
        assert_eq!(
            (0..9).map(|s| m.slot(s)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 0, 1, 2, 3, 0]
        );
        assert_eq!(m.offset(6), 16);
        assert_eq!(SlotMap::value(0), 1);
        assert_eq!(SlotMap::value(41), 42);
        assert_eq!(SlotMap::new(0).slots(), 1, "at least one slot");
        assert_eq!(SlotMap::for_fences(2000).slots(), 2000);
        assert_eq!(SlotMap::for_fences(10_000_000).slots(), MAX_SLOTS);
        assert_eq!(SlotMap::for_fences(10_000_000).bytes(), 512 * 1024);
    }

    #[test]
    fn a_slot_is_not_reused_while_its_fence_is_in_flight() {
        let m = SlotMap::new(4);
        assert!(m.is_free(0, None));
        assert!(m.is_free(100, None));
        assert!(m.is_free(3, Some(0)));
        assert!(!m.is_free(4, Some(0)), "fence 4 shares fence 0's slot");
        assert!(m.is_free(4, Some(1)));
        assert!(!m.is_free(9, Some(5)));
    }

    #[test]
    fn streams_carry_work_and_the_fences_write() {
        let slots = FakeSlots::new(7, SlotMap::new(16));
        let ops = fencelab_stream::decode(&command(21, 500, Some(&slots))).unwrap();
        assert_eq!(
            ops,
            [
                Op::Work { ns: 500 },
                Op::Write {
                    resource: 7,
                    offset: 5 * 8,
                    value: 22
                }
            ]
        );
        let ops = fencelab_stream::decode(&command(21, 500, None)).unwrap();
        assert_eq!(ops, [Op::Work { ns: 500 }]);
    }

    #[test]
    fn a_missing_value_is_a_premature_signal() {
        let slots = FakeSlots::new(1, SlotMap::new(8));
        let mut check = PrematureCheck::default();
        // Fence 3 completed by the device: its value is there.
        slots.apply(&command(3, 0, Some(&slots)));
        assert!(!check.record(3, observe(3, &slots)));
        // Fence 4 signaled before the device wrote anything.
        assert!(check.record(4, observe(4, &slots)));
        // Fence 11 shares fence 3's slot: fence 3's value is not its own.
        assert!(check.record(11, observe(11, &slots)));
        assert!(
            check.record(12, None),
            "an unreadable slot counts as missing"
        );
        assert_eq!(check.checks, 4);
        assert_eq!(check.premature, 3);
        assert_eq!(check.first, vec![4, 11, 12]);
    }

    #[test]
    fn only_the_first_premature_fences_are_listed() {
        let mut check = PrematureCheck::default();
        for seq in 0..100 {
            check.record(seq, Some(0));
        }
        assert_eq!(check.premature, 100);
        assert_eq!(
            check.first,
            (0..MAX_PREMATURE_LISTED as u64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn mapped_slots_read_memory_each_time() {
        let mut words = vec![0u64; 4].into_boxed_slice();
        let base = words.as_mut_ptr();
        // SAFETY: `words` holds 4 aligned u64s and outlives `slots`.
        let slots = unsafe { MappedSlots::new(base, SlotMap::new(4)) };
        assert_eq!(slots.read(2), Some(0));
        // A write behind the reader's back (as the device's would be).
        // SAFETY: in bounds of `words`, which is still alive.
        unsafe { std::ptr::write_volatile(base.add(2), 77) };
        assert_eq!(slots.read(2), Some(77));
        assert_eq!(slots.read(4), None, "out of bounds");
        assert_eq!(slots.map().slots(), 4);
        drop(words);
    }
}
