//! Choosing the device once, from configuration: `auto` takes a GPU when
//! one answers and every kernel compiles for it, else the CPU; `cuda` or
//! `cuda:N` insists on a GPU and fails with the reason when there is none.

use std::{fmt, str::FromStr, sync::Arc};

use super::{
    Device,
    cuda::{CudaDevice, KernelCache, Probe, probe},
};
use crate::error::{Error, Result};

/// The `device` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => {
                other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceChoice::Cuda).ok_or_else(|| {
                    Error::invalid("device", format!("{other:?} is not \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""))
                })
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Devices opened so far in this process, by the setting they resolved to
/// (`auto` with a GPU is `cuda:0`): each GPU gets one context and stream
/// however many engines and settings use it.
static OPENED: std::sync::Mutex<Vec<(DeviceChoice, Device)>> = std::sync::Mutex::new(Vec::new());

impl Device {
    /// [`Device::select`] once per GPU (or setting) and process; the choice
    /// and its reason are logged the first time.
    pub fn shared(choice: DeviceChoice, cache: &KernelCache) -> Result<Device> {
        let key = match choice {
            DeviceChoice::Auto if matches!(probe(), Probe::Gpus(_)) => DeviceChoice::Cuda(0),
            other => other,
        };
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, device)) = opened.iter().find(|(c, _)| *c == key || *c == choice) {
            return Ok(device.clone());
        }
        let (device, why) = Device::select(choice, cache)?;
        tracing::info!(device = %device.label(), reason = %why, "compute device");
        // An `auto` that fell back to the CPU is remembered as `auto`, so
        // an explicit `cuda:0` still tries the GPU and says why it fails.
        let stored = if matches!(device, Device::Cuda(_)) { key } else { choice };
        opened.push((stored, device.clone()));
        Ok(device)
    }

    /// The device `choice` names, with the reason it was picked (for the
    /// log): opens the GPU and compiles its kernels (cached in `cache`).
    pub fn select(choice: DeviceChoice, cache: &KernelCache) -> Result<(Device, String)> {
        let open = |ordinal| CudaDevice::open(ordinal, cache).map(|gpu| Device::Cuda(Arc::new(gpu)));
        match choice {
            DeviceChoice::Cpu => Ok((Device::Cpu, "device = \"cpu\"".into())),
            DeviceChoice::Cuda(ordinal) => {
                let device = open(ordinal)?;
                Ok((device, format!("device = \"{choice}\"")))
            }
            DeviceChoice::Auto => match probe() {
                Probe::Missing(why) => Ok((Device::Cpu, format!("device = \"auto\" and no GPU: {why}"))),
                Probe::Gpus(_) => match open(0) {
                    Ok(device) => Ok((device, "device = \"auto\" and a GPU answered".into())),
                    Err(e) => Ok((Device::Cpu, format!("device = \"auto\", but the GPU could not be used: {e}"))),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
        }
        assert_eq!(DeviceChoice::Cuda(0).to_string(), "cuda:0");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains("cuda:N"), "{err}");
        }
    }
}
