//! What travels between workers: elements as one byte string per vector.

use std::fmt;
use std::marker::PhantomData;

use attention_core::Element;
use bytemuck::Pod;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The element types a distributed call can send: `f32` and `f64`.
///
/// A vector of them travels as one little-endian byte string, which the engine's encoding
/// (bincode) copies whole instead of element by element.
pub trait Wire: Element + Pod {}
impl<T: Element + Pod> Wire for T {}

/// A vector of elements, encoded as one byte string.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Values<T>(pub(crate) Vec<T>);

impl<T: Wire> Serialize for Values<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            serializer.serialize_bytes(bytemuck::cast_slice(&self.0))
        } else {
            let mut bytes: Vec<u8> = bytemuck::cast_slice(&self.0).to_vec();
            for x in bytes.chunks_exact_mut(size_of::<T>()) {
                x.reverse();
            }
            serializer.serialize_bytes(&bytes)
        }
    }
}

impl<'de, T: Wire> Deserialize<'de> for Values<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes<T>(PhantomData<T>);
        impl<T: Wire> Visitor<'_> for Bytes<T> {
            type Value = Values<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of {}-byte elements", size_of::<T>())
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Values<T>, E> {
                if !bytes.len().is_multiple_of(size_of::<T>()) {
                    return Err(E::invalid_length(bytes.len(), &self));
                }
                let mut values = vec![T::zero(); bytes.len() / size_of::<T>()];
                let target: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
                target.copy_from_slice(bytes);
                if cfg!(target_endian = "big") {
                    for x in target.chunks_exact_mut(size_of::<T>()) {
                        x.reverse();
                    }
                }
                Ok(Values(values))
            }
        }
        deserializer.deserialize_bytes(Bytes(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::Values;

    #[test]
    fn values_survive_the_engine_encoding() {
        let v = Values(vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3e38]);
        let bytes = bincode::serialize(&v).unwrap();
        assert_eq!(bytes.len(), 8 + 16, "a length and the raw bytes");
        let back: Values<f32> = bincode::deserialize(&bytes).unwrap();
        assert_eq!(
            back.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let w = Values(vec![1.0f64 / 3.0]);
        let back: Values<f64> = bincode::deserialize(&bincode::serialize(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        assert!(
            bincode::deserialize::<Values<f64>>(&bincode::serialize(&v).unwrap()[..15]).is_err()
        );
    }
}
