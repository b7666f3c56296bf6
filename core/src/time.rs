//! Time as the core sees it: milliseconds on a monotonic clock the caller reads.

/// Milliseconds since an arbitrary, caller-chosen epoch. The core never reads a clock.
pub type Millis = u64;
