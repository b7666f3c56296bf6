//! Any text as a configuration file: errors, never panics, and an error with a
//! position points inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(error) = Config::from_toml(text) {
        if let Some(line) = error.line {
            assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "line {line} outside the text");
        }
    }
});
