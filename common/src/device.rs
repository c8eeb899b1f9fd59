//! Device selection from the `cpu` / `cuda:N` strings every CLI accepts.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. CUDA needs the `cuda` cargo feature.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Device(spec.into(), "expected `cpu` or `cuda:N`".into()))?,
        None => return Err(Error::Device(spec.into(), "expected `cpu` or `cuda:N`".into())),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(
            spec.into(),
            "this binary was built without CUDA; rebuild with `--features cuda`".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(spec.into(), e.to_string()))
}

/// The name a device is reported under (`cpu`, `cuda:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").unwrap_err().to_string().contains("cpu"));
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0").unwrap_err().to_string().contains("--features cuda"));
    }
}
