//! The shared, caching entry point.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::SymbolizeError;
use crate::module::{Module, ModuleKey, Opened};

/// How many parsed modules a [`Symbolizer`] keeps. A busy host maps a few hundred distinct
/// executables and libraries; beyond this the least recently used module is dropped (callers
/// holding its `Arc` keep it alive).
pub const DEFAULT_MODULE_CACHE_CAPACITY: usize = 1024;

/// Thread-safe symbolizer, shared by `Arc` across the daemon; caches parsed modules.
///
/// Modules are cached by the identity of the opened file — `(st_dev, st_ino)`, size, mtime and
/// build-id — so the same library reached through different paths (`/proc/A/root/…`,
/// `/proc/B/map_files/…`) is parsed once, and a file replaced on disk is parsed again.
/// The search root for separate debug info is not part of the key: the first caller's root
/// decides where that file's debug info came from.
#[derive(Debug)]
pub struct Symbolizer {
    cache: Mutex<ModuleCache>,
}

#[derive(Debug)]
struct ModuleCache {
    capacity: usize,
    modules: HashMap<ModuleKey, CachedModule>,
    clock: u64,
}

#[derive(Debug)]
struct CachedModule {
    module: Arc<Module>,
    last_used: u64,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer caching up to [`DEFAULT_MODULE_CACHE_CAPACITY`] modules.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_MODULE_CACHE_CAPACITY)
    }

    /// A symbolizer caching up to `capacity` modules (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Symbolizer {
            cache: Mutex::new(ModuleCache {
                capacity: capacity.max(1),
                modules: HashMap::new(),
                clock: 0,
            }),
        }
    }

    /// Parses (or returns from cache) the ELF file at `path`, looking for separate debug info
    /// under `/usr/lib/debug`.
    ///
    /// `path` is how to open the file, e.g. `/proc/1234/root/usr/bin/redis-server`, or
    /// `/proc/1234/map_files/55d0-55e0` for a file deleted or replaced on disk.
    pub fn module(&self, path: &Path) -> Result<Arc<Module>, SymbolizeError> {
        self.module_in_root(path, Path::new("/"))
    }

    /// Same as [`module`](Self::module), searching separate debug info (build-id and
    /// `.gnu_debuglink`) under `root`; for a target in another mount namespace pass
    /// `/proc/PID/root`.
    pub fn module_in_root(&self, path: &Path, root: &Path) -> Result<Arc<Module>, SymbolizeError> {
        let opened = Opened::open(path)?;
        let key = opened.key.clone();
        if let Some(module) = self.lock().get(&key) {
            return Ok(module);
        }
        // Parse without holding the lock: other modules stay available meanwhile. Two threads
        // racing on the same new file both parse it; the first insert wins.
        let module = Arc::new(Module::build(opened, root)?);
        Ok(self.lock().insert(key, module))
    }

    /// How many modules are cached.
    pub fn cached_modules(&self) -> usize {
        self.lock().modules.len()
    }

    /// Drops every cached module (for example after a burst of short-lived processes).
    pub fn clear(&self) {
        self.lock().modules.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ModuleCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ModuleCache {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn get(&mut self, key: &ModuleKey) -> Option<Arc<Module>> {
        let now = self.tick();
        let cached = self.modules.get_mut(key)?;
        cached.last_used = now;
        Some(Arc::clone(&cached.module))
    }

    fn insert(&mut self, key: ModuleKey, module: Arc<Module>) -> Arc<Module> {
        let now = self.tick();
        if let Some(existing) = self.modules.get_mut(&key) {
            existing.last_used = now;
            return Arc::clone(&existing.module);
        }
        if self.modules.len() >= self.capacity {
            // O(n) over a small map, only when a new module arrives at a full cache.
            let oldest = self
                .modules
                .iter()
                .min_by_key(|(_, cached)| cached.last_used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.modules.remove(&oldest);
            }
        }
        self.modules.insert(
            key,
            CachedModule {
                module: Arc::clone(&module),
                last_used: now,
            },
        );
        module
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Symbolizer>();
    }
}
