//! Helpers shared by the crate's unit tests.

use crate::fault::{FenceInfo, TimelineId};

/// A `SUBMIT_3D` fence without `WORK` on ring 0 of context `ctx`, the
/// `index`-th on its timeline.
pub fn fence_on(ctx: u32, fence_id: u64, index: u64) -> FenceInfo {
    FenceInfo {
        timeline: TimelineId { ctx, ring: 0 },
        fence_id,
        index,
        command: "SUBMIT_3D",
        work_ns: 0,
    }
}
