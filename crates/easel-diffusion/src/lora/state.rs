//! A pipeline's adapter state: the cached base weights of its targetable
//! components and the adapter set merged now.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::merge::{merge_deltas, LoraDeltas, LoraOverlay};
use super::LoraSpec;
use crate::device::Offload;
use crate::error::{Error, Result};
use crate::models::weights::{CachedSource, TensorSource, Weights};

/// The LoRA bookkeeping of a loaded pipeline: the cached base weights of
/// each component adapters can target, and the adapter set now merged.
pub struct LoraState {
    components: Vec<(String, Arc<CachedSource>)>,
    unet_layers_per_block: Option<usize>,
    active: Vec<LoraSpec>,
    /// Components whose models now hold merged weights.
    merged: HashSet<String>,
    dtype: DType,
    /// Where the models are built ([`Offload::weights_device`]).
    device: Device,
    /// Where the base weights and the LoRA updates are kept
    /// ([`Offload::host_device`]).
    host: Device,
}

impl LoraState {
    /// Wrap each targetable component's weights in a cache (converted to
    /// `dtype`), for models computing on `device` with `offload`: the cache
    /// and the LoRA updates on `device`, or in host memory when offloaded.
    pub fn new(
        components: Vec<(String, Arc<dyn TensorSource>)>,
        unet_layers_per_block: Option<usize>,
        dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Self {
        let host = offload.host_device(device);
        Self {
            components: components
                .into_iter()
                .map(|(n, s)| {
                    let cache = CachedSource::new(s, dtype);
                    let cache = match offload {
                        Offload::None => cache,
                        Offload::Model | Offload::Sequential => cache.on_host(host.clone()),
                    };
                    (n, Arc::new(cache))
                })
                .collect(),
            unet_layers_per_block,
            active: Vec::new(),
            merged: HashSet::new(),
            dtype,
            device: offload.weights_device(device),
            host,
        }
    }

    /// The base weights of `component` (no adapters).
    pub fn base_weights(&self, component: &str) -> Result<Weights> {
        self.weights(component, None)
    }

    fn source(&self, component: &str) -> Result<&Arc<CachedSource>> {
        self.components
            .iter()
            .find(|c| c.0 == component)
            .map(|c| &c.1)
            .ok_or_else(|| Error::config(component, "not a LoRA-targetable component"))
    }

    /// The weights of `component` with `deltas` of it added, if any.
    pub fn weights(&self, component: &str, deltas: Option<&LoraDeltas>) -> Result<Weights> {
        let base: Arc<dyn TensorSource> = self.source(component)?.clone();
        let source: Arc<dyn TensorSource> = match deltas.and_then(|d| d.get(component)) {
            Some(d) if !d.is_empty() => Arc::new(LoraOverlay::new(base, d.clone())),
            _ => base,
        };
        Ok(Weights::new(source, component, self.dtype, &self.device))
    }

    /// The adapter set merged now.
    pub fn active(&self) -> &[LoraSpec] {
        &self.active
    }

    /// Compute the updates of `specs`, and the components that must be
    /// rebuilt to go from the active set to it (those merged now or after).
    pub fn plan(&self, specs: &[LoraSpec]) -> Result<(LoraDeltas, Vec<String>)> {
        let sources: Vec<(&str, &dyn TensorSource)> = self
            .components
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_ref() as &dyn TensorSource))
            .collect();
        let deltas = merge_deltas(specs, &sources, self.unet_layers_per_block, &self.host)?;
        let rebuild = self
            .components
            .iter()
            .map(|c| c.0.clone())
            .filter(|c| self.merged.contains(c) || deltas.get(c).is_some_and(|d| !d.is_empty()))
            .collect();
        Ok((deltas, rebuild))
    }

    /// `component` built again by `load` from its weights with `deltas`
    /// added, when `rebuild` (from [`Self::plan`]) names it; `None` when it
    /// keeps its current model.
    pub fn rebuilt<T>(
        &self,
        component: &str,
        deltas: &LoraDeltas,
        rebuild: &[String],
        load: impl FnOnce(&Weights) -> Result<T>,
    ) -> Result<Option<T>> {
        if !rebuild.iter().any(|c| c == component) {
            return Ok(None);
        }
        load(&self.weights(component, Some(deltas))?).map(Some)
    }

    /// Record that `specs` are now merged, per `deltas`.
    pub fn commit(&mut self, specs: &[LoraSpec], deltas: &LoraDeltas) {
        self.active = specs.to_vec();
        self.merged = deltas
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(c, _)| c.clone())
            .collect();
    }

    /// Tensors read from the weight files so far, over all targetable
    /// components (each at most once: switching adapters reads none).
    pub fn base_reads(&self) -> usize {
        self.components.iter().map(|c| c.1.reads()).sum()
    }
}
