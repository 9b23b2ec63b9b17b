//! Merging: the updates `scale · (α / r) · up · down` of an adapter set,
//! per weight, and the overlay that adds them to a component's weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::format::{LoraAdapter, LoraLayer};
use super::names::ModuleIndex;
use super::LoraSpec;
use crate::error::{Error, Result};
use crate::models::stored::StoredTensor;
use crate::models::weights::TensorSource;

/// The merged weight updates of an adapter set, per component:
/// weight key (`down_blocks.0....to_q.weight`) → `ΔW` (f32, the weight's shape).
pub type LoraDeltas = HashMap<String, HashMap<String, Tensor>>;

/// Compute the merged updates of `specs` for a pipeline whose targetable
/// components are `components` (name → base weights).
/// `unet_layers_per_block` enables the original-SD kohya names.
///
/// Errors: a file that cannot be read or parsed ([`LoraAdapter::open`]); a
/// LoRA for a component the pipeline lacks, or for a module the model lacks
/// (naming the first such module, in key order); matrices whose shapes do
/// not fit the weight; a scale that is not finite.
pub fn merge_deltas(
    specs: &[LoraSpec],
    components: &[(&str, &dyn TensorSource)],
    unet_layers_per_block: Option<usize>,
    device: &Device,
) -> Result<LoraDeltas> {
    let indexes: HashMap<&str, ModuleIndex> = components
        .iter()
        .map(|(name, source)| (*name, ModuleIndex::new(*source)))
        .collect();
    let mut deltas: LoraDeltas = HashMap::new();
    for spec in specs {
        if !spec.scale.is_finite() {
            return Err(Error::invalid(
                "lora",
                format!(
                    "{}: scale {} is not a finite number",
                    spec.path.display(),
                    spec.scale
                ),
            ));
        }
        let adapter = LoraAdapter::open(&spec.path)?;
        // Resolve every layer first, so an error leaves nothing half done.
        let mut resolved = Vec::with_capacity(adapter.layers.len());
        for layer in &adapter.layers {
            // Keys without a component, and kohya's `lora_unet_`, name the
            // denoiser: the UNet, or the transformer of a FLUX pipeline.
            let component = match layer.component.as_str() {
                "unet" if !indexes.contains_key("unet") && indexes.contains_key("transformer") => {
                    "transformer"
                }
                c => c,
            };
            let Some(index) = indexes.get(component) else {
                return Err(Error::invalid(
                    "lora",
                    format!(
                        "{}: `{}` targets component `{}`, which this pipeline does not have \
                         (it has {}): the LoRA was made for another model family",
                        spec.path.display(),
                        layer.key,
                        component,
                        components
                            .iter()
                            .map(|c| c.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            };
            let lpb = (component == "unet")
                .then_some(unet_layers_per_block)
                .flatten();
            let Some(target) = index.resolve(&layer.module, lpb, component == "transformer") else {
                return Err(Error::invalid(
                    "lora",
                    format!(
                        "{}: the model's {} has no module `{}` (key `{}`): the LoRA was made \
                         for another model",
                        spec.path.display(),
                        component,
                        layer.module,
                        layer.key
                    ),
                ));
            };
            resolved.push((layer, component, target));
        }
        if spec.scale == 0.0 {
            continue;
        }
        for (layer, component, target) in resolved {
            let source = components
                .iter()
                .find(|c| c.0 == component)
                .map(|c| c.1)
                .ok_or_else(|| Error::invalid("lora", "component vanished"))?;
            let weight_keys: Vec<String> = target
                .modules
                .iter()
                .map(|m| format!("{m}.weight"))
                .collect();
            let mut weight_dims = Vec::with_capacity(weight_keys.len());
            for key in &weight_keys {
                let base = source
                    .tensor(key, &[], device)?
                    .ok_or_else(|| Error::invalid("lora", format!("`{key}` is missing")))?;
                weight_dims.push(base.dims().to_vec());
            }
            let parts = layer_delta(
                layer,
                &weight_dims,
                target.swap_halves,
                spec.scale,
                &spec.path,
            )?;
            for (weight_key, delta) in weight_keys.into_iter().zip(parts) {
                let delta = delta.to_device(device)?;
                let slot = deltas
                    .entry(component.to_string())
                    .or_default()
                    .entry(weight_key);
                match slot {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let sum = (e.get() + &delta)?;
                        e.insert(sum);
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(delta);
                    }
                }
            }
        }
    }
    Ok(deltas)
}

/// `scale · (α / r) · up · down`, split by rows among the weights it
/// updates (one, or the parts of a fused layer) and shaped like each
/// (`weight_dims`); with `swap_halves`, the two row halves of the product
/// are exchanged first.
fn layer_delta(
    layer: &LoraLayer,
    weight_dims: &[Vec<usize>],
    swap_halves: bool,
    scale: f64,
    path: &Path,
) -> Result<Vec<Tensor>> {
    let (Some(down), Some(up)) = (&layer.down, &layer.up) else {
        return Err(Error::invalid(
            "lora",
            format!("`{}` is incomplete", layer.key),
        ));
    };
    let bad = |why: String| {
        Error::invalid(
            "lora",
            format!(
                "{}: `{}` does not fit the weight{} of shape {}: {why}",
                path.display(),
                layer.key,
                if weight_dims.len() > 1 { "s" } else { "" },
                weight_dims
                    .iter()
                    .map(|d| format!("{d:?}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ),
        )
    };
    let rank = *down
        .dims()
        .first()
        .ok_or_else(|| bad("empty down matrix".into()))?;
    let out = *up
        .dims()
        .first()
        .ok_or_else(|| bad("empty up matrix".into()))?;
    if rank == 0 || up.elem_count() != out * rank {
        return Err(bad(format!(
            "down {:?} and up {:?} do not share a rank",
            down.dims(),
            up.dims()
        )));
    }
    let down2 = down.reshape((rank, down.elem_count() / rank))?;
    let up2 = up.reshape((out, rank))?;
    let inner = down2.dim(1)?;
    let fits = weight_dims
        .iter()
        .map(|d| d.first().copied())
        .sum::<Option<usize>>()
        == Some(out)
        && weight_dims
            .iter()
            .all(|d| d.iter().product::<usize>() == d[0] * inner);
    if !fits || (swap_halves && out % 2 != 0) {
        return Err(bad(format!(
            "down {:?} and up {:?} make a {out}x{inner} update",
            down.dims(),
            up.dims(),
        )));
    }
    let factor = scale * layer.alpha.map_or(1.0, |a| a / rank as f64);
    let mut product = (up2.matmul(&down2)? * factor)?;
    if swap_halves {
        let half = out / 2;
        product = Tensor::cat(
            &[product.narrow(0, half, half)?, product.narrow(0, 0, half)?],
            0,
        )?;
    }
    let mut row = 0;
    let mut parts = Vec::with_capacity(weight_dims.len());
    for dims in weight_dims {
        parts.push(product.narrow(0, row, dims[0])?.reshape(dims.as_slice())?);
        row += dims[0];
    }
    Ok(parts)
}

/// A [`TensorSource`] that returns `W + ΔW` for the weights a
/// [`LoraDeltas`] entry names and the base tensors otherwise.
pub struct LoraOverlay {
    base: Arc<dyn TensorSource>,
    deltas: HashMap<String, Tensor>,
}

impl LoraOverlay {
    /// `base` with `deltas` (weight key → update of the weight's shape) added.
    pub fn new(base: Arc<dyn TensorSource>, deltas: HashMap<String, Tensor>) -> Self {
        Self { base, deltas }
    }
}

impl TensorSource for LoraOverlay {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        let Some(t) = self.base.tensor(name, shape, device)? else {
            return Ok(None);
        };
        match self.deltas.get(name) {
            // Offloaded weights keep their updates in host memory: the sum
            // is taken on the device the tensor was asked on.
            Some(d) => Ok(Some((t.to_dtype(d.dtype())? + d.to_device(t.device())?)?)),
            None => Ok(Some(t)),
        }
    }

    /// A weight with an update is widened and returned dense (`W + ΔW` in
    /// the update's dtype); a quantized or fp8 base weight without one
    /// stays in its stored form.
    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<StoredTensor>> {
        if self.deltas.contains_key(name) {
            return Ok(self.tensor(name, shape, device)?.map(StoredTensor::Dense));
        }
        self.base.stored(name, shape, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    fn origin(&self) -> PathBuf {
        self.base.origin()
    }

    fn keys(&self) -> Vec<String> {
        self.base.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::ModuleName;
    use super::*;

    /// A fused update is split by rows, and the halves swap when asked.
    #[test]
    fn fused_updates_split_by_rows() {
        let down = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let up = Tensor::new(
            &[[1f32, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let layer = LoraLayer {
            key: "k".into(),
            component: "transformer".into(),
            module: ModuleName::Dotted("m".into()),
            down: Some(down),
            up: Some(up),
            alpha: Some(1.0),
        };
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let parts = layer_delta(
            &layer,
            &[vec![1, 2], vec![3, 2]],
            false,
            2.0,
            Path::new("f"),
        )
        .unwrap();
        // scale 2 · α/r = 1/2 → factor 1.
        assert_eq!(rows(&parts[0]), [[1.0, 0.0]]);
        assert_eq!(rows(&parts[1]), [[0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]);
        let swapped = layer_delta(&layer, &[vec![4, 2]], true, 2.0, Path::new("f")).unwrap();
        assert_eq!(
            rows(&swapped[0]),
            [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]]
        );
        let e = layer_delta(
            &layer,
            &[vec![2, 2], vec![3, 2]],
            false,
            1.0,
            Path::new("f"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[2, 2] + [3, 2]"), "{e}");
    }
}
