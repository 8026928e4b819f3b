//! The `sails align --config` TOML file, merged over each preset as the command does.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/cli/mod.rs"]
mod cli;

use cli::align::{config_over_preset, AlignConfig, PresetArg};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("align.toml");
    for preset in [
        PresetArg::Quick,
        PresetArg::Default,
        PresetArg::Iterate,
        PresetArg::Gemma2_9b,
    ] {
        let _ = config_over_preset(AlignConfig::preset(preset), text, path);
    }
});
