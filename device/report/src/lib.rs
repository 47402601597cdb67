//! The result types fencelab's parts exchange as JSON, defined once:
//!
//! - [`ResultLine`]: the `FENCELAB_RESULT {json}` line fence-hammer prints
//!   in the guest and xtask reads from the console, with its round-trip
//!   percentiles ([`RttUs`]), its fence errors by errno name, `unload-live`'s
//!   figures ([`UnloadReport`]) and those of `deadline-race`, `callback-vs-release`,
//!   `array-order` and `reset` ([`figures`]);
//! - [`Accounting`]: the device's fence counts, in its summary line and on
//!   its control plane.
//!
//! Serialization writes every key in field order (fence-hammer's tests pin
//! it). Deserialization is tolerant: a key the writer did not write reads as
//! 0 / empty / `None`, and `null` reads as "not measured".

mod accounting;
pub mod figures;
mod percentiles;
mod result_line;
mod unload;

pub use accounting::Accounting;
pub use figures::{ArrayOrderReport, CallbackRaceReport, DeadlineRaceReport, ResetReport};
pub use percentiles::{MsPercentiles, RttUs, percentile, round_to};
pub use result_line::{RESULT_MARKER, ResultLine};
pub use unload::{DriverTotals, PendingAtRmmod, UnloadReport};
