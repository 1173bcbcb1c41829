//! The `--device` and `--dtype` flags every worker takes.

use candle_core::{DType, Device};

/// The compute device named by `--device`: `cpu` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, String> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(Ok(ordinal)) = name.strip_prefix("cuda:").map(str::parse::<usize>) else {
        return Err(format!("--device {name}: expected `cpu` or `cuda:N`"));
    };
    // candle answers NotCompiledWithCudaSupport when the binary lacks the `cuda` feature.
    Device::new_cuda(ordinal).map_err(|err| match err {
        candle_core::Error::NotCompiledWithCudaSupport => {
            format!("--device {name}: this binary was built without the `cuda` feature")
        }
        err => format!("--device {name}: {err}"),
    })
}

/// The compute dtype named by `--dtype`: `f32`, `bf16`, `f16`, or `auto` (f32 on the CPU, bf16 on
/// a GPU, the precision the official checkpoints are trained and shipped in).
pub fn parse_dtype(name: &str, device: &Device) -> Result<DType, String> {
    match name {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!("--dtype {name}: expected `auto`, `f32`, `bf16` or `f16`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_or_explain() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda", "cuda:x", "cuda:-1", ""] {
            assert!(parse_device(bad).unwrap_err().contains("expected `cpu` or `cuda:N`"), "{bad}");
        }
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0").unwrap_err().contains("without the `cuda` feature"));
        }
        assert_eq!(parse_dtype("auto", &Device::Cpu), Ok(DType::F32));
        assert_eq!(parse_dtype("bf16", &Device::Cpu), Ok(DType::BF16));
        assert_eq!(parse_dtype("f16", &Device::Cpu), Ok(DType::F16));
        assert!(parse_dtype("fp8", &Device::Cpu).unwrap_err().contains("--dtype fp8"));
    }
}
