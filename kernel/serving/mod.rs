//! The models the handlers use, each in a slot that a promotion replaces
//! while requests run: a request takes the slot's current model once and
//! finishes on it, so it never sees half of an old model and half of a new
//! one. `follow` keeps the slots in step with the registry.

pub mod follow;
pub mod load;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use serde::Serialize;

use self::follow::Targets;
use crate::{
    engine::GeneratorEngine,
    registry::{Registry, Role},
};

/// The ranker Rank uses; a promotion swaps it while requests run.
pub type RankerSlot = Slot<crate::engine::Ranker>;

/// One swappable model; None when the role has no model.
pub struct Slot<T>(RwLock<Option<Arc<T>>>);

impl<T> Slot<T> {
    pub fn new(value: Option<T>) -> Self {
        Slot::shared(value.map(Arc::new))
    }

    pub fn shared(value: Option<Arc<T>>) -> Self {
        Slot(RwLock::new(value))
    }

    pub fn get(&self) -> Option<Arc<T>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `value`, returning what it replaces.
    pub fn swap(&self, value: Option<T>) -> Option<Arc<T>> {
        self.set(value.map(Arc::new))
    }

    pub fn set(&self, value: Option<Arc<T>>) -> Option<Arc<T>> {
        std::mem::replace(&mut *self.0.write().unwrap_or_else(|e| e.into_inner()), value)
    }
}

/// The generator serving Generate and, beside it, the challenger that
/// writes half of the candidates of `challenger_share` of the requests.
pub struct Generators {
    pub champion: Option<GeneratorEngine>,
    pub challenger: Option<GeneratorEngine>,
    pub challenger_share: f64,
}

/// What serves each role, and what a swap in progress or a failed one says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoleStatus {
    /// The served model's version (`{name}@{weights digest}`); empty when none.
    pub version: String,
    /// The registry's name for it; None for the configured model.
    pub registry_version: Option<String>,
    /// Its folder or file (or "similarity", "none").
    pub source: String,
    pub challenger: Option<String>,
    /// A model being loaded (and, for a retriever, the knowledge re-embedded) to replace it.
    pub switching_to: Option<String>,
    /// Why the last swap failed; the model above kept serving.
    pub last_error: Option<String>,
}

#[derive(Default)]
pub struct ServedModels(Mutex<BTreeMap<Role, RoleStatus>>);

impl ServedModels {
    /// What a server serves at start: the registry's versions where it names
    /// them, else the configured models; `versions` are the loaded models'.
    pub fn at_start(registry: &Registry, targets: &Targets, versions: [Option<String>; 3]) -> Self {
        let status = ServedModels::default();
        let [retriever, ranker, generator] = versions;
        for (role, version, source) in [
            (Role::Retriever, retriever, &targets.retriever),
            (Role::Ranker, ranker, &targets.ranker),
            (Role::Generator, generator, &targets.generator),
        ] {
            status.update(role, |s| {
                *s = RoleStatus {
                    version: version.unwrap_or_default(),
                    registry_version: registry.role(role).serving.clone(),
                    source: source.clone(),
                    challenger: registry.role(role).challenger.clone(),
                    ..Default::default()
                }
            });
        }
        status
    }

    pub fn get(&self) -> BTreeMap<Role, RoleStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn update(&self, role: Role, change: impl FnOnce(&mut RoleStatus)) {
        change(self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(role).or_default());
    }
}
