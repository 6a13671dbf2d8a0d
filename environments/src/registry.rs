//! Environments by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::env::{EnvInfo, Environment};
use crate::error::EnvError;

/// A set of environments keyed by their unique names.
#[derive(Clone, Default)]
pub struct Registry {
    envs: BTreeMap<String, Arc<dyn Environment>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an environment under its own name; fails if the name is taken.
    pub fn register(&mut self, env: impl Environment + 'static) -> Result<(), EnvError> {
        self.register_arc(Arc::new(env))
    }

    /// Adds a shared environment under its own name; fails if the name is taken.
    pub fn register_arc(&mut self, env: Arc<dyn Environment>) -> Result<(), EnvError> {
        let name = env.info().name;
        if self.envs.contains_key(&name) {
            return Err(EnvError::DuplicateEnvironment(name));
        }
        self.envs.insert(name, env);
        Ok(())
    }

    /// Adds or replaces the environment with this name (e.g. a dataset-backed `math_word`
    /// replacing the generated one). Returns the one replaced.
    pub fn replace(&mut self, env: Arc<dyn Environment>) -> Option<Arc<dyn Environment>> {
        self.envs.insert(env.info().name, env)
    }

    /// The environment named `name`; the error lists every known name.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Environment>, EnvError> {
        self.envs
            .get(name)
            .cloned()
            .ok_or_else(|| EnvError::UnknownEnvironment {
                name: name.to_string(),
                known: self.names(),
            })
    }

    /// Every registered name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.envs.keys().cloned().collect()
    }

    /// Every environment's description, sorted by name (serialise for `chorus env list`).
    pub fn list(&self) -> Vec<EnvInfo> {
        self.envs.values().map(|env| env.info()).collect()
    }

    /// Every environment, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Environment>> {
        self.envs.values()
    }

    /// How many environments are registered.
    pub fn len(&self) -> usize {
        self.envs.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.envs.is_empty()
    }
}
