//! Exact vector search with the index resident on the GPU: one kernel
//! scores every row against a batch of queries (kind and metadata filters
//! applied as masks, removed rows skipped), then repeated passes of a
//! chunked top-k keep the best `k` per query on the device; only `k`
//! (score, slot) pairs per query come back to the host.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, CudaError, kernels::KernelId, ops::launch, ops::u32_of};

/// How the index keeps its vectors on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorPrecision {
    #[default]
    F32,
    /// Half the memory and bandwidth; scores move by about 1e-3.
    F16,
    Bf16,
}

/// Scores per chunk of the top-k kernel (its launch contract).
const TOPK_CHUNK: usize = 2_048;
/// The most results per query the device selects; larger k is selected on
/// the host from the downloaded scores.
pub const DEVICE_MAX_K: usize = 1_024;
/// Query values staged in the scoring kernel's shared memory (32 KB).
const MAX_QUERY_VALUES: usize = 8_192;
const TOPK_BLOCK: u32 = 1_024;
const SCORE_BLOCK: u32 = 256;
const SCORE_ROWS_PER_BLOCK: u32 = SCORE_BLOCK / 32;
const MAX_SCORE_BLOCKS: u32 = 65_535;

enum Rows {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

/// The index's rows on the device, slot by slot as the host index numbers
/// them: a vector, a kind and a live flag per slot.
pub struct DeviceVectors {
    dim: usize,
    precision: VectorPrecision,
    rows: Rows,
    kinds: CudaSlice<u32>,
    live: CudaSlice<u8>,
    capacity: usize,
    slots: usize,
}

/// One query of a batch.
pub struct DeviceQuery<'a> {
    pub vector: &'a [f32],
    pub k: usize,
    /// Bit `kind` set for each allowed kind; 0 allows all.
    pub kind_mask: u32,
    /// Bit `slot` set for each slot the metadata filter allows; `None`
    /// allows all. `ceil(slots / 32)` words.
    pub allow: Option<&'a [u32]>,
}

impl DeviceVectors {
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn precision(&self) -> VectorPrecision {
        self.precision
    }

    /// Marks every slot unwritten, so the next write takes them all (after
    /// a failed write left the device copy partly stale).
    pub fn forget(&mut self) {
        self.slots = 0;
    }

    pub fn device_bytes(&self) -> usize {
        let value = if self.precision == VectorPrecision::F32 { 4 } else { 2 };
        self.capacity * (self.dim * value + 5)
    }
}

impl CudaDevice {
    pub fn vectors(&self, dim: usize, precision: VectorPrecision) -> Result<DeviceVectors, CudaError> {
        let rows = match precision {
            VectorPrecision::F32 => Rows::F32(self.alloc(0)?),
            _ => Rows::Half(self.alloc(0)?),
        };
        Ok(DeviceVectors { dim, precision, rows, kinds: self.alloc(0)?, live: self.alloc(0)?, capacity: 0, slots: 0 })
    }

    /// Writes slots `start..start + kinds.len()` (`vectors` holds their rows
    /// back to back), growing the device arrays as needed.
    pub fn write_slots(
        &self,
        index: &mut DeviceVectors,
        start: usize,
        vectors: &[f32],
        kinds: &[u32],
        live: &[u8],
    ) -> Result<(), CudaError> {
        let count = kinds.len();
        if vectors.len() != count * index.dim || live.len() != count {
            return Err(CudaError::Unsupported {
                op: "write_slots",
                detail: "rows, kinds and flags differ in count".into(),
            });
        }
        let end = start + count;
        if end > index.capacity {
            self.grow(index, end.next_power_of_two().max(1_024))?;
        }
        let dim = index.dim;
        match &mut index.rows {
            Rows::F32(rows) => {
                let mut dst = rows.slice_mut(start * dim..end * dim);
                self.stream.memcpy_htod(vectors, &mut dst).map_err(CudaError::driver("cuMemcpyHtoDAsync"))?;
            }
            Rows::Half(rows) => {
                let half: Vec<u16> = match index.precision {
                    VectorPrecision::F16 => vectors.iter().map(|&v| crate::backend::half::f32_to_f16(v)).collect(),
                    _ => vectors.iter().map(|&v| crate::backend::half::f32_to_bf16(v)).collect(),
                };
                let mut dst = rows.slice_mut(start * dim..end * dim);
                self.stream.memcpy_htod(&half, &mut dst).map_err(CudaError::driver("cuMemcpyHtoDAsync"))?;
            }
        }
        let mut dst = index.kinds.slice_mut(start..end);
        self.stream.memcpy_htod(kinds, &mut dst).map_err(CudaError::driver("cuMemcpyHtoDAsync"))?;
        let mut dst = index.live.slice_mut(start..end);
        self.stream.memcpy_htod(live, &mut dst).map_err(CudaError::driver("cuMemcpyHtoDAsync"))?;
        index.slots = index.slots.max(end);
        Ok(())
    }

