//! Dense tensors on the wire (`osprey.worker.v1.Tensor`): little-endian bytes with shape and dtype.

use osprey_proto::worker::v1::{ElementType, Tensor};

use crate::ServiceError;

/// An f32 tensor for the wire.
pub fn f32_to_proto(shape: &[usize], values: &[f32]) -> Tensor {
    debug_assert_eq!(shape.iter().product::<usize>(), values.len());
    Tensor {
        shape: shape.iter().map(|&d| d as u64).collect(),
        dtype: ElementType::F32 as i32,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Reads an f32 tensor from the wire; `field` names it in errors. Checks dtype, that the shape
/// matches the data length, and the rank.
pub fn f32_from_proto(
    tensor: &Tensor,
    field: &str,
    rank: usize,
) -> Result<(Vec<usize>, Vec<f32>), ServiceError> {
    if tensor.dtype != ElementType::F32 as i32 {
        return Err(ServiceError::invalid(field, format!("dtype must be F32, got {}", tensor.dtype)));
    }
    if tensor.shape.len() != rank {
        return Err(ServiceError::invalid(
            field,
            format!("must have rank {rank}, got shape {:?}", tensor.shape),
        ));
    }
    let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
    let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if elements.and_then(|n| n.checked_mul(4)) != Some(tensor.data.len()) {
        return Err(ServiceError::invalid(
            field,
            format!("shape {:?} does not match {} bytes of f32 data", tensor.shape, tensor.data.len()),
        ));
    }
    let values = tensor.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let proto = f32_to_proto(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        let (shape, values) = f32_from_proto(&proto, "t", 2).unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(values[5], -6.5);
        assert!(f32_from_proto(&proto, "t", 3).unwrap_err().to_string().starts_with("t: must have rank 3"));
        let mut short = proto.clone();
        short.data.pop();
        assert!(f32_from_proto(&short, "t", 2).is_err());
        let mut wrong = proto;
        wrong.dtype = ElementType::Bf16 as i32;
        assert!(f32_from_proto(&wrong, "t", 2).is_err());
        let huge = Tensor { shape: vec![u64::MAX, 2], dtype: ElementType::F32 as i32, data: vec![] };
        assert!(f32_from_proto(&huge, "t", 2).is_err());
    }
}
