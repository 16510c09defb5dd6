//! The node's config file: `toml::from_str::<NodeConfig>` as
//! `NodeConfig::load` does, then `NodeConfig::validate` (multiaddrs, the
//! API address, every timing). node is a binary crate, so its config module
//! is compiled in here as it is.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../node/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<config::NodeConfig>(text) else {
        return;
    };
    // As `node start` runs it, with no flags (the file must then name the
    // data dir and the region itself), and with both given as flags.
    let _ = file.clone().validate(config::Overrides::default());
    let _ = file.validate(config::Overrides {
        data_dir: Some("/nonexistent/agentmesh-fuzz".into()),
        region: Some("eu-west".into()),
        ..Default::default()
    });
});
