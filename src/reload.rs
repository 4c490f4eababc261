//! Config reload (`SIGHUP`, CONFIG.md): providers, models, routes, prices,
//! routing and keys (with their limits and budgets) are swapped in for new
//! requests; a request already admitted keeps the model, routes and key it
//! was admitted with until it ends.
//!
//! The binary re-reads and validates the file; a file that does not
//! validate never gets here. What cannot change without a restart
//! (`server`, `storage`, `limits.backend`, `telemetry`, `generations`) is
//! left as it was, with a warning naming the section.

use std::sync::{Arc, Mutex, RwLock};

use crate::{auth::Keys, config::Config, routing::Router};

/// A value replaced as a whole: readers take the current one and keep it
/// as long as they need it, whatever is stored meanwhile.
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(value: T) -> Self {
        Swap(RwLock::new(Arc::new(value)))
    }

    pub fn load(&self) -> Arc<T> {
        // A writer never panics while holding the lock (it only assigns).
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = value;
    }
}

impl<T: Default> Default for Swap<T> {
    fn default() -> Self {
        Swap::new(T::default())
    }
}

/// What a reload replaces.
pub struct Reloader {
    pub(crate) router: Arc<Swap<Router>>,
    pub(crate) keys: Arc<Keys>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) current: Mutex<Config>,
}

impl Reloader {
    /// Applies a validated config; sections that differ but need a restart
    /// are left as they were, with a warning naming each.
    pub fn apply(&self, new: Config) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let router = self.router.load().reload(&new);
        self.router.store(Arc::new(router));
        self.keys.reload(&new.keys);
        self.metrics.reloaded();
        let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let mut ignored = Vec::new();
        for (name, changed) in [
            ("server", differs(&current.server, &new.server)),
            ("storage", differs(&current.storage, &new.storage)),
            ("limits", differs(&current.limits, &new.limits)),
            ("telemetry", differs(&current.telemetry, &new.telemetry)),
            ("generations", differs(&current.generations, &new.generations)),
        ] {
            if changed {
                ignored.push(name);
            }
        }
        // What was not applied stays as it runs, so a later reload compares
        // against what is really in force.
        let mut kept = new;
        kept.server = current.server.clone();
        kept.storage = current.storage.clone();
        kept.limits = current.limits.clone();
        kept.telemetry = current.telemetry.clone();
        kept.generations = current.generations.clone();
        tracing::info!(
            providers = kept.providers.len(),
            models = kept.models.len(),
            keys = kept.keys.len(),
            "config reloaded; new requests use it, requests in flight finish on the old one"
        );
        for section in &ignored {
            tracing::warn!(section, "config reload: [{section}] changed but needs a restart; it was left as it was");
        }
        *current = kept;
    }
}
