//! A decoder layer's KV cache on a GPU: every sequence's keys and values
//! in one pool of f16 pages (`kernels-cu/decoder.cu`), which sequences
//! hold through [`PageTable`]s. Appending writes the step's rows at the
//! slots the table reserved (after copying a shared page a fork writes
//! into); attention reads each sequence's pages through its block table,
//! split over the context when it is long.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{
    CudaDevice, CudaError,
    decode::MAX_GROUP,
    kernels::KernelId,
    ops::{launch, u32_of},
};
use crate::{
    backend::kv_pages::{PagePool, PageTable},
    error::Result,
};

/// Positions per page.
pub const PAGE_SIZE: usize = 16;
/// Keys one attention block takes before the context is split over more.
const KEYS_PER_SPLIT: usize = 256;
const MAX_SPLITS: usize = 32;
const MAX_GRID_YZ: usize = 65_535;

/// One layer's pages of keys and values, `width` = kv_heads · head_dim
/// halves per position.
pub struct KvPool {
    device: Arc<CudaDevice>,
    pages: Arc<PagePool>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    width: usize,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPool({} pages of {} × {})", self.pages.pages(), PAGE_SIZE, self.width)
    }
}

/// One sequence's part of a step's attention: `rows` new query rows after
/// `past` earlier positions, all already appended to `table`.
pub struct PagedRows<'a> {
    pub table: &'a PageTable,
    pub past: usize,
    pub rows: usize,
}

impl KvPool {
    /// A pool for `positions` positions (whole pages) of `width` halves.
    pub fn new(device: &Arc<CudaDevice>, positions: usize, width: usize) -> Result<Arc<KvPool>, CudaError> {
        let pages = positions.div_ceil(PAGE_SIZE).max(1);
        let halves = pages * PAGE_SIZE * width;
        let k = device.alloc::<u16>(halves)?;
        let v = device.alloc::<u16>(halves)?;
        Ok(Arc::new(KvPool { device: device.clone(), pages: PagePool::new(pages, PAGE_SIZE), k, v, width }))
    }

