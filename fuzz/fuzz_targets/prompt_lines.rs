//! The lines of a `sails generate --prompts` JSONL file.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/cli/mod.rs"]
mod cli;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let _ = cli::generate::parse_prompt_line(line);
    }
});
