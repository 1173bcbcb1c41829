//! The KV cache made for serving: immutable, shared prefix blocks followed by each sequence's own
//! growable tail.
//!
//! A [`SeqCache`] is a chain of reference-counted [`KvBlock`]s (a [`PrefixKv`], e.g. the system
//! prompt and the image tokens) followed by the sequence's own positions. Attention reads the
//! blocks in place, so a prefix is computed once and shared by every sequence that starts with
//! it; nothing is copied.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

/// Keys and values of a run of consecutive positions for every layer (`[kv_heads, len,
/// head_dim]` each). Immutable once built, shared through `Arc`.
#[derive(Debug)]
pub struct KvBlock {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: usize,
}

/// A computed prompt prefix (positions `0..len`) that sequences can start from.
#[derive(Debug, Clone, Default)]
pub struct PrefixKv {
    pub(super) blocks: Vec<Arc<KvBlock>>,
    pub(super) len: usize,
}

impl PrefixKv {
    /// Number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` positions (views into the same blocks; nothing is copied).
    pub fn truncate(&self, len: usize) -> candle_core::Result<PrefixKv> {
        if len >= self.len {
            return Ok(self.clone());
        }
        let mut out = PrefixKv::default();
        for block in &self.blocks {
            let keep = (len - out.len).min(block.len);
            if keep == 0 {
                break;
            }
            if keep == block.len {
                out.blocks.push(block.clone());
            } else {
                let layers = block
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((k.narrow(1, 0, keep)?, v.narrow(1, 0, keep)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                out.blocks.push(Arc::new(KvBlock { layers, len: keep }));
            }
            out.len += keep;
        }
        Ok(out)
    }

    /// Bytes held by the keys and values (shared blocks counted fully).
    pub fn size_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.layers.iter())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// One sequence's cache: a shared prefix followed by the sequence's own positions, kept in
/// per-layer buffers that grow by doubling (`[kv_heads, capacity, head_dim]`, written in place).
#[derive(Debug)]
pub struct SeqCache {
    pub(super) prefix: PrefixKv,
    pub(super) tail: Vec<(Tensor, Tensor)>,
    pub(super) tail_len: usize,
    capacity: usize,
}

impl SeqCache {
    /// An empty cache, or one continuing `prefix`.
    pub fn new(prefix: PrefixKv) -> Self {
        Self { prefix, tail: Vec::new(), tail_len: 0, capacity: 0 }
    }

    /// Number of positions (the position of the next token).
    pub fn len(&self) -> usize {
        self.prefix.len + self.tail_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shared prefix this cache starts with.
    pub fn prefix(&self) -> &PrefixKv {
        &self.prefix
    }

    /// Freezes this cache into a prefix other sequences can share (its own positions become a
    /// new block after the existing ones).
    pub fn into_prefix(self) -> candle_core::Result<PrefixKv> {
        let mut prefix = self.prefix;
        if self.tail_len > 0 {
            let layers = self
                .tail
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.narrow(1, 0, self.tail_len)?.contiguous()?,
                        v.narrow(1, 0, self.tail_len)?.contiguous()?,
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            prefix.blocks.push(Arc::new(KvBlock { layers, len: self.tail_len }));
            prefix.len += self.tail_len;
        }
        Ok(prefix)
    }

    /// Makes room for `extra` more positions in the tail buffers: `layers` pairs of
    /// `[kv_heads, capacity, head_dim]` (`kv_shape` = `(kv_heads, head_dim)`), doubling.
    pub(super) fn reserve(
        &mut self,
        extra: usize,
        layers: usize,
        kv_shape: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<()> {
        let needed = self.tail_len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let cap = needed.max(2 * self.capacity).max(16);
        let shape = (kv_shape.0, cap, kv_shape.1);
        let mut tail = Vec::with_capacity(layers);
        for li in 0..layers {
            let (k, v) = (Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?);
            if self.tail_len > 0 {
                let (ok, ov) = &self.tail[li];
                k.slice_set(&ok.narrow(1, 0, self.tail_len)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, self.tail_len)?.contiguous()?, 1, 0)?;
            }
            tail.push((k, v));
        }
        self.tail = tail;
        self.capacity = cap;
        Ok(())
    }
}
