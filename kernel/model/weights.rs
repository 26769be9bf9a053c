//! Named tensors from a safetensors file (memory-mapped), converted to f32 on
//! the target device. Names may carry an architecture prefix (`bert.`).

use std::{fs::File, path::Path};

use safetensors::{Dtype, SafeTensors};

use crate::{
    backend::{Device, Precision, Tensor, half::f16_to_f32},
    error::{Error, Result},
};

pub struct SafetensorsFile {
    map: memmap2::Mmap,
    path: String,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::NotFound(format!("cannot open weights {}: {e}", path.display())))?;
        // SAFETY: the file is opened read-only and model files are not
        // modified while a server runs; a concurrent writer would be an
        // operator error that at worst corrupts this model's weights.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::Internal(format!("cannot map {}: {e}", path.display())))?;
        let this = SafetensorsFile { map, path: path.display().to_string() };
        this.parse()?;
        Ok(this)
    }

    pub(super) fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .map_err(|e| Error::InvalidArgument(format!("{} is not a safetensors file: {e}", self.path)))
    }

    /// The names of the tensors the file holds.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.parse()?.names().into_iter().map(str::to_owned).collect())
    }

    /// Loads `name` (or `{prefix}{name}` for a known prefix) as f32 values
    /// with its shape.
    pub fn load(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let tensors = self.parse()?;
        let view = ["", "bert.", "model."]
            .iter()
            .find_map(|prefix| tensors.tensor(&format!("{prefix}{name}")).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("{} has no tensor {name:?}", self.path)))?;
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor {name:?} has dtype {other:?}; f32, f16 and bf16 are supported",
                    self.path
                )));
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    /// Loads a tensor and checks its shape.
    pub fn tensor(&self, device: &Device, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (found, values) = self.load(name)?;
        if found != shape {
            return Err(Error::InvalidArgument(format!(
                "{}: tensor {name:?} has shape {found:?}, the config implies {shape:?}",
                self.path
            )));
        }
        device.tensor(shape, values)
    }

    /// Loads PyTorch `Linear` weights (`[out, in]`) transposed to `[in, out]`,
    /// the layout the backend's `linear` takes; several are concatenated
    /// along `out` (fused projections such as Q, K, V).
    pub fn linear(&self, device: &Device, names: &[&str], inputs: usize, outputs: usize) -> Result<(Tensor, Tensor)> {
        self.linear_in(device, Precision::F32, names, inputs, outputs)
    }

    /// As [`SafetensorsFile::linear`], for products in `precision`.
    pub fn linear_in(
        &self,
        device: &Device,
        precision: Precision,
        names: &[&str],
        inputs: usize,
        outputs: usize,
    ) -> Result<(Tensor, Tensor)> {
        let total = outputs * names.len();
        let mut weight = vec![0f32; inputs * total];
        let mut bias = Vec::with_capacity(total);
        for (part, name) in names.iter().enumerate() {
            let (shape, w) = self.load(&format!("{name}.weight"))?;
            if shape != [outputs, inputs] {
                return Err(Error::InvalidArgument(format!(
                    "{}: {name}.weight has shape {shape:?}, expected [{outputs}, {inputs}]",
                    self.path
                )));
            }
            for o in 0..outputs {
                for i in 0..inputs {
                    weight[i * total + part * outputs + o] = w[o * inputs + i];
                }
            }
            let (shape, b) = self.load(&format!("{name}.bias"))?;
            if shape != [outputs] {
                return Err(Error::InvalidArgument(format!(
                    "{}: {name}.bias has shape {shape:?}, expected [{outputs}]",
                    self.path
                )));
            }
            bias.extend(b);
        }
        Ok((device.weight_in(precision, inputs, total, weight)?, device.tensor(&[total], bias)?))
    }
}