    /// Reallocates the arrays for `capacity` slots, keeping what is there;
    /// new slots are dead until written.
    fn grow(&self, index: &mut DeviceVectors, capacity: usize) -> Result<(), CudaError> {
        let dim = index.dim;
        let keep = index.slots;
        fn moved<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
            gpu: &CudaDevice,
            old: &CudaSlice<T>,
            keep: usize,
            len: usize,
        ) -> Result<CudaSlice<T>, CudaError> {
            let mut new = gpu.stream.alloc_zeros::<T>(len).map_err(CudaError::driver("cuMemAllocAsync"))?;
            if keep > 0 {
                let mut dst = new.slice_mut(0..keep);
                gpu.stream
                    .memcpy_dtod(&old.slice(0..keep), &mut dst)
                    .map_err(CudaError::driver("cuMemcpyDtoDAsync"))?;
            }
            Ok(new)
        }
        index.rows = match &index.rows {
            Rows::F32(rows) => Rows::F32(moved(self, rows, keep * dim, capacity * dim)?),
            Rows::Half(rows) => Rows::Half(moved(self, rows, keep * dim, capacity * dim)?),
        };
        index.kinds = moved(self, &index.kinds, keep, capacity)?;
        index.live = moved(self, &index.live, keep, capacity)?;
        index.capacity = capacity;
        Ok(())
    }

    /// The best `k` (score, slot) pairs of each query, best first (ties to
    /// the lower slot, as the host index orders them).
    pub fn search(
        &self,
        index: &DeviceVectors,
        queries: &[DeviceQuery<'_>],
    ) -> Result<Vec<Vec<(f32, u32)>>, CudaError> {
        let dim = index.dim;
        if dim > MAX_QUERY_VALUES {
            return Err(CudaError::Unsupported {
                op: "search",
                detail: format!("vectors of {dim} values; the scoring kernel stages at most {MAX_QUERY_VALUES}"),
            });
        }
        if queries.iter().any(|q| q.vector.len() != dim) {
            return Err(CudaError::Unsupported { op: "search", detail: format!("a query is not of dimension {dim}") });
        }
        let per_batch = (MAX_QUERY_VALUES / dim.max(1)).max(1);
        let mut results = Vec::with_capacity(queries.len());
        for batch in queries.chunks(per_batch) {
            results.extend(self.search_batch(index, batch)?);
        }
        Ok(results)
    }

    fn search_batch(
        &self,
        index: &DeviceVectors,
        queries: &[DeviceQuery<'_>],
    ) -> Result<Vec<Vec<(f32, u32)>>, CudaError> {
        let (n, nq) = (index.slots, queries.len());
        if n == 0 || nq == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        let scores = self.score(index, queries)?;
        let k = queries.iter().map(|q| q.k).max().unwrap_or(0).min(n);
        if k == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        let best = if k <= DEVICE_MAX_K { self.top_k(scores, n, nq, k)? } else { self.top_k_on_host(&scores, n, nq)? };
        Ok(best
            .into_iter()
            .zip(queries)
            .map(|(mut hits, q)| {
                hits.retain(|(s, _)| *s != f32::NEG_INFINITY);
                hits.truncate(q.k);
                hits
            })
            .collect())
    }

    fn score(&self, index: &DeviceVectors, queries: &[DeviceQuery<'_>]) -> Result<CudaSlice<f32>, CudaError> {
        let (n, nq, dim) = (index.slots, queries.len(), index.dim);
        let values: Vec<f32> = queries.iter().flat_map(|q| q.vector.iter().copied()).collect();
        let masks: Vec<u32> = queries.iter().map(|q| q.kind_mask).collect();
        let words = n.div_ceil(32);
        let allow = if queries.iter().any(|q| q.allow.is_some()) {
            let mut bits = vec![u32::MAX; nq * words];
            for (q, query) in queries.iter().enumerate() {
                if let Some(allow) = query.allow {
                    let take = allow.len().min(words);
                    bits[q * words..q * words + take].copy_from_slice(&allow[..take]);
                    bits[q * words + take..(q + 1) * words].fill(0);
                }
            }
            Some(self.upload(&bits)?)
        } else {
            None
        };
        let queries_dev = self.upload(&values)?;
        let masks = self.upload(&masks)?;
        let mut scores = self.alloc::<f32>(nq * n)?;
        let (n32, dim32, nq32, words32) =
            (u32_of("search", n)?, u32_of("search", dim)?, u32_of("search", nq)?, u32_of("search", words)?);
        let cfg = LaunchConfig {
            grid_dim: (n32.div_ceil(SCORE_ROWS_PER_BLOCK).min(MAX_SCORE_BLOCKS), 1, 1),
            block_dim: (SCORE_BLOCK, 1, 1),
            shared_mem_bytes: (nq * dim * 4) as u32,
        };
        let allow = self.optional(allow.as_ref());
        let (id, rows) = match (&index.rows, index.precision) {
            (Rows::F32(rows), _) => (KernelId::ScoreRowsF32, self.optional(Some(rows))),
            (Rows::Half(rows), VectorPrecision::F16) => (KernelId::ScoreRowsF16, self.optional(Some(rows))),
            (Rows::Half(rows), _) => (KernelId::ScoreRowsBf16, self.optional(Some(rows))),
        };
        launch!(
            self,
            id,
            cfg,
            &rows,
            &n32,
            &dim32,
            &queries_dev,
            &nq32,
            &index.kinds,
            &masks,
            &allow,
            &words32,
            &index.live,
            &mut scores
        )?;
        Ok(scores)
    }

    /// Chunked top-k passes until one chunk per query remains.
    fn top_k(&self, scores: CudaSlice<f32>, n: usize, nq: usize, k: usize) -> Result<Vec<Vec<(f32, u32)>>, CudaError> {
        let (mut scores, mut ids, mut len) = (scores, None::<CudaSlice<u32>>, n);
        let k32 = u32_of("top_k", k)?;
        let nq32 = u32_of("top_k", nq)?;
        loop {
            let chunks = len.div_ceil(TOPK_CHUNK);
            let mut out_scores = self.alloc::<f32>(nq * chunks * k)?;
            let mut out_ids = self.alloc::<u32>(nq * chunks * k)?;
            let len32 = u32_of("top_k", len)?;
            let cfg = LaunchConfig {
                grid_dim: (u32_of("top_k", chunks)?, nq32, 1),
                block_dim: (TOPK_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let ids_in = self.optional(ids.as_ref());
            launch!(self, KernelId::TopkChunks, cfg, &scores, &ids_in, &len32, &k32, &mut out_scores, &mut out_ids)?;
            (scores, ids, len) = (out_scores, Some(out_ids), chunks * k);
            if chunks == 1 {
                break;
            }
        }
        let (scores, ids) = (self.download(&scores)?, self.download(ids.as_ref().expect("one pass ran"))?);
        Ok(scores
            .chunks_exact(k)
            .zip(ids.chunks_exact(k))
            .map(|(s, i)| s.iter().copied().zip(i.iter().copied()).collect())
            .collect())
    }

    /// For k beyond the device selection: every score to the host.
    fn top_k_on_host(&self, scores: &CudaSlice<f32>, n: usize, nq: usize) -> Result<Vec<Vec<(f32, u32)>>, CudaError> {
        let all = self.download(scores)?;
        Ok((0..nq)
            .map(|q| {
                // NaN ranks as -inf, as in the kernel, and is dropped with it.
                let score = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
                let mut hits: Vec<(f32, u32)> = all[q * n..(q + 1) * n].iter().map(|&s| score(s)).zip(0..).collect();
                hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                hits
            })
            .collect())
    }
}
