#![no_main]
//! Arbitrary bytes as `/proc/PID/maps`, read as `ProcessMaps::read` reads it (lossy UTF-8),
//! parsed, turned into the modules to symbolize, and looked up by address. A traced process
//! chooses the paths in its maps (file names with spaces, newlines, " (deleted)").

use libfuzzer_sys::fuzz_target;
use scope_symbolizer::ProcessMaps;

/// Mappings whose boundaries are looked up, at most.
const MAX_MAPPINGS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(maps) = ProcessMaps::parse(&text) else {
        return;
    };
    assert!(
        maps.mappings.windows(2).all(|w| w[0].start <= w[1].start),
        "mappings are sorted"
    );
    assert!(maps.mappings.iter().all(|m| m.start <= m.end));

    let exe = maps.mappings.iter().find_map(|m| m.path.clone());
    for module in maps.executable_modules_with_exe(4242, exe.as_deref()) {
        assert!(module.start <= module.end);
        assert!(module.path.starts_with('/'), "{:?}", module.path);
        assert!(
            module.open_path.starts_with("/proc/4242/"),
            "{:?} escapes /proc/4242",
            module.open_path
        );
    }

    for mapping in maps.mappings.iter().take(MAX_MAPPINGS) {
        for addr in [
            mapping.start,
            mapping.start.wrapping_sub(1),
            mapping.end.wrapping_sub(1),
            mapping.end,
        ] {
            if let Some((found, offset)) = maps.lookup(addr) {
                assert!(found.contains(addr));
                assert_eq!(Some(offset), found.offset.checked_add(addr - found.start));
            }
        }
    }
});