    /// Positions a pool of `bytes` holds at `width` halves per position (keys and values).
    pub fn positions_in(bytes: usize, width: usize) -> usize {
        bytes / (2 * 2 * width.max(1))
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// An empty sequence.
    pub fn table(&self) -> PageTable {
        PageTable::new(self.pages.clone())
    }

    fn address(&self, buffer: &CudaSlice<u16>) -> u64 {
        buffer.device_ptr(&self.device.stream).0
    }

    /// Appends `rows` rows of keys and values (`[rows, width]` f32) to the
    /// sequence; RESOURCE_EXHAUSTED when the pool has no room.
    pub fn append(&self, table: &mut PageTable, k: &CudaSlice<f32>, v: &CudaSlice<f32>, rows: usize) -> Result<()> {
        let reserved = table.extend(rows)?;
        let page_bytes = PAGE_SIZE * self.width * 2;
        let (k_base, v_base) = (self.address(&self.k), self.address(&self.v));
        for &(from, to) in &reserved.copies {
            for base in [k_base, v_base] {
                let (src, dst) = (base + from as u64 * page_bytes as u64, base + to as u64 * page_bytes as u64);
                // SAFETY: both pages lie inside the pool's buffer (the table's
                // pages are < the pool's page count) and do not overlap; the
                // copy is ordered on the stream before the writes below.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst, src, page_bytes, self.device.stream.cu_stream())
                }
                .map_err(CudaError::driver("cuMemcpyDtoDAsync"))?;
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let slots = self.device.upload(&reserved.slots)?;
        let (r, w) = (u32_of("kv_append", rows)?, u32_of("kv_append", self.width)?);
        let n = rows * self.width;
        let cfg = LaunchConfig {
            grid_dim: ((n.div_ceil(256) as u32).clamp(1, 4_096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let device = &self.device;
        Ok(launch!(device, KernelId::KvAppendF16, cfg, k, v, &slots, &k_base, &v_base, &r, &w)?)
    }

    /// Causal grouped-query attention of the step's query rows `q`
    /// (`[Σ rows, heads · head_dim]`, sequence after sequence) over their pages.
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        sequences: &[PagedRows<'_>],
        (heads, kv_heads, head_dim): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
        let op = "paged_attention";
        let unsupported = |detail: String| crate::error::Error::from(CudaError::Unsupported { op, detail });
        let kernel = match head_dim {
            16 => KernelId::PagedAttentionD16,
            32 => KernelId::PagedAttentionD32,
            64 => KernelId::PagedAttentionD64,
            128 => KernelId::PagedAttentionD128,
            d => return Err(unsupported(format!("no kernel for heads of {d} (16, 32, 64 and 128 have one)"))),
        };
        if kv_heads == 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP || kv_heads * head_dim != self.width {
            return Err(unsupported(format!(
                "{heads} query heads over {kv_heads} KV heads of {head_dim} do not fit a pool of width {} \
                 (at most {MAX_GROUP} query heads per KV head)",
                self.width
            )));
        }
        // An item per query row: its sequence and how many positions it sees.
        let mut items = Vec::new();
        for (s, seq) in sequences.iter().enumerate() {
            if seq.table.len() < seq.past + seq.rows {
                return Err(unsupported(format!(
                    "sequence {s} holds {} positions, not {}",
                    seq.table.len(),
                    seq.past + seq.rows
                )));
            }
            for t in 0..seq.rows {
                items.extend([s as u32, (seq.past + t + 1) as u32]);
            }
        }
        let count = items.len() / 2;
        let mut out = self.device.alloc::<f32>(count * heads * head_dim)?;
        if count == 0 {
            return Ok(out);
        }
        if count > MAX_GRID_YZ {
            return Err(unsupported(format!("{count} query rows exceed a grid's {MAX_GRID_YZ}")));
        }
        let max_pages = sequences.iter().map(|s| s.table.pages().len()).max().unwrap_or(1).max(1);
        let tables: Vec<u32> = sequences
            .iter()
            .flat_map(|s| s.table.pages().iter().copied().chain(std::iter::repeat(0)).take(max_pages))
            .collect();
        let longest = sequences.iter().map(|s| s.past + s.rows).max().unwrap_or(1);
        let splits = longest.div_ceil(KEYS_PER_SPLIT).clamp(1, MAX_SPLITS);
        let keys_per_split = longest.div_ceil(splits);
        let partials =
            self.device.alloc::<f32>(if splits > 1 { count * heads * splits * (head_dim + 2) } else { 0 })?;
        let (tables, items) = (self.device.upload(&tables)?, self.device.upload(&items)?);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (count_u, heads_u, kv_u) = (u32_of(op, count)?, u32_of(op, heads)?, u32_of(op, kv_heads)?);
        let (pages_u, page_u, splits_u, keys_u) =
            (u32_of(op, max_pages)?, PAGE_SIZE as u32, splits as u32, u32_of(op, keys_per_split)?);
        let bf16 = 0u32;
        let cfg = LaunchConfig { grid_dim: (kv_u, count_u, splits_u), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let device = &self.device;
        let partial_address = device.optional(Some(&partials));
        launch!(
            device,
            kernel,
            cfg,
            q,
            &self.k,
            &self.v,
            &tables,
            &items,
            &mut out,
            &partial_address,
            &count_u,
            &heads_u,
            &kv_u,
            &pages_u,
            &page_u,
            &splits_u,
            &keys_u,
            &scale,
            &bf16
        )?;
        if splits > 1 {
            let cfg = LaunchConfig { grid_dim: (heads_u, count_u, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let dim = head_dim as u32;
            launch!(
                device,
                KernelId::PagedAttentionCombine,
                cfg,
                &partials,
                &mut out,
                &count_u,
                &heads_u,
                &dim,
                &splits_u
            )?;
        }
        Ok(out)
    }
}
